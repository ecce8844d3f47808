"""B5, shared counters: 2 Ray tasks x M atomic cache.update increments over 100 keys against
the same with Redis INCR; reported too, update(wait=False) pipelined with one sync() per task."""

from __future__ import annotations

import gc
import os
import time

import ray
import redis

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, rounds


@ray.remote(num_cpus=1)
def _noop() -> int:
    return os.getpid()


@ray.remote(num_cpus=1, max_retries=0)
def _b5_cache_worker(cache: pd.Cache, keys: list[str], m: int, start_at: float,
                     pipelined: bool = False) -> tuple[float, float]:
    """M atomic increments spread over ``keys``; returns (start, end) wall-clock times.

    ``pipelined``: ``update(k, fn, wait=False)`` then one ``sync()`` (counted in the time)."""

    def inc(v: int) -> int:
        return v + 1

    cache.read_many(keys)  # open this process's connections to every shard
    update = cache.update
    n = len(keys)
    while time.time() < start_at:
        time.sleep(0.0005)
    gc.disable()
    t0 = time.time()
    if pipelined:
        for i in range(m):
            update(keys[i % n], inc, wait=False)
        cache.sync()
    else:
        for i in range(m):
            update(keys[i % n], inc)
    t1 = time.time()
    gc.enable()
    return t0, t1


@ray.remote(num_cpus=1, max_retries=0)
def _b5_redis_worker(url: str, keys: list[str], m: int, start_at: float) -> tuple[float, float]:
    """M Redis INCRs spread over ``keys``; returns (start, end) wall-clock times."""
    r = redis.Redis.from_url(url, socket_timeout=30)
    r.ping()
    incr = r.incr
    n = len(keys)
    while time.time() < start_at:
        time.sleep(0.0005)
    gc.disable()
    t0 = time.time()
    for i in range(m):
        incr(keys[i % n])
    t1 = time.time()
    gc.enable()
    r.close()
    return t0, t1


@case("B5")
def b5_counters(ctx: Ctx) -> None:
    """2 Ray tasks x M cache.update increments over 100 keys vs the same with Redis INCR."""
    cache = ctx.shared_cache()
    m = ctx.pick(20_000, 4_000)
    n_rounds = ctx.pick(3, 2)
    workers = 2
    pids = set(ray.get([_noop.remote() for _ in range(4)], timeout=120))  # start the workers
    variants = ["ours", "redis", "pipelined"]
    rate: dict[str, list[float]] = {v: [] for v in variants}
    checks: list[str] = []
    expected = workers * m // 100
    for rnd in rounds(ctx, n_rounds):
        for name in variants:
            if name == "redis":
                keys = [f"{ctx.rprefix}b5:{rnd}:{j}" for j in range(100)]
                refs = [_b5_redis_worker.remote(ctx.redis_url, keys, m, time.time() + 1.5)
                        for _ in range(workers)]
            else:
                keys = [f"{ctx.tag}:b5:{name}:{rnd}:{j}" for j in range(100)]
                start_at = time.time() + 1.5
                refs = [_b5_cache_worker.remote(cache, keys, m, start_at, name == "pipelined")
                        for _ in range(workers)]
            spans = ray.get(refs, timeout=300)
            t0 = min(s[0] for s in spans)
            t1 = max(s[1] for s in spans)
            rate[name].append(workers * m / (t1 - t0))
            if name == "redis":
                finals = [int(v) for v in ctx.redis.mget(keys)]
            else:
                finals = cache.read_many(keys)
            if finals != [expected] * 100 or sum(finals) != workers * m:
                checks.append(f"round {rnd} {name}: total {sum(finals)}, expected "
                              f"{workers * m} ({expected} per key)")
    m_rate = {k: med(v) for k, v in rate.items()}
    mo, ma = m_rate["ours"], m_rate["redis"]
    ctx.details["B5"] = {"updates_per_s": rate, "median_updates_per_s": m_rate,
                         "workers": workers, "updates_per_worker": m,
                         "worker_pids_seen": len(pids), "checks_failed": checks}
    exact = "totals exact" if not checks else "TOTALS WRONG: " + "; ".join(checks)
    ctx.rows.append(Row("B5", "shared counters, 2 tasks (updates/s)", "Redis INCR, 2 tasks",
                        ma, mo, "/s", ">= 20k/s", mo >= 20_000,
                        f"{workers}x{m:,} update(k, fn) round trips over 100 keys; {exact}"))
    ctx.rows.append(Row("B5", "counters, update(wait=False) (updates/s)", "Redis INCR, 2 tasks",
                        ma, m_rate["pipelined"], "/s", "-", None,
                        f"{workers}x{m:,} pipelined updates + sync() per task; {exact}"))
