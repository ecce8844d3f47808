"""Focused unit tests of ShardCore (no Ray): thresholds, failures, eviction, re-entrance."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from persistroids_dist import BaseConnector, FlushError
from persistroids_dist import shard as shard_module
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.shard import ShardCore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


class DictConnector(BaseConnector):
    """A store that is a plain dict of this process; ``failing`` makes flush raise."""

    def __init__(self, id: str = "dict", store: dict[Any, Any] | None = None) -> None:
        self.id = id
        self.store: dict[Any, Any] = {} if store is None else store
        self.failing = False
        self.reads: list[Any] = []
        self.batches: list[list[Any]] = []

    def read(self, args: Any) -> Any:
        self.reads.append(args)
        return self.store.get(args)

    def write(self, args: Any, value: Any) -> Any:
        return (args, value)

    def flush(self, payloads: list[Any]) -> None:
        if self.failing:
            raise ConnectionError(f"{self.id} is down")
        self.batches.append(list(payloads))
        self.store.update(payloads)


def make_core(connectors: list[Any] | None = None, **kwargs: Any) -> ShardCore:
    kwargs.setdefault("clock", FakeClock())
    return ShardCore([DictConnector()] if connectors is None else connectors, **kwargs)


def kb(key: Any) -> bytes:
    return encode_key(key)


# -- thresholds --------------------------------------------------------------------------


def test_write_threshold_flushes_on_the_write_that_exceeds_it() -> None:
    conn = DictConnector()
    core = make_core([conn], writes_threshold=3)
    for i in range(3):
        core.put(f"k{i}", i)
    assert conn.store == {}
    assert core.metrics()["pending"] == 3
    core.put("k3", 3)  # the 4th distinct key: more than writes_threshold pending
    assert conn.store == {"k0": 0, "k1": 1, "k2": 2, "k3": 3}
    m = core.metrics()
    assert m["pending"] == 0 and m["flush"] == 4 and m["flush_calls"] == 1


def test_write_threshold_counts_distinct_keys_not_writes() -> None:
    conn = DictConnector()
    core = make_core([conn], writes_threshold=2)
    for i in range(10):
        core.put("a", i)
        core.put("b", i)
    assert conn.store == {}
    assert core.metrics()["pending"] == 2
    core.flush()
    assert conn.store == {"a": 9, "b": 9}
    assert conn.batches == [[("a", 9), ("b", 9)]]  # coalesced: the last payload per key


def test_millis_threshold_flushes_on_tick_once_the_oldest_write_is_old_enough() -> None:
    clock = FakeClock()
    conn = DictConnector()
    core = make_core([conn], millis_threshold=100, clock=clock)
    core.put("a", 1)
    clock.advance_ms(60)
    core.put("b", 2)
    clock.advance_ms(39)
    core.tick()
    assert conn.store == {}
    assert core.metrics()["oldest_pending_ms"] == pytest.approx(99)
    clock.advance_ms(2)  # the oldest pending write ("a") is now 101 ms old
    core.tick()
    assert conn.store == {"a": 1, "b": 2}
    assert core.metrics()["pending"] == 0


def test_tick_with_nothing_pending_does_not_call_the_store() -> None:
    clock = FakeClock()
    conn = DictConnector()
    core = make_core([conn], millis_threshold=10, clock=clock)
    clock.advance_ms(1000)
    core.tick()
    assert conn.batches == []
    assert core.metrics()["flush_calls"] == 0


def test_read_miss_flushes_first_when_a_threshold_has_passed() -> None:
    clock = FakeClock()
    conn = DictConnector()
    core = make_core([conn], millis_threshold=100, clock=clock)
    core.put("a", 1)
    clock.advance_ms(150)
    assert core.get("other") is None  # a miss: the old buffer goes out before the store read
    assert conn.store == {"a": 1}


def test_explicit_flush_returns_the_number_of_keys_flushed() -> None:
    core = make_core()
    assert core.flush() == 0
    core.put("a", 1)
    core.put("b", 2)
    core.put("a", 3)
    assert core.flush() == 2


# -- failures ----------------------------------------------------------------------------


def test_failing_connector_keeps_its_payloads_while_others_flush() -> None:
    good, bad = DictConnector("good"), DictConnector("bad")
    bad.failing = True
    core = make_core([good, bad])
    core.put("a", 1)
    core.put("b", 2)
    with pytest.raises(FlushError) as info:
        core.flush()
    assert set(info.value.errors) == {"bad"}
    assert isinstance(info.value.errors["bad"], ConnectionError)
    assert good.store == {"a": 1, "b": 2}
    assert bad.store == {}
    m = core.metrics()
    assert m["flush_errors"] == 1
    assert m["pending"] == 2
    assert "bad" in m["last_errors"] and "is down" in m["last_errors"]["bad"]
    assert "good" not in m["last_errors"]

    bad.failing = False
    core.put("c", 3)
    assert core.flush() == 3
    assert bad.store == {"a": 1, "b": 2, "c": 3}
    assert good.store == {"a": 1, "b": 2, "c": 3}
    assert core.metrics()["pending"] == 0


class FailingCallConnector(DictConnector):
    """Fails its ``fail_at``-th flush call (0-based) with ``error``; refuses the key
    ``poison`` whenever a batch holds it."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None,
                 poison: Any = None) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at, self.error, self.poison = fail_at, error, poison

    def flush(self, payloads: list[Any]) -> None:
        call, self.calls = self.calls, self.calls + 1
        if call == self.fail_at:
            raise self.error  # type: ignore[misc]
        if any(args == self.poison for args, _ in payloads):
            raise ValueError("poison")
        super().flush(payloads)


