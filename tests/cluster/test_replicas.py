"""Replicas on one node (``placement="pack"`` lets a backup share its primary's node): the
paths a process crash takes, with real SIGKILLs. Node loss is in ``test_multinode.py``.

- a backup's process dies: the primary asks the coordinator, goes on alone, and the
  coordinator places a new backup, which gets the whole journal;
- a primary's process dies (its node alive): Ray restarts it on its journal, and it takes
  its backup back (sending it everything again) before it serves.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest
import ray

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector


def replicas(cache: pd.Cache, detail: bool = False) -> list[dict]:
    return cache.replicas(detail=detail)


def wait_for(what, timeout: float = 60.0, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out: {why()}"
        time.sleep(0.1)


@pytest.fixture
def backed(make_cache, tmp_path):
    """``make_cache`` with one backup per shard, beside it (``placement="pack"``)."""
    return functools.partial(make_cache, num_shards=2, replicas=1, placement="pack",
                             journal=str(tmp_path), writes_threshold=10**6,
                             millis_threshold=600_000, init_fn=lambda a: 0)


def test_replicas_need_a_journal_and_a_valid_count(ray_session):
    with pytest.raises(ValueError, match="replicas must be 0 or 1"):
        pd.init(replicas=2)
    with pytest.raises(ValueError, match="needs the journal"):
        pd.init(replicas=1, journal=False)
    with pytest.raises(ValueError, match="tcp=False"):
        pd.init(replicas=1, tcp=False)
    # One node, and backups may not share it: said at init, nothing left running.
    with pytest.raises(ValueError, match="another alive node"):
        pd.init(replicas=1, name="lonely")
    with pytest.raises(pd.CacheNotFoundError):
        pd.connect("lonely")


def test_every_shard_starts_backed_up_and_the_backup_holds_the_journal(backed):
    cache = backed()
    for i in range(500):
        cache.write(i, i)
    cache.sync()
    shards = cache.metrics()["shards"]
    assert all(m["role"] == "primary" and m["backed_up"] for m in shards)
    assert [m["backup_transport"] for m in shards] == ["unix", "unix"]
    reps = replicas(cache, detail=True)
    assert all(r["backup_pid"] and r["backup_pid"] != r["primary_pid"] for r in reps)


def test_a_killed_backup_is_replaced_and_writes_go_on(backed):
    cache = backed()
    for _ in range(200):
        cache.update("n", lambda v: v + 1)
    old = replicas(cache, detail=True)
    os.kill(old[cache.shard_of("n")]["backup_pid"], signal.SIGKILL)
    for _ in range(300):  # the primary notices at its next commit, and asks
        cache.update("n", lambda v: v + 1)
    assert cache.read("n") == 500

    bumps = [500]

    def replaced():
        # The primary learns of the loss at a commit: keep committing while waiting.
        bumps[0] = cache.update("n", lambda v: v + 1)
        reps = replicas(cache, detail=True)
        s = reps[cache.shard_of("n")]
        return s["backup_id"] not in (None, old[cache.shard_of("n")]["backup_id"]) \
            and s["backup_pid"] is not None and reps
    wait_for(replaced, timeout=120, why=lambda: (old, replicas(cache, detail=True),
                                                  cache.metrics()["shards"]))
    wait_for(lambda: all(m["backed_up"] for m in cache.metrics()["shards"]))
    assert cache.update("n", lambda v: v + 1) == bumps[0] + 1
    assert cache.read("n") == bumps[0] + 1


def test_a_killed_primary_restarts_and_takes_its_backup_back(backed):
    cache = backed()
    shard = cache.shard_of("n")
    for _ in range(300):
        cache.update("n", lambda v: v + 1)
    old = replicas(cache, detail=True)[shard]
    os.kill(old["primary_pid"], signal.SIGKILL)
    assert cache.update("n", lambda v: v + 1) == 301  # waits for the restart
    m = cache.metrics()["shards"][shard]
    assert m["restarts"] >= 1 and m["backed_up"] and m["pid"] != old["primary_pid"]
    now = replicas(cache, detail=True)[shard]
    assert now["backup_id"] == old["backup_id"]  # the same backup, given everything again
    assert now["failovers"] == 0  # a process crash on a live node is not a failover
    for _ in range(99):
        cache.update("n", lambda v: v + 1)
    assert cache.read("n") == 400


def test_a_reshard_backs_up_the_shards_it_adds(backed, tmp_path):
    cache = backed(connectors=[SQLiteConnector(tmp_path / "store.db")])
    for i in range(300):
        cache.write(i, i)
    cache.update("n", lambda v: v + 1)
    cache.sync()
    cache.reshard(4)
    reps = replicas(cache)
    assert len(reps) == 4 and all(r["backup_node"] is not None for r in reps)
    assert all(m["backed_up"] for m in cache.metrics()["shards"])
    assert cache.read_many(list(range(300))) == list(range(300))
    assert cache.update("n", lambda v: v + 1) == 2
    cache.reshard(2)
    assert len(replicas(cache)) == 2
    assert cache.read_many(list(range(300))) == list(range(300))
    assert cache.update("n", lambda v: v + 1) == 3



def test_without_its_coordinator_a_replicated_cache_goes_on_unreplicated(backed):
    # A cache that is not checkpointed has a coordinator Ray does not restart, and the
    # backups it started die with its process. Its primaries cannot be deposed any more
    # (nothing is left to promote a backup, and Ray still counts their node alive), so
    # they go on alone: every write is still acknowledged, none refused or lost.
    cache = backed()
    spec = cache._pool.spec
    keys = [next(f"k{j}" for j in range(1000) if cache.shard_of(f"k{j}") == i)
            for i in range(cache.num_shards)]
    counts = dict.fromkeys(keys, 0)

    def bump() -> bool:
        for k in keys:  # a commit on every shard: where a primary notices its backup went
            counts[k] += 1
            assert cache.update(k, lambda v: v + 1) == counts[k]
        return True
    try:
        for _ in range(50):
            bump()
        os.kill(ray.get(spec.coordinator.pid.remote()), signal.SIGKILL)
        wait_for(lambda: bump() and not any(m["backed_up"]
                                            for m in cache.metrics()["shards"]),
                 timeout=60, why=lambda: cache.metrics()["shards"])
        for _ in range(100):
            bump()
        assert cache.read_many(keys) == [counts[k] for k in keys]
        assert all(m["role"] == "primary" for m in cache.metrics()["shards"])
        with pytest.raises(pd.CacheClosedError, match="coordinator"):
            cache.flush_now()  # what needs the coordinator says so
    finally:  # nothing can shut it down: its coordinator is gone
        for actor in spec.shards:
            ray.kill(actor, no_restart=True)
