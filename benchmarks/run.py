"""The persistroids-dist benchmark suite: every case next to its anchor, in one run.

Run ``python -m benchmarks.run [--quick] [--json PATH] [--md PATH] [--only B1,B3]``. It starts
a small local Ray (2 CPUs), uses the PostgreSQL and Redis servers that are running (DSN from
``PERSISTROIDS_PG_DSN``, else ``postgresql://postgres@127.0.0.1:5432/test``; Redis from
``PERSISTROIDS_REDIS_URL``, else ``redis://127.0.0.1:6379/0``), and removes everything it made:
caches, PostgreSQL tables, Redis keys (one unique prefix per run) and temporary SQLite files.

How to read the table
---------------------
One row compares this project ("ours") with an anchor doing the same work in the same run:

* ``anchor`` / ``ours``: the figure of each side. Throughputs (``/s``) are medians over rounds;
  latencies are p50 over every sample of every round (p99 in the JSON and the notes); memory is
  bytes per entry beyond the key and value objects themselves.
* ``ratio``: ours divided by the anchor, in the row's unit. For a throughput, higher is better
  (``120x`` = 120 times the anchor's rate); for a latency or memory, lower is better
  (``0.3x`` = 30% of the anchor's time).
* ``target`` / ``met``: the goal the project set itself, either on the ratio (``>= 100x``,
  ``<= 0.25x``) or on our absolute figure (``>= 500k/s``, ``<= 2 us``). ``-`` rows are reported
  for honesty only (no target).

Some anchors run fewer iterations than ours (a PostgreSQL round trip costs ~0.5 ms); they are
compared per iteration or per row, and the notes say so. The machine is small and shared
(2 cores): compare ratios, not absolute figures, and expect a few percent of noise. Benchmarks
never assert; a correctness check that fails is reported in the notes and in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import ray
import redis
from persistroids_dist.connectors.postgres import DEFAULT_DSN as PG_DEFAULT_DSN
from persistroids_dist.connectors.postgres import ENV_DSN as PG_ENV_DSN
from persistroids_dist.connectors.postgres import PostgresConnector
from persistroids_dist.connectors.redis import DEFAULT_URL as REDIS_DEFAULT_URL
from persistroids_dist.connectors.redis import ENV_URL as REDIS_ENV_URL
from persistroids_dist.connectors.sqlite import SQLiteConnector

import persistroids_dist as pd
from benchmarks.keys import k1_tuple_keys
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.shard import ShardCore

CASES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "C1", "K1")
pc = time.perf_counter
pc_ns = time.perf_counter_ns


# -- results ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the results table."""

    case: str
    what: str
    anchor: str
    anchor_value: float | None
    ours: float | None
    unit: str
    target: str = "-"
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.anchor_value and self.ours is not None:
            return self.ours / self.anchor_value
        return None


@dataclass
class Ctx:
    """Settings and shared resources of one run."""

    quick: bool
    tag: str
    pg_dsn: str
    redis_url: str
    tmpdir: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    pg_tables: list[str] = field(default_factory=list)
    caches: list[pd.Cache] = field(default_factory=list)
    _shared: pd.Cache | None = None
    _redis: redis.Redis | None = None

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def budget_s(self) -> float:
        """Wall-clock budget of one case's rounds (at least one round always runs)."""
        return self.pick(75.0, 9.0)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=30)
        return self._redis

    @property
    def rprefix(self) -> str:
        return f"pdbench:{self.tag}:"

    def pg_table(self, name: str) -> str:
        table = f"pdbench_{self.tag}_{name}"
        self.pg_tables.append(table)
        return table

    def shared_cache(self) -> pd.Cache:
        """One in-memory-backed cache of 4 shards for B2-B5 (distinct keys per case)."""
        if self._shared is None:
            self._shared = pd.init(init_fn=_zero, num_shards=4, name=f"bench-{self.tag}")
            self.caches.append(self._shared)
        return self._shared


def _zero(args: Any) -> int:
    """init_fn of every benchmark cache: a missing key counts from 0."""
    return 0


# -- measuring helpers ------------------------------------------------------------------------
@contextmanager
def no_gc() -> Iterator[None]:
    """Collect, then keep the cyclic GC off for the timed block only."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def pctl(samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``samples``."""
    s = sorted(samples)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))
    return s[i]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounds(ctx: Ctx, n: int) -> Iterator[int]:
    """Round numbers 0..n-1, stopping early (after one round) once the case budget is spent."""
    start = pc()
    for r in range(n):
        if r and pc() - start > ctx.budget_s:
            print(f"    (budget of {ctx.budget_s:.0f}s spent: {r} of {n} rounds)", flush=True)
            return
        yield r


def fmt(value: float | None, unit: str) -> str:
    """A figure with its unit, compactly."""
    if value is None or value != value:
        return "n/a"
    if unit == "/s":
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= div:
                return f"{value / div:.3g}{suffix}/s"
        return f"{value:.3g}/s"
    if unit == "us":
        return f"{value:.3g} us" if value < 100 else f"{value:.0f} us"
    if unit == "B":
        return f"{value:.1f} B"
    return f"{value:.3g} {unit}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def lat_summary(ns: list[int]) -> dict[str, float]:
    us = [x / 1000 for x in ns]
    return {"p50_us": pctl(us, 50), "p99_us": pctl(us, 99), "mean_us": statistics.fmean(us),
            "samples": len(us)}


def pg_connect(ctx: Ctx) -> psycopg.Connection[Any]:
    return psycopg.connect(ctx.pg_dsn, autocommit=True, connect_timeout=5)


