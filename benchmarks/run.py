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

Layout
------
``harness.py`` holds what the cases share (Row, Ctx, timing and percentiles, formatting, the
table and the reports, cleanup) and the registry; each case is one module that registers itself
with ``@case("B1")``: ``b1_seed_loop``, ``b2_remote_read``, ``b3_batches``, ``b4_near``,
``b5_counters``, ``b6_flush``, ``b7_memory``, ``c1_connectors``, ``d1_ray_data`` (D1: a
Ray Data lookup-compute-write pipeline against the same on Redis), ``j1_journal``, ``k1_keys``,
``n1_cross_node`` (N1: a read over TCP, as from another node), ``r1_replicas`` (R1:
pipelined writes with a backup on another node) and ``s1_store_stall`` (S1 and
S2: reads of cached keys while a shard's store is slow or down).
This module is the command line: it imports the case modules (in the order the cases run),
starts Ray, runs the selected cases and writes the reports.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import traceback
import uuid
from dataclasses import asdict

import ray

import persistroids_dist as pd
from benchmarks import (  # noqa: F401  (importing a case module registers its case, in this order)
    b1_seed_loop,
    b2_remote_read,
    b3_batches,
    b4_near,
    b5_counters,
    b6_flush,
    b7_memory,
    c1_connectors,
    d1_ray_data,
    j1_journal,
    k1_keys,
    n1_cross_node,
    p1_checkpoint_pause,
    r1_replicas,
    s1_store_stall,
)
from benchmarks.harness import CASES, Ctx, Row, cleanup, machine, markdown_report, pc, table_lines
from persistroids_dist.connectors.postgres import DEFAULT_DSN as PG_DEFAULT_DSN
from persistroids_dist.connectors.postgres import ENV_DSN as PG_ENV_DSN
from persistroids_dist.connectors.redis import DEFAULT_URL as REDIS_DEFAULT_URL
from persistroids_dist.connectors.redis import ENV_URL as REDIS_ENV_URL


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
                CASES[case](ctx)
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


if __name__ == "__main__":
    sys.exit(main())
