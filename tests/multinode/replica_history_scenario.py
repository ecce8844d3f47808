"""Linearizability through a node loss, with ``replicas=1``, on a three-node
``ray.cluster_utils.Cluster`` (run in a process of its own by
``tests/cluster/test_multinode.py``): four workers pinned to the two nodes that stay read,
write and update four keys over the three shards while the third node, which holds a
primary, is lost (its processes SIGKILLed, its journal folders deleted). Prints ``RESULT``
and one JSON line: the checker's verdict, op counts, and where the shards ran.

An op whose call raised stays of unknown outcome in the history (the checker lets it take
effect or not); the test expects none to raise.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import sys
import tempfile
import time
import uuid

import ray
from linearizability import Recorder, check
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from replica_scenario import FAST_HEALTH_CHECKS, lose, replicas
from spread_scenario import report, three_nodes
from test_reshard import history_worker

import persistroids_dist as pd


def served(cache: pd.Cache, shards: set[int]) -> int:
    """Reads, writes and updates the ``shards`` served so far, by their own counters."""
    ms = cache.metrics()["shards"]
    return sum(ms[s]["lookup"] + ms[s]["write"] + ms[s]["updates"] for s in shards)


def main() -> int:
    journal = tempfile.mkdtemp(prefix="persistroids-rhist-")
    try:
        with three_nodes(FAST_HEALTH_CHECKS) as (cluster, workers):
            cache = pd.init(num_shards=3, replicas=1, journal=journal, init_fn=lambda a: 0,
                            shard_wait_s=60, writes_threshold=10**6, millis_threshold=600_000)
            keys = [next(k for i in itertools.count()
                         if cache.shard_of(k := f"h{s}.{i}") == s) for s in range(3)]
            keys.append("h.extra")
            before = replicas(cache)
            by_id = {n.node_id: n for n in workers}
            victim = next(r["primary_node"] for r in before if r["primary_node"] in by_id)
            stay = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != victim]
            parties = 2 * len(stay)
            tag = uuid.uuid4().hex
            refs = [history_worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node, soft=False)).remote(cache, w, keys, 300 + w, tag)
                for w, node in enumerate(stay * 2)]
            while cache.read(("barrier", tag)) < parties:
                time.sleep(0.005)
            time.sleep(0.1)  # early in the run
            lost_at = time.monotonic()
            gone = lose(cluster, by_id[victim], cache, journal)
            # Until the lost shard's keys answer again (the promoted backup), and until the
            # promoted primaries served 500 more ops (their own counters): a fixed second
            # after the failover gave a slow run too few ops on them (67 once).
            while cache.replicas()[0]["failovers"] < 1:
                time.sleep(0.05)
            lost_shards = {r["shard"] for r in before if r["primary_node"] == victim}
            served_at = served(cache, lost_shards)
            deadline = time.monotonic() + 120
            while served(cache, lost_shards) < served_at + 500 and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
            cache.write(("stop", tag), 1, wait=True)
            results = ray.get(refs, timeout=300)
            history = [op for ops, _ in results for op in ops]
            # Ops before the loss, and ops on the lost shard's keys answered after it (by
            # the promoted backup): the loss happened mid-run, and the history covers it.
            before_loss = sum(op.call < lost_at for op in history)
            after_loss = sum(op.call > lost_at and cache.shard_of(op.key) in lost_shards
                             for op in history)
            last = Recorder("driver")
            for k in keys:
                last.run("read", k, None, functools.partial(cache.read, k))
            history += last.ops
            res = check(history, initial=0)
            after = replicas(cache)
            cache.shutdown()
            errors = [e for _, errs in results for e in errs]
            report({"ok": res.ok, "ops": res.ops, "explain": "" if res.ok else res.explain(),
                    "victim": victim, "gone": gone, "before": before, "after": after,
                    "shards": [cache.shard_of(k) for k in keys],
                    "before_loss": before_loss, "after_loss_on_lost_shards": after_loss,
                    "errors": errors[:10], "error_count": len(errors)})
    finally:
        shutil.rmtree(journal, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