# -- B1: the seed loop ------------------------------------------------------------------------
def b1_seed_loop(ctx: Ctx) -> None:
    """read -> increment -> write on one key, PostgreSQL behind the cache."""
    n_lease = ctx.pick(100_000, 20_000)
    n_plain = ctx.pick(5_000, 1_000)
    n_pg = ctx.pick(5_000, 1_000)
    n_sqlite = ctx.pick(20_000, 5_000)
    n_rounds = ctx.pick(3, 2)
    anchor_table = ctx.pg_table("b1_anchor")
    cache_table = ctx.pg_table("b1_cache")
    sqlite_path = os.path.join(ctx.tmpdir, "b1.sqlite3")

    pg = pg_connect(ctx)
    pg.execute(f'CREATE TABLE "{anchor_table}" (k text PRIMARY KEY, v bigint NOT NULL)')
    sel_pg = f'SELECT v FROM "{anchor_table}" WHERE k = %s'
    ups_pg = (f'INSERT INTO "{anchor_table}" (k, v) VALUES (%s, %s) '
              "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")
    lite = sqlite3.connect(sqlite_path, isolation_level=None)
    lite.execute("PRAGMA journal_mode=WAL")
    lite.execute("PRAGMA synchronous=NORMAL")
    lite.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID")
    sel_lite = "SELECT v FROM kv WHERE k = ?"
    ups_lite = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"

    cache = pd.init([PostgresConnector(ctx.pg_dsn, table=cache_table)], init_fn=_zero,
                    num_shards=4, name=f"bench-b1-{ctx.tag}")
    ctx.caches.append(cache)
    cache.read("warmup")  # connect to the shard; its pool connects to PostgreSQL

    res: dict[str, list[float]] = {"pg": [], "sqlite": [], "lease": [], "plain": []}
    checks: list[str] = []
    flush_s: list[float] = []
    for r in rounds(ctx, n_rounds):
        # Anchor 1: PostgreSQL directly, one SELECT and one UPSERT per iteration (autocommit).
        key = f"seed{r}"
        with no_gc():
            t = pc()
            for _ in range(n_pg):
                row = pg.execute(sel_pg, (key,)).fetchone()
                pg.execute(ups_pg, (key, (row[0] if row else 0) + 1))
            res["pg"].append(n_pg / (pc() - t))
        got = pg.execute(sel_pg, (key,)).fetchone()[0]
        if got != n_pg:
            checks.append(f"round {r}: PostgreSQL anchor holds {got}, expected {n_pg}")

        # Anchor 2: SQLite WAL, synchronous=NORMAL.
        with no_gc():
            t = pc()
            for _ in range(n_sqlite):
                row = lite.execute(sel_lite, (key,)).fetchone()
                lite.execute(ups_lite, (key, (row[0] if row else 0) + 1))
            res["sqlite"].append(n_sqlite / (pc() - t))
        got = lite.execute(sel_lite, (key,)).fetchone()[0]
        if got != n_sqlite:
            checks.append(f"round {r}: SQLite anchor holds {got}, expected {n_sqlite}")

        # Ours: inside an exclusive lease (acquire and release counted in the time).
        read, write = cache.read, cache.write
        with no_gc():
            t = pc()
            with cache.lease(key):
                for _ in range(n_lease):
                    write(key, read(key) + 1)
            res["lease"].append(n_lease / (pc() - t))
        got = cache.read(key)
        if got != n_lease:
            checks.append(f"round {r}: cache (lease) holds {got}, expected {n_lease}")

        # Ours without a lease: every read is a round trip, every write is pipelined.
        pkey = f"plain{r}"
        with no_gc():
            t = pc()
            for _ in range(n_plain):
                write(pkey, read(pkey) + 1)
            cache.sync()
            res["plain"].append(n_plain / (pc() - t))
        got = cache.read(pkey)
        if got != n_plain:
            checks.append(f"round {r}: cache (no lease) holds {got}, expected {n_plain}")

        t = pc()
        cache.flush_now()
        flush_s.append(pc() - t)
        row = pg.execute(f'SELECT v FROM "{cache_table}" WHERE k = %s',
                         (encode_value(key),)).fetchone()
        stored = decode_value(row[0]) if row else None
        if stored != n_lease:
            checks.append(f"round {r}: PostgreSQL behind the cache holds {stored}, "
                          f"expected {n_lease}")

    lite.close()
    pg.close()
    cache.shutdown()
    ctx.caches.remove(cache)
    m = {k: med(v) for k, v in res.items()}
    per_it = "per iteration: ours {} it, PG {} it, SQLite {} it per round".format(
        f"{n_lease:,}", f"{n_pg:,}", f"{n_sqlite:,}")
    ctx.details["B1"] = {"iterations_per_s": res, "median_iterations_per_s": m,
                         "iterations": {"lease": n_lease, "plain": n_plain, "pg": n_pg,
                                        "sqlite": n_sqlite},
                         "flush_now_s": flush_s, "checks_failed": checks}
    ok = "exact" if not checks else "CHECK FAILED: " + "; ".join(checks)
    anchors = (("pg", "PostgreSQL SELECT+UPSERT", 100.0),
               ("sqlite", "SQLite WAL SELECT+UPSERT", 5.0))
    for anchor, name, target in anchors:
        ctx.rows.append(Row("B1", "seed loop, lease (iterations/s)", name, m[anchor],
                            m["lease"], "/s", f">= {target:g}x",
                            m["lease"] / m[anchor] >= target,
                            f"{per_it}; lease acquire+release timed; final values {ok}"))
    for anchor, name, _ in anchors:
        ctx.rows.append(Row("B1", "seed loop, no lease (iterations/s)", name, m[anchor],
                            m["plain"], "/s", "-", None,
                            f"{n_plain:,} it/round; read = round trip, write pipelined"))


