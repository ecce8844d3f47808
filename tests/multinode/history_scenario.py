"""Linearizability across nodes, on a three-node ``ray.cluster_utils.Cluster`` (run in a
process of its own by ``tests/cluster/test_multinode.py``): one worker task pinned to each
node reads, writes and updates four keys spread over the three shards (one per node), so
every key sees clients over its Unix socket and over TCP at once. Prints ``RESULT`` and one
JSON line: the checker's verdict, op counts and the transports each worker used.

Simulated nodes share one host, so ``time.monotonic()`` is one clock for every worker: the
real-time order the checker relies on holds (on real machines it would not).
"""

from __future__ import annotations

import functools
import itertools
import operator
import random
import sys
import time

import ray
from linearizability import Recorder, check
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from spread_scenario import report, three_nodes, transports

import persistroids_dist as pd

ADD = {d: functools.partial(operator.add, d) for d in range(1, 6)}
OPS = 600


@ray.remote(num_cpus=0, max_retries=0)
def worker(cache: pd.Cache, w: int, keys: list[str], n: int, parties: int) -> tuple:
    rng = random.Random(w)
    rec = Recorder(w)
    cache.update("barrier", ADD[1])
    while cache.read("barrier") < parties:  # start together, so the ops overlap
        time.sleep(0.0005)
    for i in range(n):
        k = rng.choice(keys)
        x = rng.random()
        if x < 0.4:
            rec.run("read", k, None, functools.partial(cache.read, k))
        elif x < 0.7:
            v = (w + 1) * 10**12 + (i + 1) * 10**6  # unique, never reached by adds
            rec.run("write", k, v, functools.partial(cache.write, k, v, wait=True))
        else:
            d = rng.randint(1, 5)
            rec.run("add", k, d, functools.partial(cache.update, k, ADD[d]))
    return ray.get_runtime_context().get_node_id(), transports(cache), rec.ops


def main() -> int:
    with three_nodes():
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cache = pd.init(num_shards=3, init_fn=lambda a: 0, journal=False)
        # One key on each shard (so on each node), and a fourth on one of them.
        keys = [next(k for i in itertools.count() if cache.shard_of(k := f"h{s}.{i}") == s)
                for s in range(3)] + ["h.extra"]
        results = ray.get([worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(cache, w, keys, OPS, len(nodes))
            for w, node in enumerate(nodes)], timeout=300)
        history = [op for _, _, ops in results for op in ops]
        last = Recorder("driver")
        for k in keys:
            last.run("read", k, None, functools.partial(cache.read, k))
        history += last.ops
        res = check(history, initial=0)
        shard_nodes = [m["node_id"] for m in cache.metrics()["shards"]]
        cache.shutdown()
        out = {"ok": res.ok, "ops": res.ops, "explain": "" if res.ok else res.explain(),
               "keys": keys, "shards": [cache.shard_of(k) for k in keys],
               "shard_nodes": shard_nodes,
               "workers": [{"node": node, "transports": t} for node, t, _ in results]}
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