def test_a_big_flush_goes_in_chunks_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("persistroids_dist.shard._FLUSH_CHUNK", 3)
    conn = DictConnector()
    core = make_core([conn])
    for i in range(8):
        core.put(i, i)
    assert core.flush() == 8
    assert conn.batches == [[(0, 0), (1, 1), (2, 2)], [(3, 3), (4, 4), (5, 5)], [(6, 6), (7, 7)]]
    assert core.metrics()["pending"] == 0


def test_a_big_flush_on_the_store_thread_empties_its_key_set_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Over one chunk, the flush's key set and size map are emptied item by item on the
    # store thread (see _empty_piecewise), not freed whole under the lock.
    monkeypatch.setattr("persistroids_dist.shard._FLUSH_CHUNK", 3)
    emptied: list[int] = []
    real = shard_module._empty_piecewise
    monkeypatch.setattr("persistroids_dist.shard._empty_piecewise",
                        lambda *cs: (emptied.append(threading.get_ident()), real(*cs)))
    conn = DictConnector()
    core = ShardCore([conn], background=True, writes_threshold=10**6,
                     millis_threshold=10**9)
    try:
        for i in range(8):
            core.put(i, i)
        assert core.flush_count() == 8
        assert conn.store == {i: i for i in range(8)}
        assert emptied and emptied[0] != threading.get_ident()
        assert core.metrics()["pending"] == 0
    finally:
        core.stop()
    s, d = set(range(5)), dict.fromkeys(range(5))
    real(s, d)
    assert s == set() and d == {}


def test_a_chunk_the_store_fails_keeps_it_and_the_rest_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("persistroids_dist.shard._FLUSH_CHUNK", 3)
    conn = FailingCallConnector(fail_at=1, error=ConnectionError("down"))
    core = make_core([conn])
    for i in range(8):
        core.put(i, i)
    with pytest.raises(FlushError):
        core.flush()
    assert conn.store == {0: 0, 1: 1, 2: 2}  # the first chunk; nothing after the failure
    assert conn.calls == 2
    m = core.metrics()
    assert m["pending"] == 5 and m["flush_errors"] == 1
    core.put(4, 40)  # a newer write of a kept key wins
    assert core.flush() == 5
    assert conn.store == {i: 40 if i == 4 else i for i in range(8)}
    assert conn.batches[1:] == [[(3, 3), (4, 40), (5, 5)], [(6, 6), (7, 7)]]


