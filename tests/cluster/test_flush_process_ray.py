"""Flush processes under Ray: each shard's flushes to a SQLite file run in a child of the
shard's own process, which ends with it when the shard is SIGKILLed; the restarted shard
starts another, and nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal

from polling import wait_for
from sqlite_rows import stored

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] == "Z" else int(fields[1])  # a zombie has ended


def test_shards_flush_through_children_that_die_with_them(make_cache, tmp_path):
    db = tmp_path / "s.db"
    cache = make_cache([SQLiteConnector(db)], num_shards=2, writes_threshold=10**9,
                       millis_threshold=600_000)
    acked = {("k", i): i for i in range(5000)}  # ~2,500 a shard: batches for the child
    cache.write_many(list(acked.items()))
    cache.flush_now()
    shards = cache.metrics()["shards"]
    children = [m["flush_pids"]["sqlite:kv"] for m in shards]
    for m, child in zip(shards, children):
        assert child is not None and parent_of(child) == m["pid"]  # a child of that shard
    assert stored(db) == acked

    old = shards[0]["pid"]
    more = {("m", i): -i for i in range(4000)}  # ~2,000 on the killed shard
    cache.write_many(list(more.items()))
    cache.sync()  # acknowledged: journaled, not flushed
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: parent_of(children[0]) is None, timeout=10)

    def restarted() -> bool:
        try:
            return cache.metrics()["shards"][0]["pid"] != old
        except pd.PersistroidsError:
            return False

    assert wait_for(restarted, timeout=60)
    cache.flush_now()
    m = cache.metrics()["shards"][0]
    assert parent_of(m["flush_pids"]["sqlite:kv"]) == m["pid"]
    assert stored(db) == {**acked, **more}
    assert cache.read_many(list(more)) == list(more.values())
