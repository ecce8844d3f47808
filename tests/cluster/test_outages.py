"""A store outage against a Redis server the test starts itself (never the shared one):
stopped and restarted mid-stream. The write buffer stays bounded (writers wait, then get
BackpressureError), and everything acknowledged lands once the store is back."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest

import persistroids_dist as pd
from persistroids_dist.connectors.redis import RedisConnector
from persistroids_dist.connectors.testing import PrivateRedis


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("PERSISTROIDS_REQUIRE_SERVICES") == "1":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def test_a_store_outage_fills_the_buffer_to_its_bound_and_loses_nothing(make_cache,
                                                                        private_redis):
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    prefix = f"out-{uuid.uuid4().hex[:6]}:"
    cache = make_cache([RedisConnector(url, prefix=prefix)], num_shards=1, max_pending=300,
                       backpressure_timeout_s=0.3, millis_threshold=20, writes_threshold=50)
    acked = {}
    for i in range(100):
        acked[("before", i)] = cache.write(("before", i), i, wait=True)
    cache.flush_now()
    private_redis.stop()
    refused = None
    for i in range(2000):
        try:
            acked[("during", i)] = cache.write(("during", i), i, wait=True)
        except pd.BackpressureError as e:
            refused = e
            break
    assert refused is not None and "write buffer full" in str(refused)
    m = cache.metrics()["total"]
    assert m["pending"] <= 300 and m["backpressure_refusals"] == 1
    assert m["flush_errors"] >= 1
    # Cached keys are still served during the outage.
    assert cache.read(("before", 3)) == 3 and cache.read(("during", 5)) == 5
    private_redis.start()  # the store comes back (empty: it kept nothing on disk)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and cache.metrics()["total"]["pending"]:
        time.sleep(0.05)
    cache.flush_now()
    probe = RedisConnector(url, prefix=prefix)
    probe.connect()
    during = {k: v for k, v in acked.items() if k[0] == "during"}
    assert len(during) >= 250
    assert probe.read_many(list(during)) == list(during.values())
    probe.disconnect()


def test_a_shard_killed_while_its_store_is_down_comes_back_and_replays(make_cache,
                                                                       private_redis):
    # Bug (found by the soak run): a restarted shard whose store was down failed in its
    # constructor (the connector's connect), so Ray gave up on it and its journal, with
    # acknowledged writes, was never replayed.
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    prefix = f"kd-{uuid.uuid4().hex[:6]}:"
    cache = make_cache([RedisConnector(url, prefix=prefix)], num_shards=1,
                       writes_threshold=10**6, millis_threshold=600_000)
    acked = {("w", i): cache.write(("w", i), i, wait=True) for i in range(50)}
    old_pid = cache.metrics()["shards"][0]["pid"]
    private_redis.stop()
    os.kill(old_pid, 9)
    deadline = time.monotonic() + 60
    m = None
    while time.monotonic() < deadline:
        try:
            m = cache.metrics()["shards"][0]
            if m["pid"] != old_pid:
                break
        except pd.PersistroidsError:
            pass
        time.sleep(0.1)
    assert m is not None and m["pid"] != old_pid and m["replayed"] == 50
    assert cache.read_many(list(acked)) == list(acked.values())  # served from memory
    private_redis.start()
    cache.flush_now()
    probe = RedisConnector(url, prefix=prefix)
    probe.connect()
    assert probe.read_many(list(acked)) == list(acked.values())
    probe.disconnect()
