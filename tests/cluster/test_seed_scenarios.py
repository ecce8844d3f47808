"""The seed's test scenarios (persistroids t_core, t_thresholds, t_facade, t_connector,
t_checkpoint, t_motivation and the README metrics example), ported to the Ray-sharded cache.

Connectors run in the shard processes, so every store a test must observe is a SQLite
database or a file under the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from ray import cloudpickle

import persistroids_dist as pd

# The shard processes cannot import this module (tests/ is not a package on their path), so its
# connectors and helper functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NO_TIMER = 600_000  # a millis_threshold that never passes during a test


# -- stores the test process can observe ---------------------------------------------------


def _connect(path: str, wal: bool = True) -> sqlite3.Connection:
    # Shards call a connector from more than one thread (never two at once).
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    if wal:  # persistent in the file; switching needs a lock that concurrent shards contend for
        db.execute("PRAGMA journal_mode=WAL")
    return db


def _ensure_table(db: sqlite3.Connection, table: str) -> None:
    db.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (k TEXT PRIMARY KEY, v TEXT NOT NULL)')


def table_rows(path: str | Path, table: str) -> dict[str, Any]:
    """Everything in ``table`` as ``{JSON of the args: value}``."""
    db = _connect(str(path))
    try:
        _ensure_table(db, table)
        return {k: json.loads(v) for k, v in db.execute(f'SELECT k, v FROM "{table}"')}
    finally:
        db.close()


def table_items(path: str | Path, table: str) -> dict[Any, Any]:
    """Everything in ``table`` as ``{args: value}`` (for hashable args)."""
    return {json.loads(k): v for k, v in table_rows(path, table).items()}


def put_items(path: str | Path, table: str, items: Any) -> None:
    """Store ``items`` (a dict, or ``(args, value)`` pairs) in ``table``."""
    pairs = items.items() if isinstance(items, dict) else items
    db = _connect(str(path))
    try:
        _ensure_table(db, table)
        db.executemany(f'INSERT OR REPLACE INTO "{table}" (k, v) VALUES (?, ?)',
                       [(json.dumps(k), json.dumps(v)) for k, v in pairs])
    finally:
        db.close()


class SqlDictConnector(pd.BaseConnector):
    """The seed's atom-backed test connector, on a SQLite table: read ``db[args]``, write
    buffers ``{args: value}``. ``read_only``: write deletes ``args`` from this store at once and
    buffers an empty payload (the seed's migrating connector)."""

    def __init__(self, id: str, path: str | Path, table: str, read_only: bool = False) -> None:
        self.id = id
        self.path = str(path)
        self.table = table
        self.read_only = read_only
        self._db: sqlite3.Connection | None = None
        db = _connect(self.path)  # here, in the test process: create the file and table once
        try:
            _ensure_table(db, table)
        finally:
            db.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_db": None}

    def connect(self) -> None:
        self._db = _connect(self.path, wal=False)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.connect()
        assert self._db is not None
        return self._db

    def read(self, args: Any) -> Any:
        row = self.db.execute(f'SELECT v FROM "{self.table}" WHERE k = ?',
                              (json.dumps(args),)).fetchone()
        return None if row is None else json.loads(row[0])

    def write(self, args: Any, value: Any) -> Any:
        if self.read_only:
            self.db.execute(f'DELETE FROM "{self.table}" WHERE k = ?', (json.dumps(args),))
            return {}
        return {json.dumps(args): json.dumps(value)}

    def flush(self, payloads: list[Any]) -> None:
        rows = [kv for payload in payloads for kv in payload.items()]
        if rows:
            self.db.executemany(
                f'INSERT OR REPLACE INTO "{self.table}" (k, v) VALUES (?, ?)', rows)


class FileConnector(pd.BaseConnector):
    """The seed's file-system connector: the args are a file path; read slurps the file, write
    buffers ``(path, content)``, flush spits each file."""

    id = "fs-connector"

    def read(self, path: str) -> Any:
        with open(path) as f:
            return f.read()

    def write(self, path: str, value: Any) -> Any:
        return (path, value)

    def flush(self, payloads: list[Any]) -> None:
        for path, data in payloads:
            with open(path, "w") as f:
                f.write(data)


def append_line(path: str, record: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_lines(path: str | Path) -> list[Any]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


class RecordingConnector(pd.BaseConnector):
    """The seed's t_connector mock: read gives ``value-of-<args>``; write buffers a payload,
    except for args starting with "other" (written through: None); flush logs its batch."""

    id = "my-connector"

    def __init__(self, log_path: str | Path) -> None:
        self.log_path = str(log_path)

    def read(self, args: Any) -> Any:
        return f"value-of-{args}"

    def write(self, args: Any, value: Any) -> Any:
        if str(args).startswith("other"):
            return None
        return {"payload-for": args, "value": value}

    def flush(self, payloads: list[Any]) -> None:
        append_line(self.log_path, payloads)


def poll(fn: Any, timeout_s: float = 20.0, interval_s: float = 0.02) -> Any:
    """Call ``fn`` until it returns something truthy or ``timeout_s`` passes; return the last
    result."""
    return wait_for(fn, timeout_s, interval_s)


def totals(metrics: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: metrics["total"][n] for n in names}


# -- t_core --------------------------------------------------------------------------------


@pytest.mark.parametrize("op, expected", [
    (lambda c: c.read(None), None),
    (lambda c: c.read("val"), None),
    (lambda c: c.write(None, None), None),
    (lambda c: c.write("key", None), None),
    (lambda c: c.write(None, "val"), "val"),
    (lambda c: c.write("key", "val"), "val"),
    (lambda c: (c.write("key", "val"), c.read("key"))[1], "val"),
], ids=["read-nil", "read-missing", "write-nil-nil", "write-key-nil", "write-nil-val",
        "write-key-val", "write-then-read"])
def test_basic_read_write_ops_return_the_seed_values(make_cache, op, expected) -> None:
    cache = make_cache()
    assert op(cache) == expected
    cache.shutdown()


def test_init_fn_bootstraps_non_existing_values(make_cache) -> None:
    cache = make_cache(init_fn=lambda args: "val")
    assert cache.read("key") == "val"
    assert cache.read(("any", 1)) == "val"
    m = cache.shutdown()
    assert m["total"]["flush"] == 0  # init values are cached, never persisted


def test_cache_key_controls_cache_granularity(make_cache) -> None:
    cache = make_cache(cache_key=lambda args: args[0])
    cache.write(["key", "write args"], 1)
    assert cache.read(["key", "read args"]) == 1
    cache.write(["key", "other write args"], 2)
    assert cache.read(["key", "other read args"]) == 2
    m = cache.shutdown()
    assert totals(m, "lookup", "read", "write", "flush") == {
        "lookup": 2, "read": 0, "write": 2, "flush": 1}


def test_cache_key_on_dict_args_and_stores_get_the_raw_args(make_cache, tmp_path) -> None:
    db = tmp_path / "db.sqlite3"
    conn = SqlDictConnector("users", db, "users")
    cache = make_cache([conn], cache_key=lambda a: a["id"])
    cache.write({"id": 1, "name": "ann"}, {"visits": 1})
    assert cache.read({"id": 1, "name": "other args"}) == {"visits": 1}
    assert cache.read({"id": 1}) == {"visits": 1}
    cache.write({"id": 1, "name": "ann", "v": 2}, {"visits": 2})
    assert cache.read({"id": 1, "anything": True}) == {"visits": 2}
    # A miss reads the stores with the raw args, not the cache key.
    put_items(db, "users", [({"id": 3, "name": "bob"}, {"visits": 7})])
    assert cache.read({"id": 3, "name": "bob"}) == {"visits": 7}
    m = cache.shutdown()
    assert m["total"]["flush"] == 1  # one cache key flushed, its last write won
    stored = table_rows(db, "users")
    assert stored[json.dumps({"id": 1, "name": "ann", "v": 2})] == {"visits": 2}
    assert json.dumps({"id": 1, "name": "ann"}) not in stored


def test_read_increment_write_100_times_is_one_store_read_and_one_flush(make_cache) -> None:
    cache = make_cache()
    for _ in range(100):
        val = cache.read("key")
        cache.write("key", (val or 0) + 1)
    assert cache.read("key") == 100
    m = cache.shutdown()
    assert totals(m, "lookup", "read", "write", "flush") == {
        "lookup": 101, "read": 1, "write": 100, "flush": 1}


def test_readme_metrics_example_comes_out_exactly(make_cache) -> None:
    cache = make_cache()
    for _ in range(3):
        cache.write("key", (cache.read("key") or 0) + 1)
    m = cache.shutdown()
    assert totals(m, "lookup", "read", "write", "flush") == {
        "lookup": 3, "read": 1, "write": 3, "flush": 1}


def test_cached_none_and_false_are_hits_unlike_the_seed(make_cache) -> None:
    cache = make_cache()
    assert cache.read("missing") is None
    assert cache.read("missing") is None
    cache.write("f", False)
    assert cache.read("f") is False
    cache.write("n", None)
    assert cache.read("n") is None
    m = cache.metrics()["total"]
    assert (m["lookup"], m["hits"], m["misses"], m["read"]) == (4, 3, 1, 1)


# -- t_connector ---------------------------------------------------------------------------


def test_connector_relationship_read_write_flush(make_cache, tmp_path) -> None:
    log = tmp_path / "flushes.jsonl"
    cache = make_cache([RecordingConnector(log)], millis_threshold=NO_TIMER)
    assert cache.read("my-args") == "value-of-my-args"
    assert cache.write("my-args", "my-value") == "my-value"
    assert cache.write("other-args", "my-value") == "my-value"  # written through, not buffered
    assert cache.metrics()["total"]["pending"] == 1
    assert cache.flush_now() == 1
    batches = [b for b in read_lines(log) if b]
    assert batches == [[{"payload-for": "my-args", "value": "my-value"}]]
    assert cache.flush_now() is None  # nothing pending


# -- t_thresholds ----------------------------------------------------------------------------


def test_writes_threshold_flushes_when_more_keys_are_pending(make_cache, tmp_path) -> None:
    db = tmp_path / "db.sqlite3"
    cache = make_cache([SqlDictConnector("my-connector", db, "kv")], writes_threshold=2,
                       millis_threshold=NO_TIMER, num_shards=1)
    cache.write("k1", "val")
    cache.write("k2", "val", wait=True)
    assert table_items(db, "kv") == {}  # no flush
    cache.write("k3", "val", wait=True)  # 3 pending keys > writes_threshold
    # The seed flushed inside that write; here the shard's flusher thread does it at once,
    # after the write is acknowledged (a store never delays a write's answer).
    poll(lambda: table_items(db, "kv") == {"k1": "val", "k2": "val", "k3": "val"})
    assert cache.metrics()["total"]["pending"] == 0


def test_write_only_workload_is_flushed_by_the_timer(make_cache, tmp_path) -> None:
    db = tmp_path / "db.sqlite3"
    threshold_ms = 200
    cache = make_cache([SqlDictConnector("my-connector", db, "kv")],
                       millis_threshold=threshold_ms)
    started = time.monotonic()
    cache.write("key", "val")
    cache.write("other", "val2", wait=True)
    early = table_items(db, "kv")
    if time.monotonic() - started < threshold_ms / 1000 / 2:
        assert early == {}  # still buffered
    # The seed never flushed a write-only workload; here the shards' timers do (within ~3x the
    # threshold normally; the deadline is generous for a loaded machine).
    stored = poll(lambda: table_items(db, "kv") == {"key": "val", "other": "val2"})
    assert stored, table_items(db, "kv")
    m = cache.metrics()["total"]
    assert m["lookup"] == 0 and m["read"] == 0
    assert m["pending"] == 0 and m["flush"] == 2


def test_store_is_flushed_before_it_is_read_for_a_key_with_a_buffered_newer_value(
        make_cache, tmp_path) -> None:
    db = tmp_path / "db.sqlite3"
    put_items(db, "kv", {"key": "old"})
    cache = make_cache([SqlDictConnector("my-connector", db, "kv")], max_entries=2,
                       millis_threshold=NO_TIMER, num_shards=1)
    assert cache.read("key") == "old"
    cache.write("key", "new")
    cache.write("b", 1)
    cache.write("c", 2)  # over max_entries: "key" is evicted once the flusher stored it
    # The seed flushed inside the write that went over; the flusher thread does it here.
    assert poll(lambda: cache.metrics()["total"]["evictions"] >= 1)
    assert table_items(db, "kv")["key"] == "new"
    assert cache.read("key") == "new"  # from the store, which has the newer value
    m = cache.metrics()["total"]
    assert m["read"] == 2


# -- t_facade ------------------------------------------------------------------------------


def _facade_stores(tmp_path: Path) -> Path:
    db = tmp_path / "facade.sqlite3"
    put_items(db, "a", {"key": {"fragment-a": "val-1"}})
    put_items(db, "b", {"key": {"fragment-b": "val-2"}})
    return db


def test_fragments_across_stores_are_merged_on_read(make_cache, tmp_path) -> None:
    db = _facade_stores(tmp_path)
    cache = make_cache([SqlDictConnector("connector-a", db, "a", read_only=True),
                        SqlDictConnector("connector-b", db, "b", read_only=True)])
    assert cache.read("key") == {"fragment-a": "val-1", "fragment-b": "val-2"}
    cache.shutdown()


def test_migration_moves_data_from_the_old_store_to_the_new(make_cache, tmp_path) -> None:
    db = _facade_stores(tmp_path)
    cache = make_cache([SqlDictConnector("connector-a", db, "a", read_only=True),
                        SqlDictConnector("connector-b", db, "b")])
    val = dict(cache.read("key"), **{"fragment-c": "val-3"})
    assert cache.write("key", val) == val
    cache.shutdown()
    assert val == {"fragment-a": "val-1", "fragment-b": "val-2", "fragment-c": "val-3"}
    assert table_items(db, "a") == {}
    assert table_items(db, "b") == {"key": val}


def test_writes_are_duplicated_to_every_store_for_redundancy(make_cache, tmp_path) -> None:
    db = _facade_stores(tmp_path)
    cache = make_cache([SqlDictConnector("connector-a", db, "a"),
                        SqlDictConnector("connector-b", db, "b")])
    val = dict(cache.read("key"), **{"fragment-c": "val-3"})
    cache.write("key", val)
    cache.shutdown()
    assert table_items(db, "a") == {"key": val}
    assert table_items(db, "b") == {"key": val}


def test_custom_merge_combines_the_stores_reads(make_cache, tmp_path) -> None:
    db = tmp_path / "facade.sqlite3"
    put_items(db, "a", {"key": 1})
    put_items(db, "b", {"key": 2})
    cache = make_cache([SqlDictConnector("connector-a", db, "a"),
                        SqlDictConnector("connector-b", db, "b")],
                       merge_query_fn=lambda *xs: sum(x or 0 for x in xs))
    assert cache.read("key") == 3
    assert cache.read("nowhere") == 0
    cache.shutdown()


# -- t_checkpoint --------------------------------------------------------------------------


def _db_snapshot(path: str) -> dict[str, Any]:
    primary = table_items(path, "primary")
    secondary = table_items(path, "secondary").get("secondary", 0)
    return {"primary": primary, "secondary": secondary}


def _make_handler(path: str) -> Any:
    def handler(state: Any) -> dict[str, Any]:
        put_items(path, "secondary", {"secondary": state})
        return _db_snapshot(path)
    return handler


def test_fibonacci_checkpoints_stay_consistent_with_the_data(make_cache, tmp_path) -> None:
    path = str(tmp_path / "fib.sqlite3")
    initial = {"primary": {}, "secondary": 0}
    assert _db_snapshot(path) == initial
    cache = make_cache([SqlDictConnector("my-connector", path, "primary")],
                       init_fn=lambda args: 0, checkpoint_handler=_make_handler(path),
                       millis_threshold=NO_TIMER)
    i, n1 = 5, 1
    while True:
        n2 = cache.read("fib", checkpoint=n1)
        if i == 0:
            assert cache.flush_now(checkpoint=n1) == {"primary": {"fib": 5}, "secondary": 8}
            assert _db_snapshot(path) == {"primary": {"fib": 5}, "secondary": 8}
        else:
            assert _db_snapshot(path) == initial  # no flush yet, no checkpoint
        cache.write("fib", n1, checkpoint=n1)
        if i == 0:
            break
        i, n1 = i - 1, n2 + n1
    cache.shutdown()
    assert _db_snapshot(path) == {"primary": {"fib": 8}, "secondary": 8}


def test_flush_now_returns_the_handler_result_after_checkpointed_calls(
        make_cache, tmp_path) -> None:
    # The seed's Fibonacci test: (p/flush-now p+checkpoint) => {:primary {"fib" 5} :secondary 8}
    path = str(tmp_path / "fib.sqlite3")
    cache = make_cache([SqlDictConnector("my-connector", path, "primary")],
                       checkpoint_handler=_make_handler(path), millis_threshold=NO_TIMER)
    cache.write("fib", 5, checkpoint=5)
    assert cache.flush_now(checkpoint=8) == {"primary": {"fib": 5}, "secondary": 8}


def test_checkpoint_recorded_by_a_write_runs_after_that_shards_flush(
        make_cache, tmp_path) -> None:
    path = str(tmp_path / "fib.sqlite3")
    cache = make_cache([SqlDictConnector("my-connector", path, "primary")],
                       init_fn=lambda args: 0, checkpoint_handler=_make_handler(path),
                       writes_threshold=0, millis_threshold=NO_TIMER)
    fib, nxt = 0, 1
    for _ in range(5):
        fib, nxt = nxt, fib + nxt
        # writes_threshold=0: the shard's flusher flushes this write, then saves the
        # checkpoint (the seed did both inside the write).
        cache.write("fib", fib, checkpoint=nxt)
        want = {"primary": {"fib": fib}, "secondary": nxt}
        assert poll(lambda want=want: _db_snapshot(path) == want), _db_snapshot(path)
    assert (fib, nxt) == (5, 8)
    cache.shutdown()
    assert _db_snapshot(path) == {"primary": {"fib": 5}, "secondary": 8}


def test_checkpoint_handler_is_not_called_when_nothing_is_pending(make_cache, tmp_path) -> None:
    path = str(tmp_path / "ckpt.sqlite3")
    cache = make_cache([SqlDictConnector("my-connector", path, "primary")],
                       checkpoint_handler=_make_handler(path), millis_threshold=NO_TIMER)
    assert cache.flush_now(checkpoint=1) is None
    assert cache.read("key", checkpoint=2) is None
    assert cache.flush_now(checkpoint=3) is None
    cache.shutdown()
    assert table_items(path, "secondary") == {}


def test_flush_now_with_a_checkpoint_returns_the_handlers_result(make_cache, tmp_path) -> None:
    path = str(tmp_path / "ckpt.sqlite3")
    cache = make_cache([SqlDictConnector("my-connector", path, "primary")],
                       checkpoint_handler=_make_handler(path), millis_threshold=NO_TIMER)
    cache.write("a", 1)
    cache.write("b", 2)
    assert cache.flush_now(checkpoint="state-1") == {
        "primary": {"a": 1, "b": 2}, "secondary": "state-1"}
    assert cache.flush_now(checkpoint="state-2") is None  # nothing pending: not called
    assert table_items(path, "secondary") == {"secondary": "state-1"}


# -- t_motivation --------------------------------------------------------------------------


def test_101_reads_and_100_appends_are_one_store_read_and_one_flush(make_cache, tmp_path) -> None:
    fs_db = str(tmp_path / "bogus.db")
    with open(fs_db, "w") as f:
        f.write("")
    rng = random.Random(7)

    def do_some_work(read_fn: Any, write_fn: Any) -> str:
        for _ in range(100):
            write_fn(fs_db, read_fn(fs_db) + str(rng.random()))
        return read_fn(fs_db)

    # Directly to the file system, for the expected content.
    direct = do_some_work(lambda p: Path(p).read_text(), lambda p, d: Path(p).write_text(d))
    assert len(direct) > 1000
    Path(fs_db).write_text("")
    rng.seed(7)

    cache = make_cache([FileConnector()], millis_threshold=NO_TIMER)
    via_cache = do_some_work(cache.read, cache.write)
    assert via_cache == direct
    assert Path(fs_db).read_text() == ""  # nothing written yet
    assert cache.flush_now() == 1
    assert Path(fs_db).read_text() == direct
    m = cache.metrics()["total"]
    assert (m["lookup"], m["read"], m["write"], m["flush_calls"], m["flush"]) == (
        101, 1, 100, 1, 1)