def test_a_poison_payload_in_one_chunk_does_not_hold_back_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("persistroids_dist.shard._FLUSH_CHUNK", 3)
    conn = FailingCallConnector(poison=4)
    core = make_core([conn], max_attempts=1)
    for i in range(8):
        core.put(i, i)
    core.flush()  # 4 becomes a dead letter; the chunk after its chunk is stored too
    assert conn.store == {i: i for i in range(8) if i != 4}
    assert [d["key"] for d in core.dead_letters()] == [4]
    assert core.metrics()["pending"] == 0


def test_write_after_a_failed_flush_replaces_the_kept_payload() -> None:
    conn = DictConnector()
    conn.failing = True
    core = make_core([conn])
    core.put("a", 1)
    with pytest.raises(FlushError):
        core.flush()
    core.put("a", 2)
    conn.failing = False
    core.flush()
    assert conn.store == {"a": 2}
    assert conn.batches == [[("a", 2)]]


def test_timed_flush_failure_is_counted_and_retried_after_a_backoff() -> None:
    clock = FakeClock()
    conn = DictConnector()
    conn.failing = True
    core = make_core([conn], millis_threshold=10, clock=clock)
    core.put("a", 1)
    clock.advance_ms(20)
    core.tick()  # fails quietly: a timed flush never raises
    m = core.metrics()
    assert m["flush_errors"] == 1 and m["pending"] == 1
    conn.failing = False
    clock.advance_ms(10_000)  # past any backoff
    core.tick()
    assert conn.store == {"a": 1}
    assert core.metrics()["pending"] == 0


def test_close_raises_flush_error_and_keeps_data_when_the_store_fails() -> None:
    conn = DictConnector()
    conn.failing = True
    core = make_core([conn])
    core.put("a", 1)
    with pytest.raises(FlushError):
        core.close()
    conn.failing = False
    m = core.close()
    assert conn.store == {"a": 1}
    assert m["pending"] == 0


class RaisingWriteConnector(DictConnector):
    def write(self, args: Any, value: Any) -> Any:
        if value == "bad":
            raise ValueError("cannot store 'bad'")
        return (args, value)


def test_connector_write_raising_caches_and_buffers_nothing_of_that_write() -> None:
    first, second = DictConnector("first"), RaisingWriteConnector("second")
    core = make_core([first, second])
    core.put("a", "good")
    with pytest.raises(ValueError, match="cannot store"):
        core.put("b", "bad")
    assert not core.contains(kb("b"))
    m = core.metrics()
    assert m["write_errors"] == 1 and m["pending"] == 1
    with pytest.raises(ValueError):
        core.put("a", "bad")
    assert core.get("a") == "good"
    core.flush()
    assert first.store == {"a": "good"}  # not even the connector that accepted it got "b"
    assert second.store == {"a": "good"}


# -- re-entrance (a write while a flush is under way) ---------------------------------------


class ReentrantConnector(DictConnector):
    """Its flush writes another key through the shard, as a write racing the flush would."""

    def __init__(self) -> None:
        super().__init__()
        self.core: ShardCore | None = None
        self.reenter: tuple[Any, Any] | None = None

    def flush(self, payloads: list[Any]) -> None:
        job, self.reenter = self.reenter, None
        if job is not None and self.core is not None:
            self.core.put(*job)
        super().flush(payloads)


def test_write_during_a_flush_is_kept_for_the_next_flush() -> None:
    conn = ReentrantConnector()
    core = make_core([conn])
    conn.core = core
    core.put("a", 1)
    conn.reenter = ("b", 2)
    assert core.flush() == 1
    assert conn.store == {"a": 1}
    assert core.get("b") == 2
    assert core.metrics()["pending"] == 1
    assert core.flush() == 1
    assert conn.store == {"a": 1, "b": 2}


def test_write_of_the_flushed_key_during_its_flush_is_not_lost() -> None:
    conn = ReentrantConnector()
    core = make_core([conn])
    conn.core = core
    core.put("a", 1)
    conn.reenter = ("a", 2)
    core.flush()
    assert core.get("a") == 2
    core.flush()
    assert conn.store == {"a": 2}