# -- B2: one remote read ----------------------------------------------------------------------
@ray.remote(num_cpus=0)
class _Echo:
    """A trivial actor: the cost of one Ray method call round trip."""

    def m(self) -> None:
        return None


def b2_remote_read(ctx: Ctx) -> None:
    """Latency of one cache.read of a key held in its shard, vs Redis GET and a Ray call."""
    cache = ctx.shared_cache()
    n = ctx.pick(3_000, 1_000)
    n_ray = ctx.pick(500, 200)
    n_rounds = ctx.pick(5, 3)
    key = f"{ctx.tag}:b2"
    rkey = f"{ctx.rprefix}b2"
    cache.write(key, 12345, wait=True)
    r = ctx.redis
    r.set(rkey, encode_value(12345))
    echo = _Echo.remote()
    ray.get(echo.m.remote(), timeout=60)
    read, get = cache.read, r.get
    for _ in range(200):  # warm connections and caches
        read(key)
        get(rkey)
    lat: dict[str, list[int]] = {"ours": [], "redis": [], "ray": []}
    p50s: dict[str, list[float]] = {"ours": [], "redis": [], "ray": []}
    for _ in rounds(ctx, n_rounds):
        for name, fn, count in (("ours", lambda: read(key), n),
                                ("redis", lambda: get(rkey), n),
                                ("ray", lambda: ray.get(echo.m.remote()), n_ray)):
            samples = []
            with no_gc():
                for _ in range(count):
                    t = pc_ns()
                    fn()
                    samples.append(pc_ns() - t)
            lat[name].extend(samples)
            p50s[name].append(pctl(samples, 50) / 1000)
    ray.kill(echo)
    value_ok = cache.read(key) == 12345
    s = {k: lat_summary(v) for k, v in lat.items()}
    ctx.details["B2"] = {"latency": s, "p50_us_per_round": p50s, "value_ok": value_ok}
    o = s["ours"]
    note = f"ours p99 {o['p99_us']:.0f} us"
    ctx.rows.append(Row("B2", "remote read p50 (us)", "redis-py GET p50", s["redis"]["p50_us"],
                        o["p50_us"], "us", "<= 1x", o["p50_us"] <= s["redis"]["p50_us"],
                        f"{note}; GET p99 {s['redis']['p99_us']:.0f} us"))
    ctx.rows.append(Row("B2", "remote read p50 (us)", "Ray actor call p50", s["ray"]["p50_us"],
                        o["p50_us"], "us", "<= 0.25x",
                        o["p50_us"] <= 0.25 * s["ray"]["p50_us"],
                        f"{note}; Ray call p99 {s['ray']['p99_us']:.0f} us"))


# -- B3: batches ------------------------------------------------------------------------------
def b3_batches(ctx: Ctx) -> None:
    """read_many / write_many of 1,000 keys over 4 shards vs Redis MGET / MSET."""
    cache = ctx.shared_cache()
    size = 1000
    reps = ctx.pick(100, 30)
    n_rounds = ctx.pick(5, 3)
    keys = [f"{ctx.tag}:b3:{i}" for i in range(size)]
    rkeys = [f"{ctx.rprefix}b3:{i}".encode() for i in range(size)]
    items = [(k, i) for i, k in enumerate(keys)]
    mapping = {k: encode_value(i) for i, k in enumerate(rkeys)}
    r = ctx.redis
    cache.write_many(items)
    r.mset(mapping)
    per_shard = [0] * cache.num_shards
    for k in keys:
        per_shard[cache.shard_of(k)] += 1
    rate: dict[str, list[float]] = {"write_many": [], "read_many": [], "mset": [], "mget": []}
    ops: dict[str, Callable[[], Any]] = {
        "write_many": lambda: cache.write_many(items),
        "mset": lambda: r.mset(mapping),
        "read_many": lambda: cache.read_many(keys),
        "mget": lambda: r.mget(rkeys),
    }
    for _ in range(3):
        for fn in ops.values():
            fn()
    for _ in rounds(ctx, n_rounds):
        for name, fn in ops.items():
            with no_gc():
                t = pc()
                for _ in range(reps):
                    fn()
                rate[name].append(reps * size / (pc() - t))
    got = cache.read_many(keys)
    ok = got == list(range(size)) and [decode_value(v) for v in r.mget(rkeys)] == list(
        range(size))
    m = {k: med(v) for k, v in rate.items()}
    ctx.details["B3"] = {"keys_per_s": rate, "median_keys_per_s": m, "keys_per_shard": per_shard,
                         "batches_per_round": reps, "values_ok": ok}
    note = f"{reps} batches of {size:,}/round; keys per shard {per_shard}"
    ctx.rows.append(Row("B3", "write_many 1k keys (keys/s)", "Redis MSET 1k keys",
                        m["mset"], m["write_many"], "/s", ">= 500k/s",
                        m["write_many"] >= 500_000, note))
    ctx.rows.append(Row("B3", "read_many 1k keys (keys/s)", "Redis MGET 1k keys",
                        m["mget"], m["read_many"], "/s", ">= 500k/s",
                        m["read_many"] >= 500_000, "values read back " + ("exact" if ok else
                                                                          "WRONG")))


