"""Demo: a cache with backups on three simulated nodes, one of which is lost mid-run.

Run with ``python -m persistroids_dist.cluster_demo`` (``make cluster-demo``). On this one
machine it starts a Ray cluster of three nodes (``ray.cluster_utils.Cluster``: a head and two
more, each a raylet of its own), makes a cache of three shards with ``replicas=1`` (one
primary per node, each backed up on another node), and runs worker tasks on the two nodes
that will stay: they write keys and count on shared counters. Meanwhile the third node is
lost as a machine would be: removed from the cluster, its processes killed, its journal
folders deleted. The demo then checks that every acknowledged write and every counted
increment is there, and shows where the backups went. It exits non-zero if anything
acknowledged was lost.

Simulated nodes share this host and /tmp: what makes them separate nodes here is Ray's node
id, which is what the cache goes by (Unix socket on a shard's own node, TCP otherwise).
``simulated_cluster`` and ``lose_node`` are also what the multinode tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import ray

import persistroids_dist as pd

#: Ray takes a node for dead once its health checks fail: every 3 s, 5 times, by default.
#: Simulated clusters here check every 0.5 s, 3 times (a deployment keeps Ray's defaults or
#: tunes them the same way: the failover waits for this).
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 0}


def _free_port() -> int:
    """A port free now, and none that Ray's head node takes by default for something else:
    Linux hands out 52365, the dashboard agent's, as a free port too, and a GCS given it
    fails the head's start ("used by other components"; seen once in CI)."""
    from ray._private import ray_constants

    taken_by_ray = {ray_constants.DEFAULT_PORT, ray_constants.DEFAULT_DASHBOARD_PORT,
                    ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT}
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken_by_ray:
            return port


