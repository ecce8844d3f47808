"""Demo: parallel Ray workers increment shared counters through the cache on SQLite.

Run with ``python -m persistroids_dist.demo`` (``make demo``). Every worker increments every
counter; the demo checks the final counts are exact (in the cache, and in SQLite after
shutdown) and prints the rate of each way of doing it, measured in this run:

* cache, leased: a worker leases one counter (``with cache.lease(key)``), increments it
  in-process, and gives it back with its value; a worker that wants a counter someone else
  holds gets it handed over (a recall). The stores get one write per lease, not per increment.
* cache, pipelined: ``cache.update(key, add_one, wait=False)`` then ``sync()``: no round trip
  per increment, each increment still applied atomically in the shard that owns the key.
* direct SQLite / PostgreSQL: the same increments as one autocommitted upsert each (the
  database does the atomicity); PostgreSQL only when reachable (PERSISTROIDS_PG_DSN), on
  fewer increments since each one waits for its commit.

Each rate is wall-clock time from submitting the workers' tasks to their end, on worker
processes started (and connected to the cache) beforehand.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector

PG_DSN = os.environ.get("PERSISTROIDS_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
UPSERT = "INSERT INTO {t} (k, v) VALUES ({p}, 1) ON CONFLICT (k) DO UPDATE SET v = {t}.v + 1"


def add_one(v: int) -> int:
    return v + 1


def quotas(keys: list[str], increments: int) -> list[int]:
    """How many of one worker's ``increments`` go to each key (round robin)."""
    n, extra = divmod(increments, len(keys))
    return [n + (j < extra) for j in range(len(keys))]


@ray.remote
def leased_worker(cache: pd.Cache, keys: list[str], increments: int, first: int) -> None:
    # Each worker starts at another counter, so workers seldom want the same one at once;
    # when they do, the shard recalls it from its holder, value included: counts stay exact.
    todo = quotas(keys, increments)
    for j in [(first + i) % len(keys) for i in range(len(keys))]:
        if todo[j]:
            with cache.lease(keys[j]):  # in-process from here: no round trip per update
                for _ in range(todo[j]):
                    cache.update(keys[j], add_one)
    cache.sync()


@ray.remote
def pipelined_worker(cache: pd.Cache, keys: list[str], increments: int, _first: int) -> None:
    for i in range(increments):
        # Pipelined: no round trip per increment; each still runs atomically in its shard.
        cache.update(keys[i % len(keys)], add_one, wait=False)
    cache.sync()  # every increment applied before the task reports done


@ray.remote
def sqlite_worker(path: str, keys: list[str], increments: int) -> None:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)  # autocommit
    db.execute("PRAGMA synchronous=NORMAL")
    upsert = UPSERT.format(t="counters", p="?")
    for i in range(increments):
        db.execute(upsert, (keys[i % len(keys)],))
    db.close()


@ray.remote
def postgres_worker(dsn: str, table: str, keys: list[str], increments: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        upsert = UPSERT.format(t=table, p="%s")
        for i in range(increments):
            db.execute(upsert, (keys[i % len(keys)],))


@ray.remote
def warm_up(cache: pd.Cache) -> None:
    """Start the worker processes, import what the runs use and connect them to the cache's
    shards (as long-lived workers would be), before timing any run."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pass
    cache.metrics()  # a round trip to every shard
    time.sleep(0.05)  # overlap, so every worker process gets one


def timed(refs: Callable[[], list[Any]]) -> float:
    started = time.perf_counter()
    ray.get(refs())
    return time.perf_counter() - started


def postgres_connection() -> tuple[Any, str]:
    """A connection to PostgreSQL, or None and why not."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    try:
        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3), ""
    except Exception as e:  # noqa: BLE001 - any failure means: not reachable, say why
        return None, f"not reachable at {PG_DSN} ({type(e).__name__})"


