"""Resharding a running cache (``cache.reshard(n)``): slot ranges move with what is pending on
them, while writers in this process and in Ray tasks (other processes, with tables of their
own) keep going. The final contents must equal a model of what was acknowledged, and
counters must be exact: no write lost, none applied twice.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import ray
from linearizability import Recorder, check
from polling import wait_for
from test_histories import barrier, do_plain_op, final_reads, zero
from writers import BUMP, Writers, lost

import persistroids_dist as pd
from persistroids_dist.connectors.redis import RedisConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.connectors.testing import PrivateRedis


@ray.remote(num_cpus=0, max_retries=0)
def remote_writer(cache: pd.Cache, tag: str, seconds: float) -> dict:
    """The same writers in another process, which learns of the reshards on its own. They
    stop once the key ``<tag>.stop`` is set (after the driver's reshards, however long
    those took), or after ``seconds`` at most."""
    deadline = time.monotonic() + seconds
    with Writers(cache, tag) as w:
        while not cache.read(f"{tag}.stop") and time.monotonic() < deadline:
            time.sleep(0.1)
    return {"acked": {**w.acked, **w.batches},
            "counts": dict(zip(w.counter_names(), w.counts, strict=True)),
            "errors": w.errors, "epoch": cache._pool.epoch, "num_shards": cache.num_shards}


def sqlite_cache(make_cache: Callable[..., pd.Cache], tmp_path: Any,
                 buffered: bool = True) -> pd.Cache:
    """Two shards over one SQLite file, journaled, counters starting at 0; ``buffered``:
    nothing flushed until asked (what a reshard moves is then all pending)."""
    more = {"writes_threshold": 10**6, "millis_threshold": 600_000} if buffered else {}
    return make_cache([SQLiteConnector(tmp_path / "store.db")], num_shards=2,
                      journal=tmp_path / "journal", init_fn=zero, **more)


def check_model(cache: pd.Cache, acked: dict[str, int], counters: dict[str, int]) -> None:
    missing = lost(cache, acked)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
    assert not lost(cache, counters)


def test_grow_2_to_5_and_shrink_5_to_3_under_concurrent_writers(make_cache, tmp_path):
    cache = sqlite_cache(make_cache, tmp_path)
    for i in range(500):
        cache.write(f"seed{i}", i)
    cache.sync()
    remote = remote_writer.remote(cache, "r", 120.0)
    with Writers(cache, "d") as w:
        time.sleep(1.0)
        grown = cache.reshard(5)
        assert cache.num_shards == 5 and grown["num_shards"] == 5
        time.sleep(1.5)
        shrunk = cache.reshard(3)
        assert cache.num_shards == 3 and shrunk["epoch"] == grown["epoch"] + 1
        time.sleep(1.0)
        cache.write("r.stop", 1, wait=True)
    r = ray.get(remote, timeout=120)
    assert not w.errors and not r["errors"], (w.errors + r["errors"])[:5]
    assert r["epoch"] == shrunk["epoch"] and r["num_shards"] == 3  # it learnt both
    assert len(w.acked) + len(w.batches) > 1000 and len(r["acked"]) > 500
    assert sum(w.counts) > 100
    acked = {**{f"seed{i}": i for i in range(500)}, **w.acked, **w.batches, **r["acked"]}
    counters = {**dict(zip(w.counter_names(), w.counts, strict=True)), **r["counts"]}
    check_model(cache, acked, counters)
    assert len(cache.metrics()["shards"]) == 3
    # And the store holds the same: no shard that gave a slot away flushed an old value of
    # it over its new owner's (read back with the cache emptied).
    cache.flush_now()
    cache.invalidate_all()
    check_model(cache, acked, counters)


def test_resharding_refuses_what_it_cannot_do_and_says_why(make_cache, tmp_path):
    mem = make_cache(num_shards=2)  # MemoryConnector: each shard's store is its own
    with pytest.raises(ValueError, match="shared store"):
        mem.reshard(3)
    nojournal = make_cache([SQLiteConnector(tmp_path / "a.db")], journal=False)
    with pytest.raises(ValueError, match="journal"):
        nojournal.reshard(3)
    ok = make_cache([SQLiteConnector(tmp_path / "b.db")], journal=tmp_path / "j")
    with pytest.raises(ValueError, match="num_shards"):
        ok.reshard(0)
    assert ok.reshard(2) == {"epoch": 0, "num_shards": 2, "moved_slots": 0}


def test_a_reshard_while_the_store_is_down_moves_the_pending_writes(make_cache, tmp_path):
    # Pending writes move with their slots (they are not flushed first), so a reshard does
    # not need the stores: nothing is lost, and the new owners flush once the store is back.
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    prefix = f"{uuid.uuid4().hex[:6]}:"
    try:
        cache = make_cache([RedisConnector(server.url, prefix=prefix)],
                           num_shards=2, journal=tmp_path / "journal", init_fn=zero,
                           writes_threshold=10**6, millis_threshold=600_000)
        for i in range(200):
            cache.write(f"k{i}", i)
        cache.update("n", BUMP)
        cache.sync()
        server.stop()
        out = cache.reshard(4)
        assert out["num_shards"] == 4 and cache.num_shards == 4
        assert out["handed_keys"] > 50  # about half of the 201 keys changed shard
        assert cache.read_many([f"k{i}" for i in range(200)]) == list(range(200))
        assert cache.update("n", BUMP) == 2
        pending = [m["pending"] for m in cache.metrics()["shards"]]
        assert sum(pending) == 201 and all(pending), pending  # every shard holds some
        server.start()
        cache.flush_now()
        stored = RedisConnector(server.url, prefix=prefix)
        try:
            assert [stored.read(f"k{i}") for i in range(200)] == list(range(200))
            assert stored.read("n") == 2
        finally:
            stored.disconnect()
    finally:
        server.stop()


def test_a_reshard_that_cannot_start_moves_nothing(make_cache, tmp_path):
    # One shard refuses its export (a handoff of its own is under way): the others take
    # their slots back, the added shards go, and the cache goes on as it was.
    cache = sqlite_cache(make_cache, tmp_path)
    for i in range(200):
        cache.write(f"k{i}", i)
    cache.sync()
    shard1 = cache._pool.spec.shards[1]
    ray.get(shard1.export_slots.remote({0: 0}, 99))  # busy: a reshard's export is refused
    with pytest.raises(Exception, match="reshard aborted, nothing moved.*epoch 99"):
        cache.reshard(4)
    assert ray.get(shard1.cancel_handoff.remote(99))
    assert cache.num_shards == 2
    assert cache.read_many([f"k{i}" for i in range(200)]) == list(range(200))
    assert cache.update("k0", BUMP) == 1
    assert cache.reshard(4)["num_shards"] == 4
    assert cache.read_many([f"k{i}" for i in range(200)]) == [1, *range(1, 200)]


@ray.remote(num_cpus=0.5, max_retries=0)
def history_worker(cache, worker, keys, seed, tag):
    """Random ops on ``keys`` until the driver says stop (at most 20,000)."""
    rng = random.Random(seed)
    rec = Recorder(worker)
    errors = []
    barrier(cache, tag, 4)
    for i in range(20_000):
        if i % 50 == 0 and cache.read(("stop", tag)):
            break
        try:
            do_plain_op(cache, rec, rng, keys, i)
        except Exception as e:  # stays of unknown outcome in the history
            errors.append(f"{type(e).__name__}: {e}"[:300])
    return rec.ops, errors


def served_ops(cache: pd.Cache) -> int:
    """Reads, writes and updates the cache's shards served so far."""
    t = cache.metrics()["total"]
    return t["lookup"] + t["write"] + t["updates"]


