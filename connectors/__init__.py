"""Connector implementations, one store per module (import the one you need).

- ``connectors.memory``: in-process dict per shard (the default; for tests and demos)
- ``connectors.sqlite``: the embedded default store
"""
