"""A model-based test of ShardCore: random reads, writes, updates, flushes, timed flushes, store
outages and writes racing a flush, checked against a plain dict of the last written values."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from persistroids_dist import BaseConnector, FlushError
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.shard import ShardCore

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g"])
# No None: a store read of None means "absent" (the seed's contract), so a written None that was
# flushed and evicted reads back as the init_fn value, by design.
VALUES = st.one_of(st.integers(-5, 100), st.booleans(), st.text(max_size=3))
MAX_ENTRIES = 3
MILLIS = 100
INIT = "init"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ModelStore(BaseConnector):
    """A dict store in this process; ``failing`` makes flush raise; ``reenter`` makes a flush
    write another key (not the one the current operation is about) through the shard before
    it persists its batch, as a write racing the flush would."""

    id = "model-store"

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}
        self.failing = False
        self.reenter: tuple[Any, Any] | None = None
        self.core: ShardCore | None = None
        self.on_reenter: Any = None
        self.busy_key: Any = None

    def read(self, args: Any) -> Any:
        return self.data.get(args)

    def flush(self, payloads: list[Any]) -> None:
        job = self.reenter
        if job is not None and job[0] != self.busy_key:
            self.reenter = None
            assert self.core is not None
            self.core.put(*job)
            self.on_reenter(*job)
        if self.failing:
            raise ConnectionError("store down")
        self.data.update(payloads)


class ShardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = ModelStore()
        self.core = ShardCore([self.store], init_fn=lambda args: INIT, writes_threshold=4,
                              millis_threshold=MILLIS, max_entries=MAX_ENTRIES,
                              clock=self.clock)
        self.store.core = self.core
        self.store.on_reenter = self._record
        self.model: dict[Any, Any] = {}
        # After an outage the partition may stay over its bound until the next insert.
        self.may_exceed = False
        self.reentered = False

    def _record(self, key: Any, value: Any) -> None:
        self.model[key] = value
        self.reentered = True

    def _expected(self, key: Any) -> Any:
        return self.model.get(key, INIT)

    def _after_insert(self) -> None:
        if not self.store.failing:
            self.may_exceed = False

    def _check_store_matches_model(self) -> None:
        for key, value in self.model.items():
            assert key in self.store.data, f"{key!r} never reached the store"
            assert self.store.data[key] == value, (key, self.store.data[key], value)
        assert self.core.metrics()["pending"] == 0

    # -- operations -----------------------------------------------------------------------
    @rule(key=KEYS, value=VALUES)
    def write(self, key: str, value: Any) -> None:
        self.store.busy_key = key
        assert self.core.put(key, value) == value
        self.model[key] = value
        self._after_insert()

    @rule(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=4))
    def write_batch(self, pairs: list[tuple[str, Any]]) -> None:
        # write_many: small batches take its batch path (while the partition has room for
        # all of them), larger ones the per-write path; both must leave the same state.
        self.store.busy_key = None
        # A write racing a flush that this batch starts (over a threshold, or evicting) may
        # land between two of its items: held back if it is about a key of the batch (its
        # order against them is not the model's), else it commutes with them.
        held = self.store.reenter
        if held is not None and held[0] in {k for k, _ in pairs}:
            self.store.reenter = None
        else:
            held = None
        items = [(encode_key(k), None, encode_value(v)) for k, v in pairs]
        for k, v in pairs:
            self.model[k] = v
        assert self.core.write_many(items) == len(pairs)
        if held is not None:
            self.store.reenter = held  # still due at the next flush
        if pairs:
            self._after_insert()

    @rule(key=KEYS)
    def read(self, key: str) -> None:
        self.store.busy_key = key
        misses = self.core.metrics()["misses"]
        # Never a FlushError, even with the store down: a key whose newest value is not in
        # the store is always in the cache.
        assert self.core.get(key) == self._expected(key)
        if self.core.metrics()["misses"] > misses:
            self._after_insert()

    @rule(key=KEYS)
    def increment(self, key: str) -> None:
        self.store.busy_key = key
        def inc(v: Any) -> Any:
            return v + 1 if type(v) is int else 0

        new = decode_value(self.core.update(encode_key(key), None, inc))
        assert new == inc(self._expected(key))
        self.model[key] = new
        self._after_insert()

    @rule()
    def flush(self) -> None:
        self.reentered = False
        try:
            self.core.flush()
        except FlushError:
            assert self.store.failing
            assert self.core.metrics()["pending"] > 0
            return
        if self.store.failing:  # nothing was pending, so the store was not called
            assert self.core.metrics()["pending"] == 0
            return
        if self.reentered:  # a write raced this flush: it is pending, the next flush takes it
            assert self.core.metrics()["pending"] == 1
            self.core.flush()
        self._check_store_matches_model()

    @rule(ms=st.sampled_from([MILLIS + 1, 10 * MILLIS, 6000]))
    def tick_after_threshold(self, ms: int) -> None:
        self.clock.now += ms / 1000
        self.core.tick()
        if not self.store.failing and self.clock.now >= self.core._retry_at:
            # Nothing pending is older than the threshold now, so the timer flushed it all
            # (unless a write re-entered during that flush, which is pending and fresh).
            m = self.core.metrics()
            assert m["oldest_pending_ms"] < MILLIS

    @rule()
    def store_goes_down(self) -> None:
        self.store.failing = True
        self.may_exceed = True

    @rule()
    def store_comes_back(self) -> None:
        self.store.failing = False

    @precondition(lambda self: self.store.reenter is None)
    @rule(key=KEYS, value=VALUES)
    def write_during_next_flush(self, key: str, value: Any) -> None:
        self.store.reenter = (key, value)

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def bounded_when_healthy(self) -> None:
        if not self.store.failing and not self.may_exceed:
            assert self.core.metrics()["entries"] <= MAX_ENTRIES

    @invariant()
    def byte_counts_match_what_is_held(self) -> None:
        core = self.core
        assert core._bytes == sum(len(k) + len(v) for k, v in core._entries.items())
        assert core._pending_bytes == sum(core._pending_sizes.values())
        assert set(core._pending_sizes) >= core._dirty

    @invariant()
    def pending_never_exceeds_the_keys_written(self) -> None:
        assert self.core.metrics()["pending"] <= len(self.model)

    def teardown(self) -> None:
        # Recover and drain: nothing written may have been lost on the way.
        self.store.failing = False
        self.store.reenter = None
        self.core.flush()
        self._check_store_matches_model()
        for key in ["a", "b", "c", "d", "e", "f", "g"]:
            assert self.core.get(key) == self._expected(key)
        self.core.close()


ShardMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                          deadline=None)
TestShardStateful = ShardMachine.TestCase
