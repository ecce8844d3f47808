"""J1: pipelined writes with the shard journal on (fsync "interval") against journal off.

Run by ``python -m benchmarks.run --only J1``. Two caches of 2 shards over SQLite, identical but
for the journal; each round writes the same batches of new keys through both, taking turns
batch by batch (so load from elsewhere falls on both alike), every write pipelined and each
batch acknowledged by ``sync()``. Flushes run at the default thresholds, so the journal is
trimmed as it would be in use. Target: journal on >= 0.7x journal off.
"""

from __future__ import annotations

import os

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, pc, rounds
from persistroids_dist.connectors.sqlite import SQLiteConnector


@case("J1")
def j1_journal(ctx: Ctx) -> None:
    """Pipelined writes + sync(), journal on ("interval") vs off."""
    batch = 2000
    reps = ctx.pick(20, 6)
    n_rounds = ctx.pick(5, 3)
    caches = {}
    for mode in ("on", "off"):
        caches[mode] = pd.init([SQLiteConnector(os.path.join(ctx.tmpdir, f"j1-{mode}.db"))],
                               num_shards=2, name=f"bench-{ctx.tag}-j1-{mode}",
                               journal=os.path.join(ctx.tmpdir, "journal") if mode == "on"
                               else False)
        ctx.caches.append(caches[mode])
    rate: dict[str, list[float]] = {"on": [], "off": []}
    n = 0
    for _ in range(2):  # warm connections and shard dictionaries
        for c in caches.values():
            c.write_many([(("warm", i), i) for i in range(100)])
    for _ in rounds(ctx, n_rounds):
        spent = {"on": 0.0, "off": 0.0}
        for _ in range(reps):
            keys = [("j1", n + i) for i in range(batch)]
            n += batch
            for mode, c in caches.items():
                t = pc()
                for k in keys:
                    c.write(k, k[1])
                c.sync()
                spent[mode] += pc() - t
        for mode in spent:
            rate[mode].append(reps * batch / spent[mode])
    m = {mode: med(v) for mode, v in rate.items()}
    journal = caches["on"].metrics()["total"]
    ctx.details["J1"] = {"writes_per_s": rate, "median_writes_per_s": m,
                         "journal_bytes_at_end": journal.get("journal_bytes")}
    ctx.rows.append(Row("J1", "pipelined writes + sync, journal on (writes/s)",
                        "same, journal off", m["off"], m["on"], "/s", ">= 0.7x",
                        m["on"] / m["off"] >= 0.7,
                        f'fsync "interval"; {reps} batches of {batch:,} new keys/round, '
                        "interleaved; default flush thresholds (journal trimmed as it goes)"))
