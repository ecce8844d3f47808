"""A shard with ``background=True`` (how every shard host runs): connectors are called on a
store thread, never under the lock that serves cached keys. No Ray; real threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from persistroids_dist import BaseConnector, FlushError, StoreUnavailableError
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.shard import ShardCore

WAIT = 10.0  # a generous bound for "it happened", never a speed claim


class GateStore(BaseConnector):
    """A dict store whose flushes and reads can be held at a gate (a store that hangs)."""

    def __init__(self) -> None:
        self.id = "gate"
        self.store: dict[Any, Any] = {}
        self.flush_gate = threading.Event()
        self.flush_gate.set()
        self.read_gate = threading.Event()
        self.read_gate.set()
        self.in_flush = threading.Event()
        self.in_read = threading.Event()
        self.fail_flush = False
        self.threads: set[str] = set()
        self.after_read: Any = None  # called by read() once it has its value

    def read(self, args: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        self.in_read.set()
        assert self.read_gate.wait(WAIT)
        value = self.store.get(args)
        job, self.after_read = self.after_read, None
        if job is not None:
            job()
        return value

    def write(self, args: Any, value: Any) -> Any:
        return (args, value)

    def flush(self, payloads: list[Any]) -> None:
        self.threads.add(threading.current_thread().name)
        self.in_flush.set()
        assert self.flush_gate.wait(WAIT)
        if self.fail_flush:
            raise RuntimeError("store refuses the batch")
        for k, v in payloads:
            self.store[k] = v


def core(conn: GateStore, **kw: Any) -> ShardCore:
    kw.setdefault("writes_threshold", 10_000)
    kw.setdefault("millis_threshold", 60_000)
    return ShardCore([conn], background=True, **kw)


def hanging_flush(c: ShardCore, conn: GateStore) -> threading.Thread:
    """Start a flush of ``c`` in a thread; return once it hangs inside the store (until
    ``conn.flush_gate`` is set)."""
    conn.flush_gate.clear()
    t = threading.Thread(target=c.flush, daemon=True)
    t.start()
    assert conn.in_flush.wait(WAIT)
    return t


def test_cached_reads_writes_and_metrics_are_served_while_a_flush_hangs_in_the_store():
    conn = GateStore()
    c = core(conn)
    try:
        c.put("cached", 1)
        c.put("k", 2)
        t = hanging_flush(c, conn)
        # The flush is inside the store, holding nothing the cache serves from.
        assert c.get("cached") == 1
        c.put("new", 3)
        assert c.get("new") == 3
        m = c.metrics()
        assert m["flushing"] is True and m["pending"] == 1  # "new", taken after the snapshot
        conn.flush_gate.set()
        t.join(WAIT)
        assert not t.is_alive()
        assert conn.store == {"cached": 1, "k": 2}
        c.flush()
        assert conn.store["new"] == 3
        # Every store call ran on the store thread, none in a caller's.
        assert conn.threads == {"persistroids-store-0"}
    finally:
        conn.flush_gate.set()
        c.close()


def test_a_miss_fails_after_store_timeout_s_while_cached_keys_keep_working():
    conn = GateStore()
    conn.store["far"] = 7
    c = core(conn, store_timeout_s=0.2)
    try:
        c.put("cached", 1)
        conn.read_gate.clear()
        with pytest.raises(StoreUnavailableError, match="store_timeout_s=0.2"):
            c.get("far")
        assert c.get("cached") == 1
        assert c.metrics()["store_timeouts"] == 1
        conn.read_gate.set()
        assert c.get("far") == 7  # the store answers again: the miss is read
    finally:
        conn.read_gate.set()
        c.close()


def test_a_miss_queued_behind_a_hanging_flush_times_out_too():
    conn = GateStore()
    c = core(conn, store_timeout_s=0.2)
    try:
        c.put("k", 1)
        t = hanging_flush(c, conn)
        with pytest.raises(StoreUnavailableError):
            c.get("elsewhere")
        conn.flush_gate.set()
        t.join(WAIT)
        assert c.get("elsewhere") is None
    finally:
        conn.flush_gate.set()
        c.close()


def test_a_write_during_a_flush_of_the_same_key_wins_in_the_store():
    conn = GateStore()
    c = core(conn)
    try:
        c.put("k", "old")
        t = hanging_flush(c, conn)
        c.put("k", "new")  # arrives while "old" is in the store's hands
        conn.flush_gate.set()
        t.join(WAIT)
        c.flush()
        assert conn.store["k"] == "new"
        assert c.get("k") == "new"
    finally:
        conn.flush_gate.set()
        c.close()


def test_a_failed_flush_keeps_its_payloads_under_newer_writes():
    conn = GateStore()
    c = core(conn, max_attempts=0)
    try:
        c.put("a", 1)
        c.put("b", 1)
        conn.fail_flush = True
        conn.flush_gate.clear()
        errors: list[BaseException] = []

        def flush() -> None:
            try:
                c.flush()
            except FlushError as e:
                errors.append(e)

        t = threading.Thread(target=flush)
        t.start()
        assert conn.in_flush.wait(WAIT)
        c.put("a", 2)  # newer than the payload the failing flush holds
        conn.flush_gate.set()
        t.join(WAIT)
        assert errors, "the flush should have failed"
        assert c.metrics()["pending"] == 2
        conn.fail_flush = False
        c.flush()
        assert conn.store == {"a": 2, "b": 1}
    finally:
        conn.flush_gate.set()
        c.close()


def test_a_read_that_raced_a_write_and_its_flush_never_caches_the_older_value():
    # The read of "k" got the store's old value; before its answer is cached, "k" is
    # written, flushed and evicted (here from inside the store's read, on the store thread,
    # while the reader waits with the lock released). The read may answer the old value
    # (it overlapped the write), but must not cache it: the next read sees the new one.
    conn = GateStore()
    conn.store["k"] = "old"
    c = core(conn, max_entries=2)
    try:
        conn.after_read = lambda: write_flush_evict(c)
        got = c.get("k")
        assert got in ("old", "new")
        assert conn.store["k"] == "new"
        assert c.get("k") == "new"
    finally:
        c.close()


def test_two_reads_in_flight_that_raced_a_write_never_cache_the_older_value():
    # As above, with a second read of "k" in flight at the same time. Found by the
    # evictions-to-SQLite linearizability test in CI: whether a load had been overtaken by
    # a write was marked per key and handed to the LAST load of the key to finish, so the
    # first to finish cached the old value it read (and an update computed from it).
    conn = GateStore()
    conn.store["k"] = "old"
    c = core(conn, max_entries=2)
    second_got: list[Any] = []
    second = threading.Thread(target=lambda: second_got.append(c.get("k")), daemon=True)

    def second_read_then_write_flush_evict() -> None:
        misses = c.metrics()["misses"]
        second.start()
        assert _until(lambda: c.metrics()["misses"] > misses)  # its load is registered
        write_flush_evict(c)
        conn.read_gate.clear()  # the second read's store call waits: the first ends first

    try:
        conn.after_read = second_read_then_write_flush_evict
        assert c.get("k") in ("old", "new")  # overlapped the write: either is right
        assert not c.contains(encode_key("k")) or c.get("k") == "new"  # old not cached
        conn.read_gate.set()
        second.join(WAIT)
        assert not second.is_alive() and second_got[0] in ("old", "new")
        assert conn.store["k"] == "new"
        assert c.get("k") == "new"
    finally:
        conn.read_gate.set()
        c.close()


def write_flush_evict(c: ShardCore) -> None:
    """Write "k", flush it, then write and flush fillers until "k" is evicted (max_entries=2)."""
    c.put("k", "new")
    c.flush()
    for i in range(3):
        c.put(f"filler{i}", i)
        c.flush()
    assert not c.contains(encode_key("k"))  # evicted


def _until(cond: Any) -> bool:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_concurrent_updates_of_a_key_that_must_be_read_first_lose_nothing():
    conn = GateStore()
    conn.store["n"] = 100
    c = core(conn)
    kb = encode_key("n")

    def add_one(v: Any) -> Any:
        return v + 1

    try:
        conn.read_gate.clear()
        threads = [threading.Thread(target=c.update, args=(kb, None, add_one))
                   for _ in range(8)]
        for t in threads:
            t.start()
        assert conn.in_read.wait(WAIT)
        time.sleep(0.05)  # let the others queue behind the read
        conn.read_gate.set()
        for t in threads:
            t.join(WAIT)
        assert decode_value(c.read(kb)) == 108
    finally:
        conn.read_gate.set()
        c.close()


def test_a_threshold_flush_runs_on_the_flusher_not_in_the_writer():
    conn = GateStore()
    c = core(conn, writes_threshold=3)
    try:
        conn.flush_gate.clear()
        for i in range(5):
            c.write(encode_key(i), None, encode_value(i))  # returns: the flusher flushes
        assert conn.in_flush.wait(WAIT)
        assert c.get(0) == 0
        conn.flush_gate.set()
        c.flush()
        assert conn.store == {i: i for i in range(5)}
        assert "persistroids-flusher-0" not in conn.threads  # the store thread did the I/O
    finally:
        conn.flush_gate.set()
        c.close()