def test_entries_in_a_failing_flush_stay_cached_when_a_write_races_it() -> None:
    conn = ReentrantConnector()
    conn.failing = True
    core = make_core([conn], max_entries=3)
    conn.core = core
    for i, k in enumerate("cad"):
        core.put(k, i)
    conn.reenter = ("b", 9)  # a 4th entry arrives while c, a, d are being flushed
    with pytest.raises(FlushError):
        core.flush()
    assert core.metrics()["pending"] == 4
    # "Entries with pending writes are never dropped" (ShardCore's docstring).
    assert core.contains(kb("c"))
    assert core.get("c") == 0  # the store is still down: only the cache has it


# -- eviction -----------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_entry() -> None:
    conn = DictConnector(store={"a": 1, "b": 2, "c": 3, "d": 4})
    core = make_core([conn], max_entries=3)
    assert [core.get(k) for k in "abc"] == [1, 2, 3]
    core.get("a")  # "b" is now the least recently used
    core.get("d")
    assert [core.contains(kb(k)) for k in "abcd"] == [True, False, True, True]
    assert core.metrics()["evictions"] == 1
    assert core.metrics()["entries"] == 3
    core.put("c", 30)  # a write also counts as a use: "a" goes next
    core.flush()
    core.get("b")
    assert [core.contains(kb(k)) for k in "abcd"] == [False, True, True, True]


def test_byte_bound_evicts_until_under_max_bytes() -> None:
    store = {k: "x" * 100 for k in "abcd"}
    entry_size = len(kb("a")) + len(encode_value("x" * 100))
    core = make_core([DictConnector(store=store)], max_bytes=3 * entry_size)
    for k in "abc":
        core.get(k)
    assert core.metrics()["bytes"] == 3 * entry_size
    assert core.metrics()["evictions"] == 0
    core.get("d")
    m = core.metrics()
    assert m["bytes"] == 3 * entry_size and m["entries"] == 3 and m["evictions"] == 1
    assert not core.contains(kb("a"))
    core.put("d", "y" * 250)  # grows "d": two older entries must go
    m = core.metrics()
    assert m["bytes"] <= 3 * entry_size
    assert not core.contains(kb("b")) and not core.contains(kb("c"))
    assert core.get("d") == "y" * 250


def test_evicting_a_dirty_entry_flushes_it_instead_of_dropping_it() -> None:
    conn = DictConnector()
    core = make_core([conn], max_entries=2)
    core.put("a", 1)
    core.put("b", 2)
    assert conn.store == {}
    core.put("c", 3)  # "a" is the LRU entry and dirty: flushed, then evicted
    assert conn.store["a"] == 1
    assert not core.contains(kb("a"))
    assert core.metrics()["entries"] == 2
    assert core.get("a") == 1  # read back from the store
    core.flush()
    assert conn.store == {"a": 1, "b": 2, "c": 3}


def test_dirty_entry_is_kept_over_capacity_while_the_store_fails() -> None:
    conn = DictConnector()
    conn.failing = True
    core = make_core([conn], max_entries=2)
    for i, k in enumerate("abcd"):
        core.put(k, i)
    m = core.metrics()
    assert m["entries"] == 4 and m["over_capacity"] >= 1 and m["pending"] == 4
    assert [core.get(k) for k in "abcd"] == [0, 1, 2, 3]
    conn.failing = False
    core.put("e", 4)
    assert core.metrics()["entries"] <= 2
    core.flush()
    assert conn.store == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}


# -- reads --------------------------------------------------------------------------------


def test_cached_none_and_false_are_hits() -> None:
    conn = DictConnector(store={"f": False})
    core = make_core([conn])
    assert core.get("n") is None
    assert core.get("n") is None
    assert core.get("f") is False
    assert core.get("f") is False
    m = core.metrics()
    assert (m["lookup"], m["hits"], m["misses"], m["read"]) == (4, 2, 2, 2)
    assert conn.reads == ["n", "f"]


def test_init_fn_value_is_cached_but_never_persisted() -> None:
    conn = DictConnector()
    core = make_core([conn], init_fn=lambda args: {"init": args})
    assert core.get("k") == {"init": "k"}
    assert core.metrics()["pending"] == 0
    core.flush()
    assert conn.store == {}