def wait_for_ops(cache: pd.Cache, n: int) -> None:
    """Wait (at least 0.2 s, at most 120 s) until the shards served ``n`` more ops."""
    start = served_ops(cache)
    time.sleep(0.2)
    wait_for(lambda: served_ops(cache) - start >= n, timeout=120, every=0.05)


def histories_across(cache: pd.Cache, keys: list[str], tag: str, refs: list[Any],
                     action: Callable[[], Any]) -> tuple[list[Any], list[str], list[int]]:
    """Once the 4 ``history_worker``s (``refs``, started with ``tag``) all run, do
    ``action`` (a reshard, say), let them go on a while, stop them; return their history
    (with the driver's final reads), their errors, and how many ops began before, during
    and after ``action``."""
    deadline = time.monotonic() + 60
    while cache.read(("barrier", tag)) < 4:
        if time.monotonic() > deadline:
            raise TimeoutError("the history workers did not all start")
        time.sleep(0.01)
    # Before and after the action, the workers go on until the shards served 400 more ops
    # (their counters), not for a fixed time: a slow run still gets a history on each side.
    wait_for_ops(cache, 400)
    started = time.monotonic()
    action()
    ended = time.monotonic()
    wait_for_ops(cache, 400)
    cache.write(("stop", tag), 1, wait=True)
    results = ray.get(refs, timeout=300)
    history = [op for ops, _ in results for op in ops]
    errors = [e for _, errs in results for e in errs]
    spans = [sum(op.call < started for op in history),
             sum(started <= op.call <= ended for op in history),
             sum(op.call > ended for op in history)]
    return history + final_reads(cache, keys), errors, spans


