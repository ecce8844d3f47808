"""A three-node ``ray.cluster_utils.Cluster`` scenario, run in a process of its own by
``tests/cluster/test_multinode.py`` (the test session's own Ray cannot share a driver with
it). Prints one JSON line: where the shards run, and per node which transport a task pinned
there used to reach each shard, and what the shards counted."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import persistroids_dist as pd
from persistroids_dist.cluster_demo import simulated_cluster


@contextlib.contextmanager
def three_nodes(system_config: dict | None = None) -> Iterator[tuple[Cluster, list]]:
    """A head node and two more (``persistroids_dist.cluster_demo.simulated_cluster``), with
    this process connected; yields the cluster and its two added nodes."""
    with simulated_cluster(2, system_config) as (cluster, added):
        yield cluster, added


def report(out: dict) -> None:
    """Print a scenario's result on a marked line: Ray may print to stdout too (a removed
    node's raylet dumps its state there)."""
    print("RESULT " + json.dumps(out), flush=True)


def transports(cache: pd.Cache) -> list[str | None]:
    """The transport of this process's connection to each shard (None: not connected)."""
    return [c.transport if c is not None else None for c in cache._pool.conns]


def keys_per_shard(cache: pd.Cache, per: int = 5) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(cache.num_shards)]
    i = 0
    while any(len(ks) < per for ks in out):
        k = f"key{i}"
        s = cache.shard_of(k)
        if len(out[s]) < per:
            out[s].append(k)
        i += 1
    return out


@ray.remote(num_cpus=0, max_retries=0)
def probe(cache: pd.Cache, tag: str, keys: list[list[str]]) -> dict:
    """Write and read back keys on every shard from this task's node."""
    for shard_keys in keys:
        for k in shard_keys:
            cache.write((tag, k), k)
    cache.sync()
    back = cache.read_many([(tag, k) for shard_keys in keys for k in shard_keys])
    assert back == [k for shard_keys in keys for k in shard_keys], back
    assert cache.update((tag, "n"), lambda v: (v or 0) + 1) == 1
    return {"node": ray.get_runtime_context().get_node_id(), "transports": transports(cache)}


def main() -> int:
    with three_nodes():
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cache = pd.init(num_shards=3, journal=False)  # no placement: spread on 3 nodes
        keys = keys_per_shard(cache)
        shards = cache.metrics()["shards"]
        tasks = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(cache, f"t{i}", keys) for i, node in enumerate(nodes)]
        probes = ray.get(tasks, timeout=120)
        after = cache.metrics()["shards"]
        out = {
            "nodes": nodes,
            "driver_node": ray.get_runtime_context().get_node_id(),
            "shard_nodes": [m["node_id"] for m in shards],
            "shard_tcp": [m["tcp"] for m in shards],
            "probes": probes,
            "connections": [m["connections"] for m in after],
            "connections_tcp": [m["connections_tcp"] for m in after],
            "driver_transports": transports(cache),
        }
        cache.shutdown()
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
