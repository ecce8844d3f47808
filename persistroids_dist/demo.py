"""Demo: parallel Ray workers increment shared counters through the cache on SQLite.

Run with ``python -m persistroids_dist.demo`` (``make demo``). Prints the exact final counts,
the cache's metrics, and the time beside the same work done directly on SQLite.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time

import ray

import persistroids_dist as pd
from connectors.sqlite import SQLiteConnector


@ray.remote
def cache_worker(cache: pd.Cache, keys: list[str], increments: int) -> int:
    add_one = lambda v: v + 1  # noqa: E731 - shipped to the shard once, then reused
    for i in range(increments):
        # Pipelined: no round trip per increment; each still runs atomically in its shard.
        cache.update(keys[i % len(keys)], add_one, wait=False)
    cache.sync()  # every increment applied before the task reports done
    return increments


@ray.remote
def warm_up() -> None:
    """Start the worker processes before timing (both runs then use warm workers)."""


@ray.remote
def sqlite_worker(path: str, keys: list[str], increments: int) -> int:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA synchronous=NORMAL")
    for i in range(increments):
        db.execute("INSERT INTO counters (k, v) VALUES (?, 1) "
                   "ON CONFLICT(k) DO UPDATE SET v = v + 1", (keys[i % len(keys)],))
    db.close()
    return increments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--increments", type=int, default=2500, help="per worker")
    parser.add_argument("--keys", type=int, default=10)
    args = parser.parse_args(argv)
    keys = [f"counter-{i}" for i in range(args.keys)]
    expected = args.workers * args.increments // args.keys

    pd.ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="persistroids-demo-") as tmp:
        ray.get([warm_up.remote() for _ in range(args.workers)])
        store = os.path.join(tmp, "cache.db")
        cache = pd.init([SQLiteConnector(store, table="counters")],
                        init_fn=lambda key: 0, num_shards=2, name="demo")
        started = time.perf_counter()
        ray.get([cache_worker.remote(cache, keys, args.increments)
                 for _ in range(args.workers)])
        counts = cache.read_many(keys)
        cache_s = time.perf_counter() - started
        final = cache.shutdown(disconnect=True)

        stored = SQLiteConnector(store, table="counters")
        persisted = [stored.read(k) for k in keys]
        stored.disconnect()

        direct = os.path.join(tmp, "direct.db")
        db = sqlite3.connect(direct)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE counters (k TEXT PRIMARY KEY, v INTEGER)")
        db.close()
        started = time.perf_counter()
        ray.get([sqlite_worker.remote(direct, keys, args.increments)
                 for _ in range(args.workers)])
        direct_s = time.perf_counter() - started
        db = sqlite3.connect(direct)
        direct_counts = dict(db.execute("SELECT k, v FROM counters"))
        db.close()

    total = args.workers * args.increments
    print(f"{args.workers} Ray workers x {args.increments} increments on {args.keys} keys")
    print(f"final counts (cache):   {counts}")
    print(f"persisted in SQLite:    {persisted}")
    ok = counts == persisted == [expected] * args.keys
    ok = ok and [direct_counts[k] for k in keys] == [expected] * args.keys
    print(f"exact: {'yes' if ok else 'NO'} (expected {expected} each)")
    t = final["total"]
    print("metrics (total):", {k: t[k] for k in ("lookup", "read", "write", "flush", "hits",
                                                 "misses", "updates", "flush_calls")})
    print(f"through the cache: {cache_s:.2f} s ({total / cache_s:,.0f} increments/s)")
    print(f"directly on SQLite: {direct_s:.2f} s ({total / direct_s:,.0f} increments/s)")
    print(f"speed-up: {direct_s / cache_s:.1f}x")
    ray.shutdown()
    if not ok:
        raise SystemExit("counts were not exact")


if __name__ == "__main__":
    main()
