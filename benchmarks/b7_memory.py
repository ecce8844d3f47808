"""B7, memory: bytes per entry of 1M small entries in one ShardCore against a plain dict of the
same bytes (tracemalloc, beyond the key and value objects themselves)."""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

from benchmarks.harness import Ctx, Row, case, med, no_gc, rounds
from persistroids_dist.shard import ShardCore


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


@case("B7")
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