class ReadWritesBackConnector(DictConnector):
    """While the store is read for a key, a newer value for that key is written to the shard."""

    def __init__(self) -> None:
        super().__init__(store={"k": "stale"})
        self.core: ShardCore | None = None

    def read(self, args: Any) -> Any:
        value = super().read(args)
        if self.core is not None and args == "k":
            core, self.core = self.core, None
            core.put("k", "fresh")
        return value


def test_get_or_create_an_entry_written_during_the_store_read_wins() -> None:
    conn = ReadWritesBackConnector()
    core = make_core([conn])
    conn.core = core
    core.get("k")
    assert core.get("k") == "fresh"
    core.flush()
    assert conn.store == {"k": "fresh"}


def test_merge_query_fn_combines_every_connector() -> None:
    one = DictConnector("one", {"k": 1})
    two = DictConnector("two", {"k": 2})
    core = make_core([one, two], merge_query_fn=lambda *xs: sum(x or 0 for x in xs))
    assert core.get("k") == 3
    assert core.get("missing") == 0


def test_read_args_reach_the_connector_while_the_key_routes() -> None:
    conn = DictConnector(store={"user-1": "stored"})
    core = make_core([conn])
    args = {"id": 1, "name": "ann"}
    seen: list[Any] = []

    def read(a: Any) -> Any:
        seen.append(a)
        return conn.store.get(f"user-{a['id']}")

    conn.read = read  # type: ignore[method-assign]
    assert decode_value(core.read(kb(1), encode_value(args))) == "stored"
    assert seen == [args]


# -- async connectors ---------------------------------------------------------------------


class AsyncConnector:
    def __init__(self) -> None:
        self.store: dict[Any, Any] = {"pre": "existing"}
        self.connected = False

    def get_id(self) -> str:
        return "async"

    async def connect(self) -> None:
        await asyncio.sleep(0)
        self.connected = True

    async def read(self, args: Any) -> Any:
        await asyncio.sleep(0)
        return self.store.get(args)

    async def write(self, args: Any, value: Any) -> Any:
        await asyncio.sleep(0)
        return (args, value)

    async def flush(self, payloads: list[Any]) -> None:
        await asyncio.sleep(0)
        self.store.update(payloads)


def test_async_connector_methods_are_awaited() -> None:
    conn = AsyncConnector()
    core = make_core([conn])
    assert conn.connected
    assert core.get("pre") == "existing"
    core.put("k", [1, 2])
    assert core.flush() == 1
    assert conn.store == {"pre": "existing", "k": [1, 2]}
    core.close()


# -- update -------------------------------------------------------------------------------


def test_update_applies_fn_to_the_current_value_and_buffers_it() -> None:
    conn = DictConnector(store={"n": 10})
    core = make_core([conn], init_fn=lambda args: 0)
    out = core.update(kb("n"), None, lambda v: v + 1)
    assert decode_value(out) == 11
    assert decode_value(core.update(kb("m"), None, lambda v: v + 5)) == 5
    m = core.metrics()
    assert m["updates"] == 2 and m["write"] == 2 and m["pending"] == 2
    core.flush()
    assert conn.store == {"n": 11, "m": 5}


def test_update_whose_fn_raises_changes_nothing() -> None:
    conn = DictConnector(store={"n": 1})
    core = make_core([conn])

    def boom(v: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        core.update(kb("n"), None, boom)
    assert core.get("n") == 1
    assert core.metrics()["pending"] == 0


def test_concurrent_updates_lose_no_increment() -> None:
    conn = DictConnector()
    core = make_core([conn], init_fn=lambda args: 0, writes_threshold=5)
    threads_n, per_thread = 4, 200

    def slow_inc(v: int) -> int:
        # Give other threads every chance to interleave between the read and the write.
        for _ in range(50):
            pass
        return v + 1

    def work() -> None:
        for i in range(per_thread):
            core.update(kb("counter"), None, slow_inc)
            core.update(kb(f"other{i % 10}"), None, slow_inc)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert core.get("counter") == threads_n * per_thread
    core.flush()
    assert conn.store["counter"] == threads_n * per_thread
    assert sum(conn.store[f"other{i}"] for i in range(10)) == threads_n * per_thread
