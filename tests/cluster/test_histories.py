"""Linearizability of histories recorded from concurrent Ray workers on a few hot keys.

Four workers (Ray tasks) hammer 3-8 keys with reads, writes and updates, each recording its
ops with ``time.monotonic()`` (CLOCK_MONOTONIC is one clock for every process on this host);
the test merges the histories and ``linearizability.check`` searches each key's sub-history
for an order that respects real time and the register-with-add semantics. Writes write unique
large values and updates add 1..5, so a stale or lost value cannot hide.

Modes: plain (read / write(wait=True) / update / read_many), pipelined writes acknowledged by
sync(), update-only counters, exclusive leases under recall, evictions to SQLite, and plain
ops while shard processes are SIGKILLed and restarted.
"""

from __future__ import annotations

import functools
import operator
import random
import time
import uuid
from typing import Any

import ray
from linearizability import INF, Op, Recorder, check

from persistroids_dist import LeaseLostError

WORKERS = 4
OPS = 300
# One function object per delta, built once: update() ships a function once per process and
# shard and then names it by digest. operator.add pickles by reference (no test import needed
# in the shards); integer addition commutes, so partial(add, d)(v) == v + d.
ADD = {d: functools.partial(operator.add, d) for d in range(1, 6)}


def zero(args: Any) -> int:
    return 0


def unique_value(worker: int, i: int) -> int:
    """Distinct for every write of a test, and never reached by adds (at most 5 * 1200)."""
    return (worker + 1) * 10**12 + (i + 1) * 10**6


