"""R1, pipelined writes with a backup on another node (``replicas=1``) against the same
writes without one (``replicas=0``), in one run (issue 9).

A backup must be on another node, so this case runs a two-node ``ray.cluster_utils.Cluster``
in a child process of its own (the benchmark's own Ray cannot share a driver with it): two
shards, spread one per node, so the driver reaches one over its Unix socket and the other
over TCP, and each shard's backup is on the other node (the mirror link is TCP, checked).
Both caches live in that cluster; rounds alternate between them. A round is ``n`` pipelined
``write``s of small values over both shards, then ``sync()``: the rate counts writes the
shards acknowledged (with replicas, each after its backup had it). R1-sync times one
acknowledged write at a time, where nothing shares the backup's round trip.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.harness import Ctx, Row, case

_HERE = os.path.dirname(os.path.abspath(__file__))


def _child(n: int, rounds: int) -> dict:
    import persistroids_dist as pd
    from persistroids_dist.cluster_demo import simulated_cluster

    with simulated_cluster(1):
        plain = pd.init(num_shards=2, placement="spread", writes_threshold=10**6,
                        millis_threshold=600_000)
        backed = pd.init(num_shards=2, placement="spread", replicas=1,
                         writes_threshold=10**6, millis_threshold=600_000)
        links = [m["backup_transport"] for m in backed.metrics()["shards"]]
        rates: dict[str, list[float]] = {"plain": [], "backed": []}
        value = b"x" * 64
        for r in range(rounds + 1):  # round 0 warms up
            for label, cache in (("plain", plain), ("backed", backed)):
                t = time.perf_counter()
                for i in range(n):
                    cache.write(i, value)
                cache.sync()
                if r:
                    rates[label].append(n / (time.perf_counter() - t))
            for cache in (plain, backed):
                cache.flush_now()  # the journals start each round small
        # R1-sync: one acknowledged write at a time (the backup's round trip is not shared).
        sync: dict[str, list[float]] = {"plain": [], "backed": []}
        for r in range(rounds + 1):
            for label, cache in (("plain", plain), ("backed", backed)):
                t = time.perf_counter()
                for i in range(n // 50):
                    cache.write(i, value, wait=True)
                if r:
                    sync[label].append((time.perf_counter() - t) / (n // 50) * 1e6)
        plain.shutdown()
        backed.shutdown()
        return {"rates": rates, "sync_us": sync, "links": links}


@case("R1")
def r1_replicas(ctx: Ctx) -> None:
    """Pipelined writes/s with replicas=1 vs replicas=0, two nodes, same run."""
    n, rounds = ctx.pick(100_000, 20_000), ctx.pick(5, 2)
    run = subprocess.run([sys.executable, "-c",
                          f"import json; from benchmarks.r1_replicas import _child; "
                          f"print('RESULT ' + json.dumps(_child({n}, {rounds})))"],
                         capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(_HERE), env={**os.environ, "RAY_ADDRESS": ""})
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode or not lines:
        ctx.rows.append(Row("R1", "pipelined writes/s, replicas=1", "replicas=0", None, None,
                            "/s", ">= 0.5x", False,
                            f"CHECK FAILED: the two-node run failed: {run.stderr[-300:]}"))
        return
    out = json.loads(lines[0][len("RESULT "):])
    plain = statistics.median(out["rates"]["plain"])
    backed = statistics.median(out["rates"]["backed"])
    ctx.details["R1"] = out
    over_tcp = all(link and link.startswith("tcp") for link in out["links"])
    check = "" if over_tcp else f"CHECK FAILED: mirror links {out['links']}; "
    ctx.rows.append(Row("R1", "pipelined writes/s, replicas=1 (backup on another node)",
                        "same writes, replicas=0", plain, backed, "/s", ">= 0.5x",
                        over_tcp and backed >= 0.5 * plain,
                        f"{check}{n} writes per round, median of {rounds}; mirror links "
                        f"{out['links']}"))
    plain_us = statistics.median(out["sync_us"]["plain"])
    backed_us = statistics.median(out["sync_us"]["backed"])
    ctx.rows.append(Row("R1-sync", "write(wait=True) with replicas=1 (us per write)",
                        "same, replicas=0", plain_us, backed_us, "us", "-", None,
                        f"{n // 50} writes per round, median of {rounds}: each waits for "
                        "its backup's round trip"))
