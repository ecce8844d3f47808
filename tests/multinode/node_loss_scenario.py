"""Node loss without replicas, on a three-node ``ray.cluster_utils.Cluster`` (run in a
process of its own by ``tests/cluster/test_multinode.py``). Prints one JSON line: what
calls to the lost node's shard raised, and whether the other shards kept every write."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

import ray
from spread_scenario import keys_per_shard, report, three_nodes

import persistroids_dist as pd


def main() -> int:
    journal = tempfile.mkdtemp(prefix="persistroids-nodeloss-")
    try:
        with three_nodes() as (cluster, workers):
            cache = pd.init(num_shards=3, journal=journal, shard_wait_s=5.0,
                            writes_threshold=10**6, millis_threshold=600_000)
            shards = cache.metrics()["shards"]
            shard_nodes = [m["node_id"] for m in shards]
            keys = keys_per_shard(cache, 20)
            for shard_keys in keys:
                for k in shard_keys:
                    cache.write(k, k)
            cache.sync()
            by_id = {n.node_id: n for n in workers}
            lost = next(s for s, node in enumerate(shard_nodes) if node in by_id)
            cluster.remove_node(by_id[shard_nodes[lost]], allow_graceful=False)
            # A lost machine takes its processes with it; a removed simulated node leaves its
            # workers to notice on their own, which takes a while: end the shard's now.
            pid = shards[lost]["pid"]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # That node's disk is gone with it: its shard's journal too.
            shutil.rmtree(os.path.join(journal, cache.name, f"shard{lost}"))
            started = time.monotonic()
            try:
                cache.read(keys[lost][0])
                lost_call = "answered"
            except Exception as e:  # what a caller sees
                lost_call = type(e).__name__
            waited = time.monotonic() - started
            survivors = {s: cache.read_many(keys[s]) == keys[s]
                         for s in range(3) if s != lost}
            result = {"lost_shard": lost, "lost_call": lost_call, "waited_s": waited,
                      "survivors_intact": survivors}
            report(result)
            for actor in cache._spec["shards"]:  # the cache is broken for good
                ray.kill(actor)
            ray.kill(cache._spec["coordinator"])
    finally:
        shutil.rmtree(journal, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