def barrier(cache: Any, tag: str, parties: int, timeout: float = 60.0) -> None:
    """Wait until ``parties`` workers got here, so their ops overlap in time."""
    cache.update(("barrier", tag), ADD[1])
    deadline = time.monotonic() + timeout
    while cache.read(("barrier", tag)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {tag}: workers did not all start in {timeout}s")
        time.sleep(0.0005)


def do_plain_op(cache: Any, rec: Recorder, rng: random.Random, keys: list[Any], i: int,
                many: bool = True) -> None:
    """One random op on ``keys``: read 40%, write(wait=True) 30%, update 25%, read_many or
    write_many 5% (each key of those recorded as its own op: no atomicity is claimed)."""
    k = rng.choice(keys)
    x = rng.random()
    if x < 0.40:
        rec.run("read", k, None, functools.partial(cache.read, k))
    elif x < 0.70:
        v = unique_value(rec.process, i)
        rec.run("write", k, v, functools.partial(cache.write, k, v, wait=True))
    elif x < 0.95 or not many:
        d = rng.randint(1, 5)
        rec.run("add", k, d, functools.partial(cache.update, k, ADD[d]))
    elif x < 0.975:
        ks = rng.sample(keys, min(2, len(keys)))
        ops = [rec.invoke("read", kk) for kk in ks]
        values = cache.read_many(ks)
        done = time.monotonic()
        for op, v in zip(ops, values):
            rec.complete(op, v, at=done)
    else:
        ks = rng.sample(keys, min(2, len(keys)))
        items = [(kk, unique_value(rec.process, i) + j) for j, kk in enumerate(ks)]
        ops = [rec.invoke("write", kk, v) for kk, v in items]
        cache.write_many(items)  # returns once every shard applied its part
        done = time.monotonic()
        for op in ops:
            rec.complete(op, at=done)


@ray.remote(num_cpus=0.5, max_retries=0)
def plain_worker(cache, worker, keys, n, seed, tag, parties=WORKERS, many=True):
    rng = random.Random(seed)
    rec = Recorder(worker)
    barrier(cache, tag, parties)
    for i in range(n):
        do_plain_op(cache, rec, rng, keys, i, many)
    return rec.ops


@ray.remote(num_cpus=0.5, max_retries=0)
def pipelined_worker(cache, worker, keys, n, seed, tag):
    """Pipelined writes (wait=False), reads, updates and sync()s. Returns the ops with each
    pipelined write ending when the next sync() returned, and per op a tighter end: the
    return of this process's next round trip to the write's shard (reads and updates go on
    the same connection, behind the queued writes, and the shard serves it in order)."""
    rng = random.Random(seed)
    rec = Recorder(worker)
    pending: list[tuple[int, int]] = []  # (index in rec.ops, shard)
    tight: dict[int, float] = {}
    barrier(cache, tag, WORKERS)

    def settle(shard: int | None, at: float) -> None:
        for j, s in pending:
            if (shard is None or s == shard) and j not in tight:
                tight[j] = at

    for i in range(n):
        k = rng.choice(keys)
        shard = cache.shard_of(k)
        x = rng.random()
        if x < 0.45:
            v = unique_value(worker, i)
            pending.append((len(rec.ops), shard))
            rec.invoke("write", k, v)
            cache.write(k, v)
        elif x < 0.75:
            rec.run("read", k, None, functools.partial(cache.read, k))
            settle(shard, rec.ops[-1].ret)
        elif x < 0.92:
            d = rng.randint(1, 5)
            rec.run("add", k, d, functools.partial(cache.update, k, ADD[d]))
            settle(shard, rec.ops[-1].ret)
        else:
            cache.sync()
            done = time.monotonic()
            settle(None, done)
            for j, _ in pending:
                rec.complete(rec.ops[j], at=done)
            pending.clear()
    cache.sync()
    done = time.monotonic()
    settle(None, done)
    for j, _ in pending:
        rec.complete(rec.ops[j], at=done)
    return rec.ops, [tight.get(j) for j in range(len(rec.ops))]


@ray.remote(num_cpus=0.5, max_retries=0)
def counter_worker(cache, worker, keys, n, seed, tag):
    rng = random.Random(seed)
    rec = Recorder(worker)
    barrier(cache, tag, WORKERS)
    for _ in range(n):
        k, d = rng.choice(keys), rng.randint(1, 5)
        rec.run("add", k, d, functools.partial(cache.update, k, ADD[d]))
    return rec.ops


@ray.remote(num_cpus=0.5, max_retries=0)
def lease_owner(cache, keys, n, seed, tag, ttl_ms):
    """Blocks of 1-8 ops inside ``with cache.lease(...)`` on 1 or 2 keys until ``n`` ops were
    done, up to 0.5 ms apart (so other workers recall the lease in mid-block, and the owner
    takes it back), up to 2 ms between blocks. Returns the ops and, per block, (start, end,
    ops, LeaseLostError text or None).

    A LeaseLostError means writes made under the lease were refused. The error can surface
    one block late (a recall's RELEASE is refused in the poller thread and raised by the next
    release or sync), so the writes and updates of this block and the one before are recorded
    as of unknown outcome. A block that itself lasted near the TTL may legitimately lose its
    lease: then its reads are not claims about the shared value either, and are dropped."""
    rng = random.Random(seed)
    rec = Recorder(0)  # the other workers are 1..3
    blocks = []
    previous: list[Op] = []
    barrier(cache, tag, WORKERS)
    done = 0
    while done < n:
        ks = rng.sample(keys, rng.choice((1, 1, 2)))
        m = min(rng.randint(1, 8), n - done)
        first = len(rec.ops)
        error = None
        started = time.monotonic()
        try:
            with cache.lease(*ks, ttl_ms=ttl_ms):
                for j in range(m):
                    do_plain_op(cache, rec, rng, ks, done + j, many=False)
                    time.sleep(rng.uniform(0, 0.0005))
        except LeaseLostError as e:
            error = str(e)
        ended = time.monotonic()
        block = rec.ops[first:]
        if error is not None:
            _lost(block + previous, drop_reads=ended - started > ttl_ms / 2000)
        blocks.append((started, ended, len(block), error))
        previous = block
        done += m
        time.sleep(rng.uniform(0, 0.002))
    try:
        cache.sync()  # a refused recall RELEASE of the last block surfaces here
    except LeaseLostError as e:
        _lost(previous, drop_reads=False)
        blocks.append((time.monotonic(), time.monotonic(), 0, f"at the final sync: {e}"))
    return rec.ops, blocks


def _lost(ops: list[Op], drop_reads: bool) -> None:
    for op in ops:
        if op.kind != "read" or drop_reads:
            op.ret, op.result = INF, None


@ray.remote(num_cpus=0.5, max_retries=0)
def plain_worker_through_kills(cache, worker, keys, n, seed, tag):
    """``plain_worker`` that records an op whose call raised as of unknown outcome and goes
    on, until the driver writes ``("stop", tag)`` (at most ``n`` ops); returns the ops and
    the errors' texts."""
    from persistroids_dist import PersistroidsError

    rng = random.Random(seed)
    rec = Recorder(worker)
    errors = []
    barrier(cache, tag, WORKERS)
    for i in range(n):
        if i % 50 == 0 and cache.read(("stop", tag)):
            break
        try:
            do_plain_op(cache, rec, rng, keys, i, many=False)
        except PersistroidsError as e:  # the op stays unknown: it may have been applied
            errors.append(f"{type(e).__name__}: {e}")
    return rec.ops, errors


# -- driver side ------------------------------------------------------------------------------
def run(worker_fn, cache, keys, *, n=OPS, seed=0, **kwargs) -> list[Any]:
    tag = uuid.uuid4().hex
    refs = [worker_fn.remote(cache, w, keys, n, seed * 100 + w, tag, **kwargs)
            for w in range(WORKERS)]
    return ray.get(refs, timeout=300)


def final_reads(cache, keys) -> list[Op]:
    """The driver's reads after every worker returned (and so after all their writes)."""
    rec = Recorder("driver")
    for k in keys:
        rec.run("read", k, None, functools.partial(cache.read, k))
    return rec.ops


def overlap(history: list[Op]) -> int:
    """How many ops overlap an op of another process on the same key (contention evidence)."""
    count = 0
    by_key: dict[Any, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    for ops in by_key.values():
        ops.sort(key=lambda o: o.call)
        for i, op in enumerate(ops):
            j = i + 1
            while j < len(ops) and ops[j].call <= op.ret:
                if ops[j].process != op.process:
                    count += 1
                    break
                j += 1
    return count


def assert_linearizable(history: list[Op], what: str) -> None:
    res = check(history, initial=0)
    assert res.ok, (f"{what}: {len(res.anomalies)} anomalies in {res.ops} ops "
                    f"({overlap(history)} overlapping):\n{res.explain()}")


# -- tests --------------------------------------------------------------------------------------
def test_plain_reads_writes_and_updates_are_linearizable(make_cache):
    cache = make_cache(init_fn=zero)
    keys = ["p0", "p1", "p2"]
    history = [op for ops in run(plain_worker, cache, keys, seed=1) for op in ops]
    assert sum(op.process != "driver" for op in history) >= WORKERS * OPS
    history += final_reads(cache, keys)
    assert_linearizable(history, "plain")


def test_pipelined_writes_acknowledged_by_sync_are_linearizable(make_cache):
    cache = make_cache(init_fn=zero)
    keys = ["q0", "q1", "q2", "q3"]
    loose, tight = [], []
    for ops, ends in run(pipelined_worker, cache, keys, seed=2):
        assert not any(op.unknown for op in ops)  # every pipelined write was synced
        loose += ops
        tight += [op if end is None else Op(op.process, op.key, op.kind, op.arg, op.result,
                                             op.call, end)
                  for op, end in zip(ops, ends)]
    assert sum(op.kind == "write" for op in loose) > WORKERS * OPS // 3
    last = final_reads(cache, keys)
    # As documented: a pipelined write is done once sync() returned...
    assert_linearizable(loose + last, "pipelined, writes ending at sync()")
    # ...and read-your-writes: once this process's next request to that shard returned.
    assert_linearizable(tight + last, "pipelined, writes ending at the next round trip")


def test_concurrent_updates_are_linearizable_and_none_is_lost(make_cache):
    cache = make_cache(init_fn=zero)
    keys = ["c0", "c1", "c2"]
    history = [op for ops in run(counter_worker, cache, keys, seed=3) for op in ops]
    last = final_reads(cache, keys)
    assert_linearizable(history + last, "counters")
    for op in last:
        assert op.result == sum(o.arg for o in history if o.key == op.key), op.key


def test_leases_under_recall_are_linearizable(make_cache):
    """One worker works inside exclusive leases while three others read, write and update the
    same keys (each of their ops recalls the lease). A LeaseLostError in a block much shorter
    than the TTL is a bug (the lease was dropped while its owner was alive), and so is any
    history that is not linearizable."""
    ttl_ms = 5000.0
    rounds = 5
    cache = make_cache(init_fn=zero)
    failures = []
    recalls_before = 0
    for rnd in range(rounds):
        keys = [f"l{rnd}.{i}" for i in range(3)]
        tag = uuid.uuid4().hex
        refs = [lease_owner.remote(cache, keys, OPS, 1000 + rnd, tag, ttl_ms)]
        refs += [plain_worker.remote(cache, w, keys, OPS, 1000 + rnd * 10 + w, tag,
                                     many=False)
                 for w in range(1, WORKERS)]
        (owner_ops, blocks), *others = ray.get(refs, timeout=300)
        history = owner_ops + [op for ops in others for op in ops] + final_reads(cache, keys)
        lost = [b for b in blocks if b[3] is not None]
        early = [b for b in lost if b[1] - b[0] < ttl_ms / 2000]
        res = check(history, initial=0)
        recalls = cache.metrics()["total"]["recalls"]
        if early or not res.ok:
            failures.append(
                f"round {rnd}: {len(blocks)} lease blocks, {len(early)} LeaseLostError in "
                f"blocks far shorter than the TTL"
                + "".join(f"\n  block of {b[2]} ops lasting {(b[1] - b[0]) * 1000:.1f} ms: "
                          f"{b[3]}" for b in early[:3])
                + ("" if res.ok else f"\n  not linearizable:\n{res.explain()}"))
        assert recalls > recalls_before, "no lease was recalled: the test lost its point"
        recalls_before = recalls
    assert not failures, f"{len(failures)} of {rounds} histories failed:\n" + "\n".join(failures)


def test_histories_across_shard_kills_are_linearizable(make_cache, tmp_path):
    """Both shards are SIGKILLed, one after the other, while four workers read, write and
    update three keys. Calls wait for Ray's restart and resend what was not answered; the
    restarted shard replays its journal and applies each resent request once. An op that
    raised would count as of unknown outcome, but none should: that is the claim."""
    import os
    import signal

    cache = make_cache(init_fn=zero, journal=tmp_path / "journal")
    keys = ["k0", "k1", "k2", "k3"]
    assert len({cache.shard_of(k) for k in keys}) == 2
    tag = uuid.uuid4().hex
    refs = [plain_worker_through_kills.remote(cache, w, keys, 20_000, 700 + w, tag)
            for w in range(WORKERS)]
    deadline = time.monotonic() + 60
    while cache.read(("barrier", tag)) < WORKERS:  # the workers are running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pids = [m["pid"] for m in cache.metrics()["shards"]]
    for shard in (0, 1):
        time.sleep(0.3)
        os.kill(pids[shard], signal.SIGKILL)
    killed = time.monotonic()
    for k in keys:  # both shards serve again (restarted, journal replayed)...
        cache.read(k)
    time.sleep(0.5)  # ...and the workers go on a while, then stop
    cache.write(("stop", tag), 1, wait=True)
    results = ray.get(refs, timeout=300)
    history = [op for ops, _ in results for op in ops]
    errors = [e for _, errs in results for e in errs]
    m = cache.metrics()["shards"]
    assert [s["restarts"] for s in m] == [1, 1]
    assert sum(s["sessions_resumed"] for s in m) >= 1
    assert not errors, errors[:5]
    assert sum(op.unknown for op in history) == 0
    assert sum(op.call > killed for op in history) >= 100  # the history spans the kills
    history += final_reads(cache, keys)
    assert_linearizable(history, "across shard kills")


def test_evictions_to_sqlite_are_linearizable(make_cache, tmp_path):
    from persistroids_dist.connectors.sqlite import SQLiteConnector

    path = tmp_path / "kv.sqlite3"
    # Two entries per shard for 8 keys: most reads miss and go back to the store.
    cache = make_cache([SQLiteConnector(path)], init_fn=zero, max_entries=2,
                       writes_threshold=4, millis_threshold=50)
    keys = [f"e{i}" for i in range(8)]
    history = [op for ops in run(plain_worker, cache, keys, seed=5) for op in ops]
    last = final_reads(cache, keys)
    assert_linearizable(history + last, "evictions to SQLite")
    total = cache.metrics()["total"]
    assert total["evictions"] > 0 and total["read"] > 0, total
    cache.flush_now()
    store = SQLiteConnector(path)
    try:  # what the store holds is what the cache serves (never-written keys: init_fn's 0)
        assert [store.read(op.key) or 0 for op in last] == [op.result for op in last]
    finally:
        store.disconnect()
