"""Contract and specific tests of the embedded connectors: memory, SQLite, an async one."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.connectors.testing import ConnectorContract, Outage, require_service
from persistroids_dist.shard import ShardCore


class TestMemoryContract(ConnectorContract):
    # The memory "store" lives in one instance, so hand out the same one: that is what a shard
    # sees. Tests needing a second instance on one store still pass because it is shared.
    def make_connector(self) -> MemoryConnector:
        if not hasattr(self, "_mem"):
            self._mem = MemoryConnector(id="mem")
        return self._mem

    def test_pickled_before_and_after_connect(self) -> None:
        pytest.skip("a pickled MemoryConnector is a separate store by design")


class TestSQLiteContract(ConnectorContract):
    duplicate_keys_in_batch = True

    def make_connector(self) -> SQLiteConnector:
        return SQLiteConnector(self.tmp_path / "db.sqlite3", table="kv_" + self.name)

    def make_outage(self) -> Outage:
        conn = SQLiteConnector(self.tmp_path / "db.sqlite3", table="kv_" + self.name,
                               busy_timeout_ms=100)

        @contextlib.contextmanager
        def down() -> Iterator[None]:
            # Another process holding the write lock: flushes time out with "locked".
            other = sqlite3.connect(self.tmp_path / "db.sqlite3", isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                other.execute("ROLLBACK")
                other.close()

        return Outage(conn, down)


class AsyncDictConnector:
    """A minimal connector whose methods are all coroutines (a dict shared per name)."""

    stores: dict[str, dict[bytes, bytes]] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False

    def get_id(self) -> str:
        return "async-dict"

    async def connect(self) -> None:
        await asyncio.sleep(0)
        self.store = self.stores.setdefault(self.name, {})

    async def disconnect(self) -> None:
        await asyncio.sleep(0)

    async def read(self, args: Any) -> Any:
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("async store is down")
        data = self.store.get(encode_value(args))
        return None if data is None else decode_value(data)

    async def write(self, args: Any, value: Any) -> Any:
        return (encode_value(args), encode_value(value))

    async def flush(self, payloads: list[Any]) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("async store is down")
        self.store.update(payloads)


class TestAsyncContract(ConnectorContract):
    duplicate_keys_in_batch = True

    def make_connector(self) -> AsyncDictConnector:
        return AsyncDictConnector(self.name)

    def make_outage(self) -> Outage:
        conn = self.make_connector()

        @contextlib.contextmanager
        def down() -> Iterator[None]:
            conn.down = True
            try:
                yield
            finally:
                conn.down = False

        return Outage(conn, down)

    def cleanup(self) -> None:
        AsyncDictConnector.stores.pop(self.name, None)


# -- SQLite specifics ------------------------------------------------------------------------
def test_sqlite_bad_table_name(tmp_path: Any) -> None:
    for bad in ("kv; DROP TABLE x", "1abc", "", "a" * 64, 'kv"'):
        with pytest.raises(ValueError, match="invalid SQLite table name"):
            SQLiteConnector(tmp_path / "db", table=bad)


def test_sqlite_missing_directory(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SQLiteConnector(tmp_path / "nope" / "db.sqlite3")


def test_sqlite_file_per_cache_and_wal(tmp_path: Any) -> None:
    a = SQLiteConnector(tmp_path, table="users")
    b = SQLiteConnector(tmp_path, table="orders")
    assert a.path == str(tmp_path / "users.sqlite3")
    assert b.path == str(tmp_path / "orders.sqlite3")
    for c in (a, b):
        c.connect()
        assert c.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        c.flush([c.write("k", c.table)])
    assert a.read("k") == "users" and b.read("k") == "orders"
    pickle.loads(pickle.dumps(a))  # the open connection is not pickled
    a.disconnect()
    b.disconnect()


def test_sqlite_flush_is_one_transaction(tmp_path: Any) -> None:
    conn = SQLiteConnector(tmp_path / "db.sqlite3")
    conn.connect()
    conn.flush([conn.write("a", 1)])
    with pytest.raises(sqlite3.Error):
        conn.flush([conn.write("a", 2), (b"k", object())])  # a bad row rolls back all
    assert conn.read("a") == 1
    assert not conn.db.in_transaction
    conn.disconnect()


def test_sqlite_unencodable_value_fails_at_write(tmp_path: Any) -> None:
    conn = SQLiteConnector(tmp_path / "db.sqlite3")
    conn.connect()
    with pytest.raises(TypeError, match="cannot encode"):
        conn.write("k", object())
    core = ShardCore([conn])
    with pytest.raises(TypeError):
        core.put("k", {1, 2})
    assert core.metrics()["pending"] == 0
    core.close(disconnect=True)


def test_require_service_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERSISTROIDS_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not reachable at 127.0.0.1:1"):
        require_service("nothing", "127.0.0.1", 1)
    monkeypatch.setenv("PERSISTROIDS_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="PERSISTROIDS_REQUIRE_SERVICES=1"):
        require_service("nothing", "127.0.0.1", 1)


def _open_and_write(path: str, i: int, start: Any) -> None:
    from persistroids_dist.connectors.sqlite import SQLiteConnector

    conn = SQLiteConnector(path)
    start.wait()
    conn.connect()
    conn.flush([conn.write(("k", i), i)])
    conn.disconnect()


def test_many_sqlite_connectors_opening_one_new_file_at_once(tmp_path):
    """Shards start together: each process opens (and switches to WAL) the same new file.
    The race is timing-dependent, so it is run on several fresh files."""
    import multiprocessing

    from persistroids_dist.connectors.sqlite import SQLiteConnector

    ctx = multiprocessing.get_context("fork")
    for attempt in range(12):
        path = str(tmp_path / f"fresh{attempt}.db")
        start = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_and_write, args=(path, i, start)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4, f"attempt {attempt}"
        reader = SQLiteConnector(path)
        assert reader.read_many([("k", i) for i in range(4)]) == list(range(4))
        reader.disconnect()
