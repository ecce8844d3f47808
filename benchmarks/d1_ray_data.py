"""D1, Ray Data: one pipeline (look up each row's value by key, compute, write it back) in
``map_batches``, through the cache against the same pipeline on redis-py MGET / MSET.

Both pipelines have the same three ``map_batches`` stages with the same batch size, which Ray
Data fuses into one task per block: lookup (``persistroids_dist.CacheLookup``: one
``read_many`` per batch; Redis: one MGET on a pooled client that each worker process makes on
its first batch), compute (``new = old + 1``, in NumPy), write back (``CacheWrite``: one
``write_many``; Redis: one MSET) returning the count of rows written. Redis values are msgpack
(``encode_value``) like the cache's. A third pipeline with the same stages and no store shows
what Ray Data itself costs on this machine. Rows per second are over the whole pipeline run
(submitted to every count back in the driver), medians over rounds; the order of the three
rotates from round to round. A second row runs the same stages on one batch in the driver,
without Ray Data: the store calls and the column conversions alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import redis

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, rounds, zero
from persistroids_dist.codec import decode_value, encode_value

BATCH = 4096  # rows per batch, the same in every stage of every pipeline

# One pooled redis-py client per worker process and URL, made on the process's first batch
# (a Ray worker process runs many batches in turn), as the cache's connections are.
_CLIENTS: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    r = _CLIENTS.get(url)
    if r is None:
        r = _CLIENTS[url] = redis.Redis.from_url(url, socket_timeout=30)
    return r


class RedisLookup:
    """The Redis side of the lookup stage: MGET of the batch's keys into column ``old``."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.prefix
        raw = _client(self.url).mget([f"{p}{i}" for i in batch["id"].tolist()])
        old = [0 if b is None else decode_value(b) for b in raw]
        return {**batch, "old": np.array(old)}


class RedisWrite:
    """The Redis side of the write stage: MSET of column ``new``; returns the count."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.prefix
        ids = batch["id"].tolist()
        _client(self.url).mset({f"{p}{i}": encode_value(v)
                                for i, v in zip(ids, batch["new"].tolist())})
        return {"written": np.array([len(ids)])}


def no_lookup(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "old": np.zeros(len(batch["id"]), dtype=np.int64)}


def no_write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"written": np.array([len(batch["id"])])}


def compute(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "new": batch["old"] + 1}


def run_pipeline(n: int, blocks: int, lookup: Any, write: Any) -> tuple[int, float]:
    """Run range(n) -> lookup -> compute -> write; return (rows written, seconds)."""
    t = pc()
    ds = ray.data.range(n, override_num_blocks=blocks)
    ds = ds.map_batches(lookup, batch_size=BATCH)
    ds = ds.map_batches(compute, batch_size=BATCH)
    ds = ds.map_batches(write, batch_size=BATCH)
    written = sum(int(b["written"].sum()) for b in ds.iter_batches(batch_size=None))
    return written, pc() - t


@case("D1")
def d1_ray_data(ctx: Ctx) -> None:
    """A Ray Data lookup-compute-write pipeline through the cache vs redis-py MGET / MSET."""
    n = ctx.pick(200_000, 40_000)
    blocks = 8
    n_rounds = ctx.pick(5, 3)
    data_ctx = ray.data.DataContext.get_current()
    bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False
    cache = pd.init(init_fn=zero, num_shards=4, name=f"bench-d1-{ctx.tag}")
    ctx.caches.append(cache)
    prefix = f"{ctx.rprefix}d1:"
    r = ctx.redis
    start = 1000  # every key starts with this value on both sides
    cache.write_many((i, start) for i in range(n))
    for i in range(0, n, 10_000):
        r.mset({f"{prefix}{k}": encode_value(start) for k in range(i, min(n, i + 10_000))})
    pipelines = {
        "cache": (pd.CacheLookup(cache, key="id", column="old"),
                  pd.CacheWrite(cache, key="id", value="new", output="count")),
        "redis": (RedisLookup(ctx.redis_url, prefix), RedisWrite(ctx.redis_url, prefix)),
        "ray_data_only": (no_lookup, no_write),
    }
    names = list(pipelines)
    runs = 0
    rate: dict[str, list[float]] = {k: [] for k in names}
    counts_ok = True
    try:
        for name in names:  # warm up: worker processes, imports, connections
            written, _ = run_pipeline(n, blocks, *pipelines[name])
            counts_ok &= written == n
        runs += 1
        for rnd in rounds(ctx, n_rounds):
            order = names[rnd % 3:] + names[:rnd % 3]
            for name in order:
                with no_gc():
                    written, seconds = run_pipeline(n, blocks, *pipelines[name])
                counts_ok &= written == n
                rate[name].append(n / seconds)
            runs += 1
    finally:
        data_ctx.enable_progress_bars = bars
    # The same stages on one batch in this process, without Ray Data: what the store calls
    # and their conversions cost by themselves (on 2 shared cores the pipelines above also
    # share the CPUs with Ray Data's workers, the shards' background work and Redis).
    batch = {"id": np.arange(BATCH, dtype=np.int64)}
    in_process: dict[str, list[float]] = {"cache": [], "redis": []}
    reps = ctx.pick(20, 5)
    for _ in rounds(ctx, n_rounds):
        for name in ("cache", "redis"):
            lookup, write = pipelines[name]
            with no_gc():
                t = pc()
                for _ in range(reps):
                    write(compute(lookup(batch)))
                in_process[name].append(reps * BATCH / (pc() - t))
    # Every pipeline run added 1 to every key, on both sides; the in-process batches added
    # one per repetition to the batch's keys.
    bumps = reps * len(in_process["cache"])
    want = [start + runs + (bumps if i < BATCH else 0) for i in range(n)]
    cache_ok = cache.read_many(range(n)) == want
    redis_ok = [decode_value(v) for v in r.mget([f"{prefix}{i}" for i in range(n)])] == want
    cache.shutdown()
    ctx.caches.remove(cache)
    m = {k: med(v) for k, v in rate.items()}
    ratios = [c / x for c, x in zip(rate["cache"], rate["redis"])]
    ok = cache_ok and redis_ok and counts_ok
    ctx.details["D1"] = {"rows_per_s": rate, "median_rows_per_s": m,
                         "cache_over_redis_per_round": ratios, "rows": n, "blocks": blocks,
                         "batch_size": BATCH, "pipeline_runs": runs, "values_ok": ok}
    note = (f"{n:,} rows, {blocks} blocks, batches of {BATCH}; Ray Data alone (no store) "
            f"{m['ray_data_only'] / 1000:.0f}k rows/s; per-round ratios "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; values "
            + ("exact on both sides" if ok else "WRONG"))
    ctx.rows.append(Row("D1", "Ray Data lookup+compute+write (rows/s)",
                        "same pipeline, Redis MGET/MSET", m["redis"], m["cache"], "/s",
                        ">= 1x", m["cache"] >= m["redis"], note))
    p = {k: med(v) for k, v in in_process.items()}
    ctx.details["D1"]["in_process_rows_per_s"] = in_process
    ctx.rows.append(Row("D1", f"same stages, one {BATCH}-row batch in-process (rows/s)",
                        "same, Redis MGET/MSET", p["redis"], p["cache"], "/s", "-", None,
                        f"{reps} batches per round, no Ray Data: the store calls and "
                        "conversions alone"))