def test_histories_during_reshards_are_linearizable(make_cache, tmp_path):
    cache = sqlite_cache(make_cache, tmp_path, buffered=False)
    keys = [f"h{i}" for i in range(6)]
    tag = uuid.uuid4().hex
    refs = [history_worker.remote(cache, w, keys, 900 + w, tag) for w in range(4)]
    before = [cache.shard_of(k) for k in keys]
    history, errors, spans = histories_across(
        cache, keys, tag, refs, lambda: (cache.reshard(4), time.sleep(0.3), cache.reshard(3)))
    assert not errors, errors[:5]
    assert [cache.shard_of(k) for k in keys] != before  # keys did move
    # The histories cover the reshards: ops before, during and after them.
    assert min(spans) >= 100, spans
    res = check(history, initial=0)
    assert res.ok, res.explain()


@ray.remote(num_cpus=0, max_retries=0)
def shard_count_seen(spec) -> tuple[int, int, int]:
    """metrics() from a process whose handle has an old table and made no keyed call."""
    cache = pd.Cache(spec)
    before = cache.num_shards
    return before, len(cache.metrics()["shards"]), cache.num_shards


def test_a_process_that_has_not_met_a_refusal_still_sees_every_shard(make_cache, tmp_path):
    cache = make_cache([SQLiteConnector(tmp_path / "store.db")], num_shards=2,
                       journal=tmp_path / "journal")
    old_spec = cache._spec  # the table of epoch 0: 2 shards
    cache.reshard(4)
    assert ray.get(shard_count_seen.remote(old_spec), timeout=60) == (2, 4, 4)


def test_leases_through_a_reshard_keep_every_increment(make_cache, tmp_path):
    # A thread leases keys and increments them in-process while the cache reshards: leases
    # held on the slots a reshard moves move with them, new leases on them are refused
    # until the new table is out, then granted by the new owner.
    cache = sqlite_cache(make_cache, tmp_path, buffered=False)
    keys = [f"L{i}" for i in range(8)]
    done = {k: 0 for k in keys}
    stop = threading.Event()
    errors: list[str] = []

    def holder() -> None:
        i = 0
        while not stop.is_set():
            k = keys[i % len(keys)]
            try:
                with cache.lease(k):
                    for _ in range(10):
                        cache.update(k, BUMP)
                done[k] += 10
            except Exception as e:  # the test expects none
                errors.append(f"{type(e).__name__}: {e}"[:300])
            i += 1

    t = threading.Thread(target=holder)
    t.start()
    try:
        time.sleep(0.5)
        cache.reshard(4)
        time.sleep(0.5)
        cache.reshard(3)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(120)
    assert not errors, errors[:5]
    assert sum(done.values()) > 100
    assert cache.read_many(keys) == [done[k] for k in keys]


