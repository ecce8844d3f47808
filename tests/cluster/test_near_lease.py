"""Near-cache and exclusive-lease guarantees, checked with other workers on the same keys.

Stated guarantees (see Cache.near and Cache.lease):
- near cache: read-your-writes, and another process's write is seen at most lease_ms late;
- lease: while a process owns a key, nobody else reads a stale value or loses an update: any
  other access recalls the lease and waits for the owner's writes.
"""

from __future__ import annotations

import os
import time

import ray


@ray.remote
def read_key(cache, key):
    return cache.read(key)


@ray.remote
def add_many(cache, key, n):
    for _ in range(n):
        cache.update(key, lambda v: v + 1)
    return n


@ray.remote
def write_key(cache, key, value):
    cache.write(key, value, wait=True)
    return value


def test_owner_writes_are_visible_to_other_processes_at_once(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    with cache.lease("line"):
        for v in (1, 2, 3):
            cache.write("line", v)  # stays in this process...
            # ...yet a task that starts after the write must see it (the lease is recalled)
            assert ray.get(read_key.remote(cache, "line")) == v
            assert cache.read("line") == v
        assert cache._pool.owned  # each recall was answered by taking the key back
    assert cache.read("line") == 3
    assert cache.metrics()["total"]["recalls"] >= 3


def test_no_update_is_lost_between_an_owner_and_concurrent_workers(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    refs = [add_many.remote(cache, "ctr", 300) for _ in range(2)]
    local = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with cache.lease("ctr"):
            for _ in range(50):
                cache.update("ctr", lambda v: v + 1)
                local += 1
        ready, _ = ray.wait(refs, num_returns=2, timeout=0)
        if len(ready) == 2:
            break
    assert sum(ray.get(refs)) == 600
    assert cache.read("ctr") == 600 + local


def test_a_dead_owner_blocks_others_only_until_its_lease_expires(make_cache):
    cache = make_cache(init_fn=lambda a: "initial")

    @ray.remote(max_retries=0)
    def lease_and_die(c):
        lease = c.lease("orphan", ttl_ms=400)
        lease.acquire()
        c.write("orphan", "never released")
        os._exit(1)

    try:
        ray.get(lease_and_die.remote(cache))
    except ray.exceptions.RayError:
        pass
    # Blocks while the lease is alive, then the lease is void and the unreleased write gone.
    assert cache.read("orphan") == "initial"
    cache.write("orphan", "after", wait=True)
    assert cache.read("orphan") == "after"
    assert cache.metrics()["total"]["leases_expired"] >= 1


def test_write_many_and_read_many_on_a_leased_key_recall_it(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    with cache.lease("a", "b"):
        cache.write("a", 10)
        cache.write("b", 20)
        assert cache.read_many(["a", "b", "c"]) == [10, 20, 0]
    cache.write_many([("a", 1), ("b", 2)])
    assert cache.read_many(["a", "b"]) == [1, 2]


def test_lease_taken_inside_a_task_is_recalled_by_the_driver(make_cache):
    cache = make_cache(init_fn=lambda a: 0)

    @ray.remote
    def hold_and_count(c, n):
        with c.lease("remote-hot"):
            for _ in range(n):
                c.write("remote-hot", c.read("remote-hot") + 1)
        return n

    assert ray.get(hold_and_count.remote(cache, 5000)) == 5000
    assert cache.read("remote-hot") == 5000


def test_near_cache_reads_its_own_writes_and_is_stale_at_most_lease_ms(make_cache):
    cache = make_cache()
    near = cache.near(lease_ms=150)
    near.write("k", "mine")
    assert near.read("k") == "mine"  # read-your-writes
    ray.get(write_key.remote(cache, "k", "theirs"))
    applied = time.monotonic()
    # Possibly stale right now, but never after lease_ms.
    time.sleep(max(0.0, applied + 0.16 - time.monotonic()))
    assert near.read("k") == "theirs"
    assert cache.read("k") == "theirs"


def test_near_cache_is_bounded_and_counts(make_cache):
    cache = make_cache()
    near = cache.near(lease_ms=10_000, max_entries=10)
    cache.write_many([(i, i) for i in range(50)])
    assert near.read_many(list(range(50))) == list(range(50))
    assert len(near._near.entries) <= 10
    near.read(7)
    hits, misses = near._near.hits, near._near.misses
    assert [near.read(7) for _ in range(3)] == [7, 7, 7]
    assert (near._near.hits, near._near.misses) == (hits + 3, misses)
    assert len(near._near.entries) <= 10


def test_leased_and_near_cached_mutable_values_come_back_as_copies(make_cache):
    cache = make_cache()
    cache.write("doc", {"n": 1, "tags": ["a"]}, wait=True)
    with cache.lease("doc"):
        doc = cache.read("doc")
        assert doc == {"n": 1, "tags": ["a"]}
        doc["tags"].append("mutated")  # the caller's copy only
        assert cache.read("doc") == {"n": 1, "tags": ["a"]}
        cache.write("doc", {"n": 2, "tags": []})
        assert cache.read("doc") == {"n": 2, "tags": []}
        assert cache.update("doc", lambda d: {**d, "n": d["n"] + 1}) == {"n": 3, "tags": []}
        assert cache.read_many(["doc"]) == [{"n": 3, "tags": []}]
    assert ray.get(read_key.remote(cache, "doc")) == {"n": 3, "tags": []}
    near = cache.near(lease_ms=10_000)
    first = near.read("doc")
    first["n"] = 99
    assert near.read("doc") == {"n": 3, "tags": []}
    assert near.read("missing") is None and near.read("missing") is None


@ray.remote
def count_up(cache, key, seconds):
    """Increment ``key`` for ``seconds``; return (value, monotonic time once applied) pairs."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append((cache.update(key, lambda v: v + 1), time.monotonic()))
    return out


def test_near_reads_under_a_concurrent_writer_are_never_staler_than_lease_ms(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    lease_s = 0.05
    near = cache.near(lease_ms=lease_s * 1000)
    ref = count_up.remote(cache, "ticker", 1.5)
    reads = []
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        started = time.monotonic()
        reads.append((started, near.read("ticker")))
        near.write("mine", started)
        assert near.read("mine") == started  # read-your-writes, every time
    applied = ray.get(ref)
    assert len(applied) > 50 and len(reads) > 50
    assert [x for _, x in reads] == sorted(x for _, x in reads)  # never goes back in time
    j, floor = 0, 0
    for started, seen in reads:
        # every increment applied more than lease_ms before this read started must show
        while j < len(applied) and applied[j][1] < started - lease_s:
            floor = applied[j][0]
            j += 1
        assert seen >= floor, f"read {seen} at {started:.4f}, but {floor} was applied earlier"
    assert cache.read("ticker") == applied[-1][0]
