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
import threading
import time

import ray
from spread_scenario import report, three_nodes

import persistroids_dist as pd
from persistroids_dist.cluster_demo import FAST_HEALTH_CHECKS
from persistroids_dist.cluster_demo import lose_node as lose

BUMP = functools.partial(operator.add, 1)


class Writers:
    """Three writer threads and what the cache acknowledged to each."""

    def __init__(self, cache: pd.Cache) -> None:
        self.cache = cache
        self.stop = threading.Event()
        self.acked: dict[str, int] = {}  # unique key -> value, acknowledged
        self.counts = [0, 0, 0, 0]  # acknowledged bumps of counter c0..c3
        self.batches: dict[str, int] = {}  # pipelined writes confirmed by a sync
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=f) for f in
                        (self._unique, self._counters, self._pipelined)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _guard(self, fn, *args):
        try:
            fn(*args)
            return True
        except Exception as e:  # every error is a finding: the test expects none
            self.errors.append(f"{type(e).__name__}: {e}"[:1500])
            return False

    def _unique(self) -> None:
        i = 0
        while not self.stop.is_set():
            k = f"u{i}"
            if self._guard(functools.partial(self.cache.write, k, i, wait=True)):
                self.acked[k] = i
            i += 1

    def _counters(self) -> None:
        i = 0
        while not self.stop.is_set():
            c = i % 4
            if self._guard(self.cache.update, f"c{c}", BUMP):
                self.counts[c] += 1
            i += 1

    def _pipelined(self) -> None:
        b = 0
        while not self.stop.is_set():
            batch = {f"p{b}.{j}": b for j in range(100)}
            for k, v in batch.items():
                self.cache.write(k, v)
            if self._guard(self.cache.sync):
                self.batches.update(batch)
            b += 1


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
            writers = Writers(cache)
            writers.start()
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
            writers.join()
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            after_add = settled(cache, alive)
            keys = sorted(writers.acked)
            values = cache.read_many(keys) if keys else []
            lost = [k for k, v in zip(keys, values, strict=True) if v != writers.acked[k]]
            pkeys = sorted(writers.batches)
            pvalues = cache.read_many(pkeys) if pkeys else []
            plost = [k for k, v in zip(pkeys, pvalues, strict=True) if v != writers.batches[k]]
            counters = cache.read_many([f"c{c}" for c in range(4)])
            out = {
                "victim": victim, "other": other.node_id, "added": added.node_id,
                "head": ray.get_runtime_context().get_node_id(),
                "before": before, "after_loss": after_loss, "after_add": after_add,
                "gone": gone, "recovered_s": recovered_s,
                "acked": len(keys), "acked_during": len(keys) - acked_before,
                "lost": lost[:10], "lost_count": len(lost),
                "pipelined": len(pkeys), "pipelined_lost": len(plost),
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