# -- B4: near-cache hit -----------------------------------------------------------------------
def b4_near_hit(ctx: Ctx) -> None:
    """near.read(k) of a near-cached key vs a plain dict get (per call, timed in batches)."""
    cache = ctx.shared_cache()
    batch = 1000
    n_batches = ctx.pick(300, 100)
    n_rounds = ctx.pick(5, 3)
    key = f"{ctx.tag}:b4"
    cache.write(key, 42, wait=True)
    near = cache.near(lease_ms=50)
    nread = near.read
    d = {key: 42}
    dget = d.get
    nc = near._near  # the process-local near cache (read for its hit counters only)
    h0, m0 = (nc.hits, nc.misses) if nc is not None else (0, 0)
    ours: list[float] = []
    plain: list[float] = []
    rng = range(batch)
    for _ in rounds(ctx, n_rounds):
        with no_gc():
            for _ in range(n_batches):
                t = pc_ns()
                for _ in rng:
                    nread(key)
                ours.append((pc_ns() - t) / batch / 1000)
                t = pc_ns()
                for _ in rng:
                    dget(key)
                plain.append((pc_ns() - t) / batch / 1000)
    hits, misses = (nc.hits - h0, nc.misses - m0) if nc is not None else (0, 0)
    o = {"p50_us": pctl(ours, 50), "p99_us": pctl(ours, 99)}
    a = {"p50_us": pctl(plain, 50), "p99_us": pctl(plain, 99)}
    hit_rate = hits / (hits + misses) if hits + misses else float("nan")
    ctx.details["B4"] = {"near_read": o, "dict_get": a, "batch": batch, "batches": len(ours),
                         "lease_ms": 50, "hits": hits, "misses": misses}
    ctx.rows.append(Row("B4", "near-cache hit p50 (us/call)", "dict.get p50", a["p50_us"],
                        o["p50_us"], "us", "<= 2 us", o["p50_us"] <= 2.0,
                        f"batches of {batch}; lease_ms=50, hit rate {hit_rate:.4%} "
                        f"({misses} misses = lease renewals); p99 {o['p99_us']:.2f} us"))


# -- B5: shared counters ----------------------------------------------------------------------
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


def b5_counters(ctx: Ctx) -> None:
    """2 Ray tasks x M cache.update increments over 100 keys vs the same with Redis INCR."""
    cache = ctx.shared_cache()
    m = ctx.pick(20_000, 4_000)
    n_rounds = ctx.pick(3, 2)
    workers = 2
    pids = set(ray.get([_noop.remote() for _ in range(4)], timeout=120))  # start the workers
    # update(..., wait=False) is newer than this suite's brief: measured when available.
    has_pipelined = "wait" in inspect.signature(cache.update).parameters
    variants = ["ours", "redis"] + (["pipelined"] if has_pipelined else [])
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
    if has_pipelined:
        ctx.rows.append(Row("B5", "counters, update(wait=False) (updates/s)",
                            "Redis INCR, 2 tasks", ma, m_rate["pipelined"], "/s", "-", None,
                            f"{workers}x{m:,} pipelined updates + sync() per task; {exact}"))


# -- B6: flush --------------------------------------------------------------------------------
def _b6_store(ctx: Ctx, store: str, n: int, n_naive: int, n_rounds: int) -> dict[str, Any]:
    """Flush ``n`` dirty keys from a ShardCore, the connector alone, and a naive row loop."""
    if store == "pg":
        table = ctx.pg_table("b6")
        conn: Any = PostgresConnector(ctx.pg_dsn, table=table)
        admin = pg_connect(ctx)

        def clear() -> None:
            admin.execute(f'TRUNCATE "{table}"')

        def count() -> int:
            return admin.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]

        naive_db = pg_connect(ctx)
        naive_sql = (f'INSERT INTO "{table}" (k, v) VALUES (%s, %s) '
                     "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")

        def naive(rows: list[tuple[bytes, bytes]]) -> None:
            for row in rows:
                naive_db.execute(naive_sql, row)  # autocommit: one transaction per row

        def close() -> None:
            naive_db.close()
            admin.close()
            conn.disconnect()
    else:
        conn = SQLiteConnector(os.path.join(ctx.tmpdir, "b6.sqlite3"), table="b6")
        conn.connect()
        naive_db = sqlite3.connect(conn.path, isolation_level=None)
        naive_db.execute("PRAGMA synchronous=NORMAL")
        naive_sql = 'INSERT INTO "b6" (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = ' \
                    "excluded.v"

        def clear() -> None:
            conn.db.execute('DELETE FROM "b6"')

        def count() -> int:
            return conn.db.execute('SELECT count(*) FROM "b6"').fetchone()[0]

        def naive(rows: list[tuple[bytes, bytes]]) -> None:
            for row in rows:
                naive_db.execute(naive_sql, row)  # autocommit: one transaction per row

        def close() -> None:
            naive_db.close()
            conn.disconnect()

    conn.connect()
    res: dict[str, list[float]] = {"core": [], "connector": [], "naive": [], "fill": []}
    checks: list[str] = []

    def ours(r: int, args: list[str]) -> None:
        """A shard with n dirty keys (thresholds out of reach), then one timed flush."""
        clear()
        core = ShardCore([conn], writes_threshold=10 ** 9, millis_threshold=1e12,
                         max_entries=n + 1)
        items = [(encode_key(a), None, encode_value(i)) for i, a in enumerate(args)]
        t = pc()
        core.write_many(items)
        res["fill"].append(n / (pc() - t))
        del items
        with no_gc():
            t = pc()
            flushed = core.flush()
            res["core"].append(n / (pc() - t))
        if flushed != n or count() != n:
            checks.append(f"round {r}: shard flushed {flushed}, table has {count()}")

    def anchor(r: int, args: list[str]) -> None:
        """The connector's own flush of the same payloads."""
        clear()
        payloads = [conn.write(a, i) for i, a in enumerate(args)]
        with no_gc():
            t = pc()
            conn.flush(payloads)
            res["connector"].append(n / (pc() - t))
        if count() != n:
            checks.append(f"round {r}: connector flush left {count()} rows")

    try:
        for r in rounds(ctx, n_rounds):
            args = [f"r{r}:{i}" for i in range(n)]
            for step in ((ours, anchor) if r % 2 == 0 else (anchor, ours)):  # alternate order
                step(r, args)
            # Anchor 2: a naive per-row INSERT loop over a few thousand rows (extrapolated).
            clear()
            rows = [(encode_value(a), encode_value(i)) for i, a in enumerate(args[:n_naive])]
            with no_gc():
                t = pc()
                naive(rows)
                res["naive"].append(n_naive / (pc() - t))
    finally:
        close()
    return {"rows_per_s": res, "median_rows_per_s": {k: med(v) for k, v in res.items()},
            "checks_failed": checks}