def test_a_lease_held_through_a_reshard_moves_with_its_slot(make_cache, tmp_path):
    # Held across two reshards and for several times its time to live after them: never
    # recalled, renewed by its new owners (else it would expire and its writes be refused
    # at release), and every in-process increment lands.
    cache = sqlite_cache(make_cache, tmp_path, buffered=False)
    keys = [f"held{i}" for i in range(16)]
    first = cache.metrics()["shards"]
    with cache.lease(*keys, ttl_ms=1000):
        for k in keys:
            cache.update(k, BUMP)
        cache.reshard(5)
        for k in keys:
            cache.update(k, BUMP)
        cache.reshard(3)
        time.sleep(3.0)  # three times the lease's time to live
        for k in keys:
            cache.update(k, BUMP)
        shards = cache.metrics()["shards"]
    assert cache.read_many(keys) == [3] * len(keys)
    granted = sum(m["leases_granted"] for m in shards) - sum(
        m["leases_granted"] for m in first)
    assert granted == len(keys) and sum(m["recalls"] for m in shards) == 0
    assert sum(m["leases_expired"] for m in shards) == 0
    # The grants live on the shards that own the keys now (some moved: 16 keys, 3 owners).
    homes = {cache._pool.shard_for(cache._encode(k)[0]) for k in keys}
    assert len(homes) > 1


def test_shard_processes_killed_during_reshards_lose_nothing(make_cache, tmp_path):
    # Four reshards (2 -> 4 -> 2 -> 5 -> 3) under writers, each with a shard process SIGKILLed
    # at a random moment of it. Ray restarts the shard, which replays its journal. Killed in
    # the first steps, the reshard aborts with nothing moved and is asked again; a source
    # killed after its new owners journaled its state owns its slots again (its journal
    # says so) and is exported again; a new owner killed finds the state in its journal.
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    cache = sqlite_cache(make_cache, tmp_path)
    outcomes = []
    with Writers(cache, "x") as w:
        time.sleep(0.5)
        for n in (4, 2, 5, 3):
            victim = rng.choice([m["pid"] for m in cache.metrics()["shards"]])
            done: dict[str, Any] = {}

            def reshard(n: int = n, done: dict = done) -> None:
                try:
                    done["out"] = cache.reshard(n)
                except Exception as e:
                    done["error"] = e

            t = threading.Thread(target=reshard)
            t.start()
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(victim, signal.SIGKILL)
            t.join(600)
            assert not t.is_alive(), f"seed {seed}: reshard to {n} hangs"
            if "error" in done:
                assert "reshard aborted, nothing moved" in str(done["error"]), \
                    f"seed {seed}: {done['error']}"
                outcomes.append("aborted")
                assert cache.reshard(n)["num_shards"] == n  # asked again, it goes through
            else:
                outcomes.append("done")
            assert cache.num_shards == n
            time.sleep(0.3)
    assert not w.errors, (seed, w.errors[:5])
    assert len(w.acked) > 200 and sum(w.counts) > 50, seed
    acked, counters = {**w.acked, **w.batches}, dict(zip(w.counter_names(), w.counts,
                                                          strict=True))
    check_model(cache, acked, counters)
    cache.flush_now()
    cache.invalidate_all()  # and the store holds the same
    check_model(cache, acked, counters)
    print(f"seed {seed}: {outcomes}")
