"""End-to-end model test: the Cache on Ray (queued writes, batches, pipelined updates, leases,
evictions to SQLite) against a plain dict, under random operation sequences."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from persistroids_dist.connectors.sqlite import SQLiteConnector

KEYS = st.sampled_from(["a", "b", "c", ("t", 1), 7, b"raw", "d", "e", "f", "g"])
VALUES = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(),
                   st.lists(st.integers(0, 3), max_size=2))


def add_one(v):
    return (v if isinstance(v, int) else 0) + 1


def test_cache_matches_a_dict_model(make_cache, tmp_path):
    db = tmp_path / "model.db"
    # Few entries per shard: evictions (and flushes before them) happen all the time.
    cache = make_cache([SQLiteConnector(db)], num_shards=2, max_entries=2, writes_threshold=8,
                       millis_threshold=60_000)
    examples = itertools.count()

    class CacheModel(RuleBasedStateMachine):
        @initialize()
        def fresh_namespace(self):
            self.ns = next(examples)  # each example gets keys of its own
            self.model = {}

        def k(self, key):
            return (self.ns, key)

        @rule(key=KEYS, value=VALUES)
        def write(self, key, value):
            cache.write(self.k(key), value)
            self.model[key] = value

        @rule(items=st.lists(st.tuples(KEYS, VALUES), max_size=5))
        def write_many(self, items):
            cache.write_many([(self.k(k), v) for k, v in items])
            self.model.update(items)

        @rule(key=KEYS, wait=st.booleans())
        def update(self, key, wait):
            new = add_one(self.model.get(key))
            got = cache.update(self.k(key), add_one, wait=wait)
            assert got == (new if wait else None)
            self.model[key] = new

        @rule(key=KEYS)
        def read(self, key):
            assert cache.read(self.k(key)) == self.model.get(key)

        @rule(keys=st.lists(KEYS, max_size=6))
        def read_many(self, keys):
            assert cache.read_many([self.k(k) for k in keys]) == [self.model.get(k) for k in keys]

        @rule(key=KEYS, values=st.lists(VALUES, min_size=1, max_size=3))
        def leased_writes(self, key, values):
            with cache.lease(self.k(key)):
                for v in values:
                    cache.write(self.k(key), v)
                    assert cache.read(self.k(key)) == v
            self.model[key] = values[-1]

        @rule()
        def flush_now(self):
            cache.flush_now()
            store = SQLiteConnector(db)
            try:
                for key, value in self.model.items():
                    # A stored None reads back as absent, which the model also says.
                    assert store.read(self.k(key)) == value, key
            finally:
                store.disconnect()

        @rule()
        def sync(self):
            cache.sync()  # raises any error a shard reported for a queued write

        def teardown(self):
            cache.sync()

    CacheModel.TestCase.settings = settings(
        max_examples=25, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    CacheModel.TestCase().runTest()
    assert cache.metrics()["total"]["evictions"] > 0