def b6_flush(ctx: Ctx) -> None:
    """100k dirty keys flushed to PostgreSQL and to SQLite, rows/s."""
    n = ctx.pick(100_000, 20_000)
    n_naive = ctx.pick(3_000, 1_000)
    n_rounds = ctx.pick(3, 2)
    details: dict[str, Any] = {"rows": n, "naive_rows": n_naive}
    for store, label, target in (("pg", "PostgreSQL", 100_000), ("sqlite", "SQLite", 200_000)):
        d = _b6_store(ctx, store, n, n_naive, n_rounds)
        details[store] = d
        m = d["median_rows_per_s"]
        bad = "; CHECK FAILED: " + "; ".join(d["checks_failed"]) if d["checks_failed"] else ""
        ctx.rows.append(Row("B6", f"flush {n // 1000}k keys to {label} (rows/s)",
                            f"{label} connector.flush alone", m["connector"], m["core"], "/s",
                            f">= {target // 1000}k/s", m["core"] >= target,
                            f"ShardCore.flush(); row counts checked{bad}"))
        ctx.rows.append(Row("B6", f"flush {n // 1000}k keys to {label} (rows/s)",
                            f"{label} naive per-row INSERT", m["naive"], m["core"], "/s", "-",
                            None, f"naive loop over {n_naive:,} rows, autocommit, "
                                  "extrapolated per row"))
    ctx.details["B6"] = details


# -- B7: memory -------------------------------------------------------------------------------
def _b7_measure(n: int, into_core: bool) -> float:
    """Bytes per entry beyond the key and value objects, for n 8-byte keys and values."""
    kv_bytes = 0

    def gen() -> Iterator[tuple[bytes, None, bytes]]:
        nonlocal kv_bytes
        size = sys.getsizeof
        for i in range(n):
            kb = i.to_bytes(8, "big")
            vb = (i * 7 + 1).to_bytes(8, "big")
            kv_bytes += size(kb) + size(vb)
            yield kb, None, vb

    with no_gc():
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            if into_core:
                holder: Any = ShardCore([], max_entries=n + 1)
                holder.write_many(gen())
            else:
                holder = {}
                for kb, _, vb in gen():
                    holder[kb] = vb
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    size_ok = (holder.metrics()["entries"] if into_core else len(holder)) == n
    del holder
    return (used - kv_bytes) / n if size_ok else float("nan")


def b7_memory(ctx: Ctx) -> None:
    """1M small entries in one ShardCore vs a plain dict of the same bytes."""
    n = ctx.pick(1_000_000, 200_000)
    n_rounds = ctx.pick(2, 1)
    res: dict[str, list[float]] = {"core": [], "dict": []}
    for _ in rounds(ctx, n_rounds):
        res["dict"].append(_b7_measure(n, into_core=False))
        res["core"].append(_b7_measure(n, into_core=True))
    mo, ma = med(res["core"]), med(res["dict"])
    ctx.details["B7"] = {"bytes_per_entry": res, "entries": n, "key_bytes": 8, "value_bytes": 8,
                         "per_object_size": sys.getsizeof(b"12345678")}
    ctx.rows.append(Row("B7", f"memory, {n // 1000}k entries (bytes/entry)",
                        "plain dict of the same bytes", ma, mo, "B", "<= 150 B", mo <= 150,
                        "tracemalloc delta minus getsizeof(key)+getsizeof(value); "
                        "ShardCore without connectors (nothing pending)"))


# -- C1: every connector behind one ShardCore -------------------------------------------------
@dataclass
class _C1Store:
    """One connector kind in C1: make a connector on a fresh store, reopen it, count, drop."""

    label: str
    n: int
    make: Callable[[str], Any]  # store name -> connector (not connected)
    reopen: Callable[[Any], Any]  # connector -> a new connector on the same store
    count: Callable[[Any], int]  # rows (distinct keys) the store holds
    drop: Callable[[Any], None]  # remove the store (idempotent)
    note: str = ""


