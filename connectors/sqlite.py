"""SQLite connector: the embedded default store (one table per connector, msgpack values)."""

from __future__ import annotations

import os
import re
import sqlite3
from typing import Any

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import BaseConnector

__all__ = ["SQLiteConnector"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SQLiteConnector(BaseConnector):
    """Stores ``encode(args) -> encode(value)`` rows in table ``table`` of the file ``path``.

    WAL mode with ``synchronous=NORMAL``: a flush is one transaction of batched upserts, durable
    against a process crash (not against power loss of the last transaction).
    """

    def __init__(self, path: str | os.PathLike[str], table: str = "kv", *,
                 id: str | None = None, busy_timeout_ms: int = 30000) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"invalid SQLite table name {table!r}: use letters, digits and _")
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"SQLite connector: directory {directory!r} for database {self.path!r} does not exist"
            )
        self.table = table
        self.id = id or f"sqlite:{table}"
        self.busy_timeout_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ship configuration only; each shard opens its own connection.
        state = self.__dict__.copy()
        state["_db"] = None
        return state

    def connect(self) -> None:
        if self._db is not None:
            return
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                             isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} "
                   "(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        self._db = db

    def disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.connect()
        assert self._db is not None
        return self._db

    def read(self, args: Any) -> Any:
        row = self.db.execute(f"SELECT v FROM {self.table} WHERE k = ?",
                              (encode_value(args),)).fetchone()
        return None if row is None else decode_value(row[0])

    def write(self, args: Any, value: Any) -> Any:
        return (encode_value(args), encode_value(value))

    def flush(self, payloads: list[Any]) -> None:
        if not payloads:
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"INSERT INTO {self.table} (k, v) VALUES (?, ?) "
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v", payloads)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
