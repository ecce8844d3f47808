"""P1, checkpoints (issue 10): do writes keep flowing while checkpoints run, and how long is
the pause a cut imposes on them?

A checkpointed cache of two shards over SQLite. One writer in the driver sends acknowledged
writes (``cache.write(..., wait=True)``: each waits for its shard's answer) over 1000 keys,
one at a time, timing each: first for a while with no checkpoint, then for as long again
while the main thread takes checkpoints back to back (one every ``GAP_S`` plus its own
time). The first row compares the writes' p99 during the checkpoints with their p99 without
(the anchor: same run, same writer), corrected for coordinated omission as S1's are. The
second row is the pause itself, as each checkpoint reports it (``CheckpointInfo.pause_s``:
from the start of the cut until every shard lets writes in again), against the
checkpoint's whole duration (the seals put on the disk, the manifest). Checked afterwards:
a last checkpoint with ``wait_stored`` puts all 1000 keys in SQLite.
"""

from __future__ import annotations

import os
import sqlite3
import threading

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, pc_ns, pctl
from benchmarks.s1_store_stall import co_corrected
from persistroids_dist.connectors.sqlite import SQLiteConnector

GAP_S = 0.05  # between two checkpoints: back to back, as a busy periodic job would


def _writer(cache: pd.Cache, stop: threading.Event, lat_us: list[float],
            acked: list[int]) -> None:
    write = cache.write
    i = 0
    while not stop.is_set():
        t = pc_ns()
        write(f"k{i % 1000}", i, wait=True)
        lat_us.append((pc_ns() - t) / 1000)
        i += 1
        acked[0] = i


def _phase(cache: pd.Cache, seconds: float, checkpoints: bool
           ) -> tuple[list[float], list[pd.CheckpointInfo], list[int]]:
    """Writes for ``seconds`` (with checkpoints back to back if asked): the writes'
    latencies, the checkpoints taken, and the writer's count when each returned."""
    lat: list[float] = []
    acked = [0]
    taken: list[pd.CheckpointInfo] = []
    counts: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_writer, args=(cache, stop, lat, acked), daemon=True)
    with no_gc():
        thread.start()
        end = pc() + seconds
        while pc() < end:
            if checkpoints:
                taken.append(cache.checkpoint({"acked": acked[0]}))
                counts.append(acked[0])
            stop.wait(GAP_S)
        stop.set()
        thread.join()
    return lat, taken, counts


@case("P1")
def p1_checkpoint_pause(ctx: Ctx) -> None:
    """Acknowledged writes with and without back-to-back checkpoints; the cut's pause."""
    seconds = ctx.pick(4.0, 1.5)
    db = os.path.join(ctx.tmpdir, "p1.db")
    cache = pd.init([SQLiteConnector(db)], num_shards=2, checkpoints=True,
                    name=f"bench-{ctx.tag}-p1", journal=os.path.join(ctx.tmpdir, "p1-journal"),
                    init_fn=lambda args: 0)
    ctx.caches.append(cache)
    for i in range(1000):  # every key cached, connections open
        cache.write(f"k{i}", -1)
    cache.checkpoint({"acked": 0})
    quiet, _, _ = _phase(cache, seconds, checkpoints=False)
    busy, taken, _ = _phase(cache, seconds, checkpoints=True)
    checks: list[str] = []
    # The last checkpoint's rows reach the store (in the background, oldest first).
    cache.checkpoint({"acked": -1}, wait_stored=60)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT count(*) FROM kv").fetchone()[0]
    if rows != 1000:
        checks.append(f"SQLite holds {rows} rows, expected 1000")
    interval = pctl(quiet, 50)
    q99, b99 = pctl(co_corrected(quiet, interval), 99), pctl(co_corrected(busy, interval), 99)
    pauses = [c.pause_s * 1000 for c in taken]
    durations = [c.duration_s * 1000 for c in taken]
    bad = "; CHECK FAILED: " + "; ".join(checks) if checks else ""
    ctx.details["P1"] = {"quiet_writes": len(quiet), "busy_writes": len(busy),
                         "checkpoints": len(taken), "pause_ms": pauses,
                         "duration_ms": durations, "p99_co_us": [q99, b99],
                         "p99_raw_us": [pctl(quiet, 99), pctl(busy, 99)],
                         "keys_per_checkpoint": med([c.keys for c in taken]),
                         "checks_failed": checks}
    common = (f"{len(taken)} checkpoints in {seconds:g} s of writes (one every "
              f"{seconds / max(1, len(taken)) * 1000:.0f} ms), 2 shards, SQLite; "
              f"{len(busy)} acknowledged writes during them, {len(quiet)} without "
              f"(throughput {len(busy) / max(1, len(quiet)):.2f}x)")
    ctx.rows.append(Row("P1", "write p99 while checkpoints run back to back (us)",
                        "same writes, no checkpoint p99", q99, b99, "us", "-", None,
                        f"{common}; p99 corrected for coordinated omission (raw p99 "
                        f"{pctl(quiet, 99):.0f} us without, {pctl(busy, 99):.0f} us with); "
                        f"max {max(busy) / 1000:.1f} ms with, {max(quiet) / 1000:.1f} ms "
                        f"without{bad}"))
    ctx.rows.append(Row("P1", "pause writes see per checkpoint, median (ms)",
                        "the checkpoint's whole duration, median", med(durations),
                        med(pauses), "ms", "-", None,
                        f"{common}; pause max {max(pauses, default=float('nan')):.1f} ms, "
                        f"p90 {pctl(pauses, 90):.1f} ms; keys per checkpoint median "
                        f"{med([c.keys for c in taken]):.0f}{bad}"))
