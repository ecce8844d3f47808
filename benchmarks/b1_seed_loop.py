"""B1, the seed loop: read -> increment -> write on one key, PostgreSQL behind the cache.

Ours inside an exclusive lease (and, reported only, without one) against the same loop run
directly on PostgreSQL (SELECT + UPSERT, autocommit) and on SQLite (WAL, synchronous=NORMAL).
"""

from __future__ import annotations

import os
import sqlite3

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, pg_connect, rounds, zero
from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connectors.postgres import PostgresConnector


@case("B1")
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

    cache = pd.init([PostgresConnector(ctx.pg_dsn, table=cache_table)], init_fn=zero,
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