def _c1_stores(ctx: Ctx, admin: psycopg.Connection[Any]) -> list[_C1Store]:
    import pyarrow.parquet as pq
    from persistroids_dist.connectors.files import FileConnector
    from persistroids_dist.connectors.memory import MemoryConnector
    from persistroids_dist.connectors.parquet import ParquetConnector
    from persistroids_dist.connectors.redis import RedisConnector

    n = ctx.pick(100_000, 10_000)
    n_files = ctx.pick(5_000, 300)

    def mem_reopen(c: Any) -> Any:
        new = MemoryConnector(id=c.id)
        new.state = c.state  # the "store" is the dict the first connector flushed into
        return new

    def lite_make(name: str) -> Any:
        return SQLiteConnector(os.path.join(ctx.tmpdir, f"c1_{name}.sqlite3"), table="c1")

    def lite_drop(c: Any) -> None:
        c.disconnect()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(c.path + suffix)

    def pg_drop(c: Any) -> None:
        c.disconnect()
        admin.execute(f'DROP TABLE IF EXISTS "{c.table}"')  # our own generated name

    def redis_count(c: Any) -> int:
        return sum(1 for _ in ctx.redis.scan_iter(match=c.prefix + "*", count=10_000))

    def redis_drop(c: Any) -> None:
        keys = list(ctx.redis.scan_iter(match=c.prefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            ctx.redis.delete(*keys[i:i + 10_000])
        c.disconnect()

    def files_count(c: Any) -> int:
        if not os.path.isdir(c.directory):
            return 0
        return sum(1 for f in os.listdir(c.directory) if not f.startswith("."))

    def dir_drop(c: Any) -> None:
        c.disconnect()
        shutil.rmtree(c.directory, ignore_errors=True)

    def pq_count(c: Any) -> int:
        return sum(pq.read_metadata(os.path.join(c.directory, f)).num_rows for f in c.files)

    return [
        _C1Store("memory", n, lambda name: MemoryConnector(id=f"mem:{name}"), mem_reopen,
                 lambda c: len(c.state), lambda c: c.state.clear(),
                 "a dict in the shard process: the ratio is the shard's own bookkeeping"),
        _C1Store("sqlite", n, lite_make, lambda c: SQLiteConnector(c.path, table=c.table),
                 lambda c: c.db.execute('SELECT count(*) FROM "c1"').fetchone()[0], lite_drop,
                 "WAL, synchronous=NORMAL, one file per store"),
        _C1Store("postgres", n,
                 lambda name: PostgresConnector(ctx.pg_dsn, table=ctx.pg_table(f"c1_{name}")),
                 lambda c: PostgresConnector(ctx.pg_dsn, table=c.table),
                 lambda c: admin.execute(f'SELECT count(*) FROM "{c.table}"').fetchone()[0],
                 pg_drop, "COPY + upsert in one transaction"),
        _C1Store("redis", n,
                 lambda name: RedisConnector(ctx.redis_url, prefix=f"{ctx.rprefix}c1:{name}:",
                                             socket_timeout_s=30),
                 lambda c: RedisConnector(ctx.redis_url, prefix=c.prefix, socket_timeout_s=30),
                 redis_count, redis_drop, "keys mode, MSET in MULTI/EXEC"),
        _C1Store("files", n_files,
                 lambda name: FileConnector(os.path.join(ctx.tmpdir, f"c1_{name}")),
                 lambda c: FileConnector(c.directory), files_count, dir_drop,
                 f"only {n_files:,} keys: one file per key, each fsynced and renamed "
                 "(fsync-bound: expect a noisy ratio)"),
        _C1Store("parquet", n,
                 lambda name: ParquetConnector(os.path.join(ctx.tmpdir, f"c1_{name}")),
                 lambda c: ParquetConnector(c.directory), pq_count, dir_drop,
                 "one zstd file per flush; the reader indexes the files at connect (untimed)"),
    ]


def _c1_store(ctx: Ctx, st: _C1Store, n_rounds: int, n_reads: int,
              read_reps: int) -> dict[str, Any]:
    """Flush ``st.n`` dirty keys through a ShardCore and the connector alone, then read
    ``n_reads`` keys through a new ShardCore and the connector alone, on the same store."""
    n = st.n
    n_reads = min(n_reads, n)
    args = [f"c1:{i}" for i in range(n)]
    values = [{"n": i, "name": f"u{i}"} for i in range(n)]
    items = [(encode_key(a), encode_value(v)) for a, v in zip(args, values)]
    res: dict[str, list[float]] = {"core": [], "connector": [], "fill": [], "read_core": [],
                                   "read_connector": []}
    checks: list[str] = []
    made: list[Any] = []
    kept: list[Any] = []  # the store the last ShardCore flushed into: the read phase's store

    def fresh(name: str) -> Any:
        conn = st.make(name)
        made.append(conn)
        return conn

    def drop(conn: Any) -> None:
        made[:] = [c for c in made if c is not conn]  # removed once (Redis SCANs every key)
        st.drop(conn)

    def ours(r: int) -> None:
        """A shard with n dirty keys (thresholds out of reach), then one timed flush."""
        conn = fresh(f"r{r}_core")
        core = ShardCore([conn], writes_threshold=10 ** 9, millis_threshold=1e12,
                         max_entries=n + 1)
        write = core.write
        t = pc()
        for kb, vb in items:
            write(kb, None, vb)
        res["fill"].append(n / (pc() - t))
        with no_gc():
            t = pc()
            flushed = core.flush()
            res["core"].append(n / (pc() - t))
        stored = st.count(conn)
        if flushed != n or stored != n:
            checks.append(f"round {r}: shard flushed {flushed}, store holds {stored}")
        for old in kept:
            drop(old)
        kept[:] = [conn]

    def anchor(r: int) -> None:
        """The connector's own flush of the same payloads, on a store of its own."""
        conn = fresh(f"r{r}_conn")
        conn.connect()
        payloads = [conn.write(a, v) for a, v in zip(args, values)]
        with no_gc():
            t = pc()
            conn.flush(payloads)
            res["connector"].append(n / (pc() - t))
        stored = st.count(conn)
        if stored != n:
            checks.append(f"round {r}: connector flush left {stored} rows")
        drop(conn)

    def read_batch(reader: Any, rep: int, idx: list[int], core_first: bool) -> None:
        """One batch through a new ShardCore (empty cache) and through the connector alone."""
        keys = [args[i] for i in idx]
        kbs = [items[i][0] for i in idx]
        want = [values[i] for i in idx]
        core = ShardCore([reader], writes_threshold=10 ** 9, millis_threshold=1e12,
                         max_entries=n + 1)
        batched = hasattr(reader, "read_many")
        for side in (("core", "connector") if core_first else ("connector", "core")):
            with no_gc():
                t = pc()
                if side == "core":
                    got = core.read_many(kbs)  # encoded values, decoded below (untimed)
                elif batched:
                    got = reader.read_many(keys)
                else:
                    got = [reader.read(a) for a in keys]
                dt = pc() - t
            if side == "core":
                got = [decode_value(vb) for vb in got]
            if rep:  # rep 0 warms the store up and is not counted
                res[f"read_{side}"].append(len(keys) / dt)
            if got != want:
                checks.append(f"read batch {rep}: {side} returned wrong values")

    def read_phase() -> None:
        reader = st.reopen(kept[0])
        made.append(reader)
        reader.connect()
        stride = max(1, n // n_reads)
        for rep in range(read_reps + 1):
            idx = list(range(rep % stride, n, stride))[:n_reads]
            read_batch(reader, rep, idx, core_first=rep % 2 == 1)

    def warm_up() -> None:
        """Both paths once on 100 keys (first-call costs: imports, codecs, statements)."""
        conn = fresh("warm")
        core = ShardCore([conn], writes_threshold=10 ** 9, millis_threshold=1e12)
        for kb, vb in items[:100]:
            core.write(kb, None, vb)
        core.flush()
        conn.flush([conn.write(a, v) for a, v in zip(args[:100], values[:100])])
        drop(conn)

    try:
        warm_up()
        for r in rounds(ctx, n_rounds):
            for step in ((ours, anchor) if r % 2 == 0 else (anchor, ours)):  # alternate order
                step(r)
        read_phase()
    finally:
        for conn in list(made):
            try:
                drop(conn)
            except Exception as e:
                print(f"C1: removing the {st.label} store failed: {e!r}", file=sys.stderr)
    return {"keys": n, "rows_per_s": {k: res[k] for k in ("core", "connector", "fill")},
            "read_keys_per_s": {"core": res["read_core"], "connector": res["read_connector"]},
            "median": {k: med(v) for k, v in res.items()}, "read_batch": n_reads,
            "read_batches": len(res["read_core"]), "checks_failed": checks}


def c1_connectors(ctx: Ctx) -> None:
    """Per connector: flush of N dirty keys and a cold read_many of 1k keys through one
    ShardCore (no Ray), each next to the connector's own call on the same payloads/keys."""
    n_rounds = ctx.pick(2, 3)  # quick flushes are short (10k keys): more rounds, less noise
    n_reads = 1000
    read_reps = ctx.pick(10, 5)
    admin = pg_connect(ctx)
    details: dict[str, Any] = {}
    try:
        for st in _c1_stores(ctx, admin):
            print(f"    {st.label} ...", flush=True)
            d = _c1_store(ctx, st, n_rounds, n_reads, read_reps)
            details[st.label] = d
            m = d["median"]
            bad = "; CHECK FAILED: " + "; ".join(d["checks_failed"][:3]) \
                if d["checks_failed"] else ""
            size = f"{st.n // 1000}k" if st.n >= 1000 else str(st.n)
            nr = d["read_batch"]
            rsize = f"{nr // 1000}k" if nr >= 1000 else str(nr)
            ctx.rows.append(Row(
                "C1", f"flush {size} keys, {st.label} (rows/s)", "connector.flush alone",
                m["connector"], m["core"], "/s", "-", None,
                f"ShardCore.write x{st.n:,} (fill {fmt(m['fill'], '/s')}), then one timed "
                f"ShardCore.flush(); {len(d['rows_per_s']['core'])} round(s) after an untimed "
                f"warm-up, own store per side, row counts checked; {st.note}{bad}"))
            anchor = "connector.read_many alone"
            ctx.rows.append(Row(
                "C1", f"read_many {rsize} keys, new shard, {st.label} (keys/s)", anchor,
                m["read_connector"], m["read_core"], "/s", "-", None,
                f"{d['read_batches']} batches of {nr:,} of the {st.n:,} flushed keys, "
                "each through a new ShardCore (empty cache) on a reopened connector; one "
                f"untimed batch first warms the store; values checked{bad}"))
    finally:
        admin.close()
    ctx.details["C1"] = details


# -- driver -----------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "B1": b1_seed_loop, "B2": b2_remote_read, "B3": b3_batches, "B4": b4_near_hit,
    "B5": b5_counters, "B6": b6_flush, "B7": b7_memory, "C1": c1_connectors,
    "K1": lambda ctx: k1_tuple_keys(ctx, Row),
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem / 2**30, 1)
            if mem else None, "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__}


def table_lines(rows: list[Row], markdown: bool = False) -> list[str]:
    head = ["case", "what", "anchor", "anchor fig.", "ours", "ratio", "target", "met"]
    body = []
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        body.append([r.case, r.what, r.anchor, fmt(r.anchor_value, r.unit), fmt(r.ours, r.unit),
                     fmt_ratio(r.ratio), r.target, met])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(b) + " |" for b in body]
        return out
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return out


def cleanup(ctx: Ctx) -> None:
    """Shut down caches, drop tables, delete Redis keys, remove temporary files."""
    for cache in list(ctx.caches):
        try:
            cache.shutdown()
        except Exception as e:
            print(f"cleanup: shutdown of {cache!r} failed: {e!r}", file=sys.stderr)
    ctx.caches.clear()
    if ctx.pg_tables:
        try:
            with pg_connect(ctx) as pg:
                for t in ctx.pg_tables:
                    pg.execute(f'DROP TABLE IF EXISTS "{t}"')  # our own generated names
        except Exception as e:
            print(f"cleanup: dropping PostgreSQL tables failed: {e!r}", file=sys.stderr)
    try:
        r = ctx.redis
        keys = list(r.scan_iter(match=ctx.rprefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            r.delete(*keys[i:i + 10_000])
        r.close()
    except Exception as e:
        print(f"cleanup: deleting Redis keys failed: {e!r}", file=sys.stderr)
    shutil.rmtree(ctx.tmpdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="persistroids-dist benchmarks (see docstring)")
    parser.add_argument("--quick", action="store_true", help="small counts, under a minute")
    parser.add_argument("--json", default="bench-results.json", help="JSON results path")
    parser.add_argument("--md", default=None, help="also write a markdown report here")
    parser.add_argument("--only", default=None, help="comma-separated cases, e.g. B1,B3")
    opts = parser.parse_args(argv)
    selected = list(CASES)
    if opts.only:
        selected = [c.strip().upper() for c in opts.only.split(",") if c.strip()]
        unknown = [c for c in selected if c not in CASES]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")

    # Ray workers must import this package (and the project's) like the driver does.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    t_start = pc()
    ctx = Ctx(quick=opts.quick, tag=uuid.uuid4().hex[:8],
              pg_dsn=os.environ.get(PG_ENV_DSN) or PG_DEFAULT_DSN,
              redis_url=os.environ.get(REDIS_ENV_URL) or REDIS_DEFAULT_URL,
              tmpdir=tempfile.mkdtemp(prefix="pdbench-"))
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    print(f"persistroids-dist benchmarks ({'quick' if opts.quick else 'full'}), cases "
          f"{','.join(selected)}, run tag {ctx.tag}", flush=True)
    try:
        pd.ensure_ray(num_cpus=2)
        for case in selected:
            print(f"  {case} ...", flush=True)
            t = pc()
            try:
                RUNNERS[case](ctx)
            except Exception as e:  # report and go on: benchmarks never assert
                errors[case] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                ctx.rows.append(Row(case, "FAILED", "-", None, None, "", "-", False,
                                    errors[case][:200]))
            timings[case] = round(pc() - t, 2)
            print(f"  {case} done in {timings[case]:.1f}s", flush=True)
    finally:
        cleanup(ctx)
        if ray.is_initialized():
            ray.shutdown()
    total = pc() - t_start
    lines = table_lines(ctx.rows)
    print()
    print("\n".join(lines))
    print()
    for r in ctx.rows:
        if r.note:
            print(f"  {r.case} {r.what} vs {r.anchor}: {r.note}")
    met = [r for r in ctx.rows if r.met is not None]
    print(f"\ntargets met: {sum(bool(r.met) for r in met)}/{len(met)}; "
          f"total {total:.1f}s; JSON in {opts.json}")
    info = machine()
    info["loadavg_1m_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    result = {
        "started": started.isoformat(timespec="seconds"), "quick": opts.quick,
        "cases": selected, "seconds": round(total, 1), "case_seconds": timings,
        "machine": info, "errors": errors,
        "rows": [dict(asdict(r), ratio=r.ratio) for r in ctx.rows],
        "details": ctx.details,
    }
    with open(opts.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    if opts.md:
        with open(opts.md, "w") as f:
            f.write(markdown_report(result, ctx.rows))
    return 0


def markdown_report(result: dict[str, Any], rows: list[Row]) -> str:
    """The results as a markdown page (see the module docstring for how to read it)."""
    m = result["machine"]
    out = [
        "# persistroids-dist benchmark results",
        "",
        f"Run of {result['started']} ({'quick' if result['quick'] else 'full'} run, "
        f"{result['seconds']:.0f} s), `python -m benchmarks.run"
        f"{' --quick' if result['quick'] else ''}`.",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['memory_gb']} GB RAM, {m['platform']}, "
        f"Python {m['python']}, Ray {m['ray']}. PostgreSQL and Redis local (127.0.0.1). "
        f"1-minute load average at start / end: {m['loadavg_1m_start_end'][0]} / "
        f"{m['loadavg_1m_start_end'][1]} (other work shared the machine when above ~0.5).",
        "",
        "ratio = ours / anchor (throughput: higher is better; latency and memory: lower is "
        "better). Throughputs are medians over rounds, latencies p50 over all samples.",
        "",
        *table_lines(rows, markdown=True),
        "",
        "## Notes",
        "",
    ]
    out += [f"- **{r.case}** {r.what} vs {r.anchor}: {r.note}" for r in rows if r.note]
    met = [r for r in rows if r.met is not None]
    out += ["", f"Targets met: {sum(bool(r.met) for r in met)} of {len(met)}.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
