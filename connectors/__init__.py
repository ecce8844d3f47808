"""Connector implementations, one store per module (import the one you need).

- ``connectors.memory``: in-process dict per shard (the default; for tests and demos)
- ``connectors.sqlite``: the embedded default store (WAL, one file shared or one per cache)
- ``connectors.postgres``: PostgreSQL via psycopg 3 and a pool (COPY + upsert flushes; BYTEA or
  JSONB values; or mapped onto an existing table)
- ``connectors.redis``: Redis keys (optional TTL) or one hash; MULTI/EXEC flushes
- ``connectors.files``: one file per key, replaced atomically (msgpack, raw bytes or text)
- ``connectors.parquet``: append-only Parquet files, one per flushed batch (pipelines, audit logs)
- ``connectors.testing``: the reusable contract suite (``ConnectorContract``) for any connector,
  and ``require_service()`` for tests that need a running server
"""