def run_postgres(db: Any, keys: list[str], workers: int,
                 increments: int) -> tuple[float, list[int]]:
    """Time the direct PostgreSQL run in a table of its own, dropped at the end; closes db."""
    table = f"persistroids_demo_{uuid.uuid4().hex[:12]}"
    try:
        db.execute(f"CREATE TABLE {table} (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
        seconds = timed(lambda: [postgres_worker.remote(PG_DSN, table, keys, increments)
                                 for _ in range(workers)])
        got = dict(db.execute(f"SELECT k, v FROM {table}").fetchall())
    finally:
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.close()
    return seconds, [got.get(k, 0) for k in keys]


def ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.0f}x" if r >= 99.5 else f"{r:.1f}x" if r >= 0.95 else f"{r:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--increments", type=int, default=10000, help="per worker")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--pg-increments", type=int, default=500,
                        help="per worker on PostgreSQL (at most --increments; each one commits)")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args(argv)
    workers, increments = args.workers, args.increments
    keys = [f"counter-{i}" for i in range(args.keys)]
    expected = [workers * q for q in quotas(keys, increments)]
    pg_increments = min(args.pg_increments, increments)
    pg_expected = [workers * q for q in quotas(keys, pg_increments)]

    pd.ensure_ray(address="local", num_cpus=2)  # a private Ray, never a running cluster
    rates: list[tuple[str, float, bool]] = []  # (idiom, increments/s, exact)
    with tempfile.TemporaryDirectory(prefix="persistroids-demo-") as tmp:
        store = os.path.join(tmp, "cache.db")
        cache = pd.init([SQLiteConnector(store, table="counters")],
                        init_fn=lambda key: 0, num_shards=2, name=f"demo-{uuid.uuid4().hex[:8]}")
        ray.get([warm_up.remote(cache) for _ in range(workers)])
        runs = [("cache: lease + update per counter", "leased", leased_worker),
                ("cache: update(wait=False) + sync", "pipelined", pipelined_worker)]
        for label, prefix, worker in runs:
            mine = [f"{prefix}/{k}" for k in keys]
            started = time.perf_counter()
            ray.get([worker.remote(cache, mine, increments, w) for w in range(workers)])
            seconds = time.perf_counter() - started
            rates.append((label, workers * increments / seconds,
                          cache.read_many(mine) == expected))
        flushed = cache.shutdown(disconnect=True)["total"]
        stored = SQLiteConnector(store, table="counters")
        persisted = all([stored.read(f"{prefix}/{k}") for k in keys] == expected
                        for _, prefix, _ in runs)
        stored.disconnect()

        direct = os.path.join(tmp, "direct.db")
        db = sqlite3.connect(direct)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE counters (k TEXT PRIMARY KEY, v INTEGER)")
        db.close()
        seconds = timed(lambda: [sqlite_worker.remote(direct, keys, increments)
                                 for _ in range(workers)])
        db = sqlite3.connect(direct)
        got = dict(db.execute("SELECT k, v FROM counters"))
        db.close()
        rates.append(("direct SQLite: upsert, autocommit", workers * increments / seconds,
                      [got.get(k, 0) for k in keys] == expected))

    pg_note = "PostgreSQL: skipped (--no-postgres)"
    if not args.no_postgres:
        db, why = postgres_connection()
        if db is None:
            pg_note = f"PostgreSQL: skipped, {why}"
        else:
            setting = db.execute("SHOW synchronous_commit").fetchone()[0]
            seconds, counts = run_postgres(db, keys, workers, pg_increments)
            rates.append(("direct PostgreSQL: same*", workers * pg_increments / seconds,
                          counts == pg_expected))
            pg_note = (f"* on {workers} x {pg_increments:,} increments, synchronous_commit="
                       f"{setting} (SQLite: synchronous=NORMAL, no fsync per commit)")
    ray.shutdown()

    sqlite_rate = rates[2][1]
    pg_rate = rates[3][1] if len(rates) > 3 else None
    print(f"{workers} Ray workers x {increments:,} increments, round robin over {len(keys)} "
          f"shared counters (each ends at {expected[0]:,}"
          f"{'' if len(set(expected)) == 1 else f' or {expected[-1]:,}'})")
    print(f"{'idiom':36}{'increments/s':>13}{'vs SQLite':>11}{'vs PostgreSQL':>15}  exact")
    for label, rate, ok in rates:
        vs_pg = ratio(rate, pg_rate) if pg_rate else "-"
        print(f"{label:36}{rate:>13,.0f}{ratio(rate, sqlite_rate):>11}{vs_pg:>15}  "
              f"{'yes' if ok else 'NO'}")
    print(pg_note)
    print(f"SQLite behind the cache got {flushed['flush']} row writes in "
          f"{flushed['flush_calls']} flushes for {2 * workers * increments:,} increments; "
          f"persisted exactly: {'yes' if persisted else 'NO'}")
    ok = persisted and all(ok for _, _, ok in rates)
    print(f"exact: {'yes' if ok else 'NO'}")
    if not ok:
        raise SystemExit("counts were not exact")


if __name__ == "__main__":
    main()
