"""SQLite connector: the embedded default store (one table per connector, msgpack values).

Layout: a table ``(k BLOB PRIMARY KEY, v BLOB)`` holding ``encode_value(args)`` and
``encode_value(value)``. ``path`` is either a database file, which any number of caches
(different tables) and shards may share, or an existing directory, in which case the database is
``<directory>/<table>.sqlite3``: one file per cache, so caches never contend for one lock.

Concurrency: every shard opens its own connection (connections are never pickled). The
database runs in WAL mode, so readers never block and are never blocked; writers are serialized
by SQLite. A flush takes the write lock up front (``BEGIN IMMEDIATE``) and waits up to
``busy_timeout_ms`` for it, so two shards flushing at once queue instead of failing.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import MsgpackRowsConnector

__all__ = ["SQLiteConnector"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# SQLite's default limit on bound parameters is 999 in old builds; stay below it.
_READ_CHUNK = 500


class SQLiteConnector(MsgpackRowsConnector):
    """Stores ``encode(args) -> encode(value)`` rows in table ``table`` of ``path``.

    ``path``: a database file (its directory must exist) or an existing directory (then one
    file per table: ``<path>/<table>.sqlite3``).
    ``busy_timeout_ms``: how long a flush waits for another writer's lock before failing.
    ``synchronous``: ``"NORMAL"`` (default; a flush survives a process crash, the last
    transactions may be lost on power loss) or ``"FULL"`` (durable on power loss, slower).
    """

    def __init__(self, path: str | os.PathLike[str], table: str = "kv", *,
                 id: str | None = None, busy_timeout_ms: int = 30000,
                 synchronous: str = "NORMAL") -> None:
        if not isinstance(table, str) or not _IDENT.match(table):
            raise ValueError(f"invalid SQLite table name {table!r}: use 1 to 63 letters, digits "
                             "and _, not starting with a digit")
        if not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be an int >= 0, got {busy_timeout_ms!r}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, f"{table}.sqlite3")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"SQLite connector: directory {directory!r} for database {path!r} does not exist"
            )
        self.path = path
        self.table = table
        self.id = id or f"sqlite:{table}"
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ship configuration only; each shard opens its own connection.
        state = self.__dict__.copy()
        state["_db"] = None
        return state

    @property
    def flush_process_safe(self) -> bool:  # type: ignore[override]
        """A database file can be flushed from a child process (WAL lets this shard read
        meanwhile); an in-memory database lives in one connection only."""
        return self.path != ":memory:" and "mode=memory" not in self.path

    def __repr__(self) -> str:
        return f"SQLiteConnector(path={self.path!r}, table={self.table!r}, id={self.id!r})"

    def connect(self) -> None:
        """Open this shard's connection and create the table if absent."""
        if self._db is not None:
            return
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in flush).
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                 isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise sqlite3.OperationalError(f"cannot open SQLite database {self.path!r}: {e}") from e
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                self._setup(db)
                break
            except sqlite3.OperationalError as e:
                # Shards opening a new file at once: SQLite may refuse the WAL switch at once
                # ("database is locked") instead of waiting in its busy handler, so wait here.
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    db.close()
                    raise
                time.sleep(0.01)
            except BaseException:
                db.close()
                raise
        self._db = db

    def _setup(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal" and self.path != ":memory:":
            raise sqlite3.OperationalError(
                f"SQLite database {self.path!r} could not switch to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute(f'CREATE TABLE IF NOT EXISTS "{self.table}" '
                   "(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def disconnect(self) -> None:
        """Close the connection (a later call reconnects)."""
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
        """The value stored for ``args``, or None."""
        row = self.db.execute(f'SELECT v FROM "{self.table}" WHERE k = ?',
                              (encode_value(args),)).fetchone()
        return None if row is None else decode_value(row[0])

    def read_many(self, args_list: Sequence[Any]) -> list[Any]:
        """The values stored for each of ``args_list`` (None where absent), in order."""
        return [None if v is None else decode_value(v)
                for v in self.read_many_encoded([encode_value(a) for a in args_list])]

    def read_many_encoded(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored msgpack bytes for each encoded key (None where absent), in order."""
        found: dict[bytes, bytes] = {}
        db = self.db
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _READ_CHUNK):
            chunk = unique[i:i + _READ_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(db.execute(
                f'SELECT k, v FROM "{self.table}" WHERE k IN ({marks})', chunk).fetchall())
        return [found.get(k) for k in keys]



    def delete(self, args: Any) -> Any:
        """A delete payload: the row goes at the next flush."""
        return (encode_value(args), None)

    def flush(self, payloads: list[Any]) -> None:
        """Upsert (or, for a delete, remove) ``payloads`` in one transaction."""
        if not payloads:
            return
        db = self.db
        # One payload per key (the shard coalesces), so upserts and deletes never collide.
        deletes = [(k,) for k, v in payloads if v is None]
        if deletes:
            payloads = [p for p in payloads if p[1] is not None]
        db.execute("BEGIN IMMEDIATE")  # take the write lock now, waiting busy_timeout_ms
        try:
            db.executemany(
                f'INSERT INTO "{self.table}" (k, v) VALUES (?, ?) '
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v", payloads)
            if deletes:
                db.executemany(f'DELETE FROM "{self.table}" WHERE k = ?', deletes)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
