"""Flush and batch-read throughput of the SQLite, PostgreSQL and Redis connectors.

Run ``python -m benchmarks.connectors_flush [--rows N] [--reads N]``. Each store gets a fresh
table or prefix that is removed afterwards; a store that is not running is reported and skipped.
Rows are small: a tuple key and a short dict value, as a cache of records would hold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any


def _measure(conn: Any, rows: int, reads: int) -> tuple[float, float, float]:
    """(insert rows/s, update rows/s, read_many keys/s) for one connected connector."""
    payloads = [conn.write(("user", i), {"n": i, "name": f"u{i}"}) for i in range(rows)]
    t = time.perf_counter()
    conn.flush(payloads)
    insert = rows / (time.perf_counter() - t)
    t = time.perf_counter()
    conn.flush(payloads)  # every row exists now: the upsert path
    update = rows / (time.perf_counter() - t)
    keys = [("user", i) for i in range(0, rows, max(1, rows // reads))][:reads]
    t = time.perf_counter()
    got = conn.read_many(keys)
    read = len(keys) / (time.perf_counter() - t)
    assert got[-1] == {"n": keys[-1][1], "name": f"u{keys[-1][1]}"}
    return insert, update, read


def _sqlite(tag: str) -> tuple[Any, Callable[[], None]]:
    from persistroids_dist.connectors.sqlite import SQLiteConnector
    d = tempfile.TemporaryDirectory()
    return SQLiteConnector(os.path.join(d.name, "bench.sqlite3"), table=tag), d.cleanup


def _postgres(tag: str) -> tuple[Any, Callable[[], None]]:
    from persistroids_dist.connectors.postgres import PostgresConnector
    from psycopg import sql
    conn = PostgresConnector(table=tag, connect_timeout_s=3)
    drop_sql = sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(tag))

    def drop() -> None:
        conn._run(lambda c: c.execute(drop_sql))
    return conn, drop


def _redis(tag: str) -> tuple[Any, Callable[[], None]]:
    from persistroids_dist.connectors.redis import RedisConnector
    conn = RedisConnector(prefix=f"bench:{tag}:", socket_timeout_s=10)

    def drop() -> None:
        keys = list(conn.client.scan_iter(match=f"bench:{tag}:*", count=10000))
        for i in range(0, len(keys), 10000):
            conn.client.delete(*keys[i:i + 10000])
    return conn, drop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per flush")
    parser.add_argument("--reads", type=int, default=1000, help="keys per read_many")
    args = parser.parse_args(argv)
    print(f"{'store':<10} {'flush insert':>16} {'flush update':>16} {'read_many':>16}")
    for name, make in (("sqlite", _sqlite), ("postgres", _postgres), ("redis", _redis)):
        tag = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            conn, cleanup = make(tag)
            conn.connect()
        except Exception as e:
            print(f"{name:<10} skipped: {type(e).__name__}: {e}")
            continue
        try:
            ins, upd, rd = _measure(conn, args.rows, args.reads)
            print(f"{name:<10} {ins:>11,.0f} r/s {upd:>11,.0f} r/s {rd:>11,.0f} k/s"
                  f"   ({args.rows:,} rows, read_many of {args.reads:,})")
        finally:
            cleanup()
            conn.disconnect()


if __name__ == "__main__":
    main()
