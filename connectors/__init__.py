"""Connector implementations, one store per module (import the one you need).

Installed as ``persistroids_dist.connectors`` (this folder is mapped there by pyproject.toml):

- ``memory``: in-process dict per shard (the default; for tests and demos)
- ``sqlite``: the embedded default store (WAL, one file shared or one per cache)
- ``postgres``: PostgreSQL via psycopg 3 and a pool (COPY + upsert flushes; BYTEA or JSONB
  values; or mapped onto an existing table)
- ``redis``: Redis keys (optional TTL) or one hash; MULTI/EXEC flushes
- ``files``: one file per key, replaced atomically (msgpack, raw bytes or text)
- ``parquet``: append-only Parquet files, one per flushed batch (pipelines, audit logs)
- ``testing``: the reusable contract suite (``ConnectorContract``) for any connector, and
  ``require_service()`` for tests that need a running server (needs pytest: the ``test``
  extra)
"""
