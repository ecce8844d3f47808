"""Resharding on a three-node ``ray.cluster_utils.Cluster`` (run in a process of its own by
``tests/cluster/test_multinode.py``): grow 2 -> 5 and shrink 5 -> 3 while writer threads in
the driver and a writer task pinned to each other node keep going, with ``replicas=1``.
Then the linearizability checker on histories recorded by a worker on each node across
another reshard. Prints ``RESULT`` and one JSON line.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import time
import uuid

import ray
from linearizability import check
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from spread_scenario import report, three_nodes
from test_histories import zero
from test_reshard import histories_across, history_worker, remote_writer
from writers import Writers, lost

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector


def pinned(fn, node):
    return fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


def main() -> int:
    folder = tempfile.mkdtemp(prefix="persistroids-reshard-")
    try:
        with three_nodes() as (_, workers):
            nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            # One SQLite file on this host's disk is every shard's store: simulated nodes
            # share the host (a real cluster would use PostgreSQL or Redis).
            cache = pd.init([SQLiteConnector(f"{folder}/store.db")], num_shards=2,
                            replicas=1, journal=f"{folder}/journal", init_fn=zero,
                            writes_threshold=10**6, millis_threshold=600_000)
            remote = [pinned(remote_writer, n.node_id).remote(cache, f"r{i}", 120.0)
                      for i, n in enumerate(workers)]
            with Writers(cache, "d") as w:
                time.sleep(1.0)
                grown = cache.reshard(5)
                time.sleep(1.5)
                shrunk = cache.reshard(3)
                time.sleep(1.0)
                for i in range(len(workers)):  # the remote writers stop now, not on a clock
                    cache.write(f"r{i}.stop", 1, wait=True)
            results = ray.get(remote, timeout=300)
            acked = {**w.acked, **w.batches}
            counters = dict(zip(w.counter_names(), w.counts, strict=True))
            for r in results:
                acked.update(r["acked"])
                counters.update(r["counts"])
            keys = sorted(acked)
            missing = len(lost(cache, acked))
            counts_ok = not lost(cache, counters)
            reps = cache.replicas()
            shard_nodes = sorted({r["primary_node"] for r in reps})
            # Histories across one more reshard, a worker on each node.
            hkeys = [f"h{i}" for i in range(6)]
            tag = uuid.uuid4().hex
            refs = [pinned(history_worker, node).remote(cache, wi, hkeys, 500 + wi, tag)
                    for wi, node in zip(itertools.count(), nodes)]
            refs.append(pinned(history_worker, nodes[0]).remote(cache, 3, hkeys, 503, tag))
            history, herrors, spans = histories_across(cache, hkeys, tag, refs,
                                                       lambda: cache.reshard(4))
            res = check(history, initial=0)
            out = {
                "grown": grown, "shrunk": shrunk, "acked": len(keys), "lost": missing,
                "counts_ok": counts_ok, "counted": sum(counters.values()),
                "errors": (w.errors + [e for r in results for e in r["errors"]])[:10],
                "remote_epochs": [r["epoch"] for r in results],
                "replicas": reps, "shard_nodes": shard_nodes, "nodes": nodes,
                "history_ok": res.ok, "history_ops": res.ops, "spans": spans,
                "history_errors": herrors[:5],
                "explain": "" if res.ok else res.explain()[:3000],
            }
            cache.shutdown()
            report(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