@contextlib.contextmanager
def simulated_cluster(workers: int = 2, system_config: dict[str, Any] | None = None
                      ) -> Iterator[tuple[Any, list[Any]]]:
    """A Ray cluster on this machine: a head node and ``workers`` more, one CPU each, with
    this process connected as its driver; yields the cluster and its added nodes, and tears
    both down at the end. The GCS takes a free port (Ray's default, 6379, is often Redis's).
    ``system_config``: Ray's ``_system_config`` (e.g. ``FAST_HEALTH_CHECKS``)."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "gcs_server_port": _free_port(), "include_dashboard": False}
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        added = [cluster.add_node(num_cpus=1) for _ in range(workers)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


def lose_node(cluster: Any, node: Any, cache: pd.Cache, journal: str) -> list[str]:
    """Take ``node`` away as a lost machine goes: removed from ``cluster``, the cache's
    processes on it SIGKILLed (a removed simulated node leaves its workers running until
    they notice), and its journal folders (under ``journal``) deleted, as its disk would be
    gone. Returns the folders deleted."""
    mine = [(r["shard"], role, r[f"{role}_id"], r[f"{role}_pid"])
            for r in cache.replicas(detail=True) for role in ("primary", "backup")
            if r[f"{role}_node"] == node.node_id]
    cluster.remove_node(node, allow_graceful=False)
    for *_, pid in mine:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    gone = []
    for shard, role, actor_id, _ in mine:
        # A backup (promoted or not) keeps its copy in shard<i>.backup-<its actor id>; a
        # shard that was a primary from the start journals in shard<i>.
        paths = glob.glob(os.path.join(journal, "*", f"shard{shard}.backup-{actor_id[:12]}"))
        if role == "primary" and not paths:
            paths = glob.glob(os.path.join(journal, "*", f"shard{shard}"))
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(os.path.basename(path))
    return gone


def add_one(v: int) -> int:
    return v + 1


@ray.remote(num_cpus=0, max_retries=0)
def worker(cache: pd.Cache, w: int, keys: int, counters: int) -> dict[str, Any]:
    """Write ``keys`` keys of its own (each acknowledged: ``wait=True``) and bump every
    counter in turn; report what was acknowledged."""
    acked: dict[str, int] = {}
    counted = [0] * counters
    errors: list[str] = []
    for i in range(keys):
        try:
            cache.write(f"w{w}.{i}", i, wait=True)
            acked[f"w{w}.{i}"] = i
            cache.update(f"counter{i % counters}", add_one)
            counted[i % counters] += 1
        except Exception as e:  # reported: the demo expects none
            errors.append(f"{type(e).__name__}: {e}"[:200])
    return {"node": ray.get_runtime_context().get_node_id(), "acked": acked,
            "counted": counted, "errors": errors}


def _short(node: str | None) -> str:
    return node[:8] if node else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=3000, help="keys each worker writes")
    parser.add_argument("--counters", type=int, default=4)
    opts = parser.parse_args(argv)
    journal = tempfile.mkdtemp(prefix="persistroids-cluster-demo-")
    try:
        with simulated_cluster(2, FAST_HEALTH_CHECKS) as (cluster, workers):
            head = ray.get_runtime_context().get_node_id()
            names = {head: "head", workers[0].node_id: "node2", workers[1].node_id: "node3"}
            listed = ", ".join(f"{v} {_short(k)}" for k, v in names.items())
            print(f"three simulated nodes: {listed}")
            cache = pd.init(num_shards=3, replicas=1, journal=journal, init_fn=lambda a: 0,
                            shard_wait_s=60, name="cluster-demo")
            before = cache.replicas()
            for r in before:
                print(f"  shard {r['shard']}: primary on {names[r['primary_node']]}, "
                      f"backup on {names[r['backup_node']]}")
            victim = next(n for n in workers
                          if any(r["primary_node"] == n.node_id for r in before))
            stay = [n for n in names if n != victim.node_id]
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            refs = [worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node, soft=False)).remote(cache, w, opts.keys, opts.counters)
                for w, node in enumerate(stay)]
            print(f"{len(refs)} tasks on {' and '.join(names[n] for n in stay)} write "
                  f"{opts.keys} keys each and count on {opts.counters} counters")
            time.sleep(1.0)
            print("(Ray prints the lost node's last raylet log lines next: expected)")
            lost_at = time.monotonic()
            gone = lose_node(cluster, victim, cache, journal)
            print(f"lost {names[victim.node_id]}: removed, its processes killed, its journal "
                  f"folders deleted ({', '.join(gone)})")
            results = ray.get(refs, timeout=600)
            print(f"tasks done {time.monotonic() - lost_at:.1f} s after the loss")
            deadline = time.monotonic() + 60  # the coordinator places the new backups
            after = cache.replicas()
            while any(r["backup_node"] is None for r in after) and time.monotonic() < deadline:
                time.sleep(0.2)
                after = cache.replicas()
            for r in after:
                print(f"  shard {r['shard']}: primary on {names.get(r['primary_node'], '?')}"
                      f", backup on {names.get(r['backup_node'], 'none')}")
            acked = {k: v for res in results for k, v in res["acked"].items()}
            keys = sorted(acked)
            lost = sum(1 for k, v in zip(keys, cache.read_many(keys), strict=True)
                       if v != acked[k])
            counted = [sum(res["counted"][c] for res in results)
                       for c in range(opts.counters)]
            counts = cache.read_many([f"counter{c}" for c in range(opts.counters)])
            errors = [e for res in results for e in res["errors"]]
            print(f"acknowledged writes: {len(keys):,}, lost: {lost}")
            print(f"counters: {counts} for {counted} increments counted: "
                  f"{'exact' if counts == counted else 'WRONG'}")
            print(f"failovers: {after[0]['failovers']}; errors raised to the tasks: "
                  f"{len(errors)}{' (' + errors[0] + ')' if errors else ''}")
            cache.shutdown()
            ok = not lost and counts == counted and not errors
            print("nothing acknowledged was lost" if ok else "SOMETHING WAS LOST")
            return 0 if ok else 1
    finally:
        shutil.rmtree(journal, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
