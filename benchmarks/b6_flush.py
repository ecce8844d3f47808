"""B6, flush: 100k dirty keys flushed by one ShardCore to PostgreSQL and to SQLite, against the
connector's own flush of the same payloads and a naive per-row INSERT loop."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, pg_connect, rounds
from persistroids_dist.codec import encode_key, encode_value
from persistroids_dist.connectors.postgres import PostgresConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.shard import ShardCore


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


@case("B6")
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
