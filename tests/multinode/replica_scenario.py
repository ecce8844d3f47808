"""Node loss with ``replicas=1``, on a three-node ``ray.cluster_utils.Cluster`` (run in a
process of its own by ``tests/cluster/test_multinode.py``).

Writers keep going (acknowledged writes to unique keys, counters bumped by ``update``, and
pipelined batches confirmed by ``sync``) while a worker node holding a primary is removed:
its processes are SIGKILLed and its journal folders deleted, as a lost machine takes its
disk. Then a node is added and the other worker removed, so the only place left for the
backups is the new node. Prints ``RESULT`` and one JSON line: what was acknowledged, what
the cache holds afterwards, and where the replicas were at each step.
"""

from __future__ import annotations

import functools
import operator
import shutil
import sys
import tempfile
import time

import ray
from spread_scenario import report, three_nodes
from writers import Writers, lost

import persistroids_dist as pd
from persistroids_dist.cluster_demo import FAST_HEALTH_CHECKS
from persistroids_dist.cluster_demo import lose_node as lose

BUMP = functools.partial(operator.add, 1)


def replicas(cache: pd.Cache) -> list[dict]:
    return cache.replicas()


def settled(cache: pd.Cache, alive: set[str], timeout: float = 90) -> list[dict]:
    """Wait until every shard has a backup on an alive node other than its primary's."""
    deadline = time.monotonic() + timeout
    while True:
        reps = replicas(cache)
        if all(r["backup_node"] in alive and r["primary_node"] in alive
               and r["backup_node"] != r["primary_node"] for r in reps):
            return reps
        if time.monotonic() > deadline:
            return reps
        time.sleep(0.25)


def main() -> int:
    journal = tempfile.mkdtemp(prefix="persistroids-replica-")
    try:
        with three_nodes(FAST_HEALTH_CHECKS) as (cluster, workers):
            cache = pd.init(num_shards=3, replicas=1, journal=journal, shard_wait_s=60,
                            writes_threshold=10**6, millis_threshold=600_000,
                            init_fn=lambda args: 0)
            before = replicas(cache)
            by_id = {n.node_id: n for n in workers}
            victim = next(r["primary_node"] for r in before if r["primary_node"] in by_id)
            writers = Writers(cache, counters=4, batch=100).__enter__()
            time.sleep(1.0)
            acked_before = len(writers.acked)
            started = time.monotonic()
            gone = lose(cluster, by_id[victim], cache, journal)
            # Carry on until every shard answers again, and some more.
            while len(writers.acked) < acked_before + 200 and \
                    time.monotonic() - started < 90:
                time.sleep(0.1)
            recovered_s = time.monotonic() - started
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            after_loss = settled(cache, alive)
            # A new node; then the other worker goes too: the backups must move to the new one.
            added = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            other = next(n for n in workers if n.node_id != victim)
            gone += lose(cluster, other, cache, journal)
            time.sleep(1.0)
            writers.__exit__()
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            after_add = settled(cache, alive)
            keys = sorted(writers.acked)
            missing = lost(cache, writers.acked)
            plost = lost(cache, writers.batches)
            counters = cache.read_many(writers.counter_names())
            out = {
                "victim": victim, "other": other.node_id, "added": added.node_id,
                "head": ray.get_runtime_context().get_node_id(),
                "before": before, "after_loss": after_loss, "after_add": after_add,
                "gone": gone, "recovered_s": recovered_s,
                "acked": len(keys), "acked_during": len(keys) - acked_before,
                "lost": missing[:10], "lost_count": len(missing),
                "pipelined": len(writers.batches), "pipelined_lost": len(plost),
                "counts": writers.counts, "counters": counters,
                "errors": writers.errors[:10], "error_count": len(writers.errors),
                "shards": [{k: m.get(k) for k in ("role", "backed_up", "replayed", "node_id")}
                           for m in cache.metrics()["shards"]],
            }
            cache.shutdown()
            report(out)
    finally:
        shutil.rmtree(journal, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
