"""C1, every connector behind one ShardCore: per connector (memory, sqlite, postgres, redis,
files, parquet), a flush of N dirty keys and a cold read_many of 1k keys through one ShardCore
(no Ray), each next to the connector's own flush / read_many of the same payloads and keys."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from benchmarks.harness import Ctx, Row, case, fmt, med, no_gc, pc, pg_connect, rounds
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.postgres import PostgresConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.shard import ShardCore


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


@case("C1")
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
