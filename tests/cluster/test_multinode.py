"""Three simulated nodes (``ray.cluster_utils.Cluster``): shards spread, and every client
reaches a shard on its own node over the Unix socket and the others over TCP.

The scenario runs in a process of its own (``tests/multinode/spread_scenario.py``): a test
session has one Ray, and a Cluster needs its own driver. Simulated nodes share one host and
/tmp, so a Unix socket would work from every node: the test checks which transport each
client took (and the shards' own count of TCP connections), so it fails if the choice were
made by host name or by whether the socket file exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCENARIO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "multinode",
                        "spread_scenario.py")


def scenario(path: str) -> dict:
    """Run the scenario at ``path`` in a process of its own (with its own Ray); its result."""
    tests = os.path.dirname(os.path.dirname(__file__))
    pythonpath = os.pathsep.join([tests, os.path.dirname(SCENARIO),
                                  os.path.join(tests, "cluster"),
                                  os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": pythonpath})
    assert run.returncode == 0, run.stderr[-3000:]
    # Ray prints a removed raylet's state dump to stdout: the result is the marked line.
    return json.loads(next(line for line in run.stdout.splitlines()
                           if line.startswith("RESULT "))[len("RESULT "):])


def test_shards_spread_and_clients_pick_unix_on_their_node_and_tcp_across(ray_session):
    out = scenario(SCENARIO)
    nodes, shard_nodes = out["nodes"], out["shard_nodes"]
    assert len(nodes) == 3
    assert sorted(shard_nodes) == nodes  # one shard per node
    assert all(tcp and tcp[1] > 0 for tcp in out["shard_tcp"])
    probes = {p["node"]: p["transports"] for p in out["probes"]}
    assert sorted(probes) == nodes  # a task ran on every node
    for node, transports in probes.items():
        assert transports == ["unix" if s == node else "tcp" for s in shard_nodes], node
    driver = out["driver_node"]
    assert out["driver_transports"] == ["unix" if s == driver else "tcp" for s in shard_nodes]
    # The shards' side: each was reached over TCP by the two tasks (and maybe the driver)
    # on the other nodes, and over its Unix socket by the one on its own node.
    for s, node in enumerate(shard_nodes):
        tcp = 2 + (node != driver)
        assert out["connections_tcp"][s] == tcp, (s, out["connections_tcp"])
        assert out["connections"][s] - tcp >= 1


NODE_LOSS = os.path.join(os.path.dirname(SCENARIO), "node_loss_scenario.py")


def test_a_lost_node_takes_its_shard_loudly_and_the_others_keep_everything(ray_session):
    # Without replicas a node's loss costs its shards' unflushed writes (the journal was on
    # its disk). What the README promises: a call to such a shard raises, within
    # shard_wait_s, instead of meeting an empty shard restarted elsewhere.
    out = scenario(NODE_LOSS)
    assert out["lost_call"] in ("ShardUnavailableError", "CacheClosedError"), out
    assert out["survivors_intact"] and all(out["survivors_intact"].values()), out


HISTORY = os.path.join(os.path.dirname(SCENARIO), "history_scenario.py")


def test_histories_across_nodes_are_linearizable(ray_session):
    # One worker pinned to each node, four keys over the three shards: every key is reached
    # over its shard's Unix socket by one worker and over TCP by the other two, at once.
    out = scenario(HISTORY)
    assert sorted(out["shards"][:3]) == [0, 1, 2] and len(set(out["shard_nodes"])) == 3
    for w in out["workers"]:
        assert w["transports"] == ["unix" if n == w["node"] else "tcp"
                                   for n in out["shard_nodes"]]
    assert out["ops"] >= 3 * 600
    assert out["ok"], out["explain"]


REPLICA = os.path.join(os.path.dirname(SCENARIO), "replica_scenario.py")


def test_with_replicas_a_lost_node_loses_no_acknowledged_write(ray_session):
    # Writers carry on while a worker node holding a primary is lost (processes SIGKILLed,
    # its journal folders deleted); then a node is added and the other worker lost, so the
    # backups can only go to the new node.
    out = scenario(REPLICA)
    head, victim, other, added = out["head"], out["victim"], out["other"], out["added"]
    assert any(r["primary_node"] == victim for r in out["before"])
    assert all(r["backup_node"] not in (None, r["primary_node"]) for r in out["before"])
    assert out["gone"]  # the lost nodes' journals really went
    # Nothing acknowledged is lost, and the writers were not refused anything.
    assert out["acked_during"] >= 200
    assert out["lost_count"] == 0, out["lost"]
    assert out["pipelined"] > 0 and out["pipelined_lost"] == 0
    assert out["error_count"] == 0, out["errors"]
    assert out["counters"] == out["counts"] and sum(out["counts"]) > 0
    # After the first loss: every shard on the two nodes left, each backed up on the other.
    for r in out["after_loss"]:
        assert {r["primary_node"], r["backup_node"]} == {head, other}, r
    # After the second: everything on the head, every backup on the node that was added.
    assert out["after_add"][0]["failovers"] >= 2
    for r in out["after_add"]:
        assert (r["primary_node"], r["backup_node"]) == (head, added), r
    assert all(m["role"] == "primary" and m["backed_up"] for m in out["shards"])
    assert sum(m["replayed"] for m in out["shards"]) > 0  # promoted from the backups' copies


REPLICA_HISTORY = os.path.join(os.path.dirname(SCENARIO), "replica_history_scenario.py")


def test_histories_through_a_node_loss_with_replicas_are_linearizable(ray_session):
    # Four workers on the two nodes that stay; the third, holding a primary, is lost
    # mid-run (processes SIGKILLed, journal folders deleted) and its backup takes over.
    out = scenario(REPLICA_HISTORY)
    assert any(r["primary_node"] == out["victim"] for r in out["before"])
    assert out["gone"]
    assert all(r["primary_node"] != out["victim"] for r in out["after"])
    assert out["after"][0]["failovers"] >= 1
    assert out["error_count"] == 0, out["errors"]
    assert out["before_loss"] >= 100 and out["after_loss_on_lost_shards"] >= 300, out
    assert out["ok"], out["explain"]


RESHARD = os.path.join(os.path.dirname(SCENARIO), "reshard_scenario.py")


def test_resharding_on_three_nodes_loses_nothing_and_stays_linearizable(ray_session):
    # Grow 2 -> 5 and shrink 5 -> 3 (replicas=1) while writer threads here and a writer task
    # on each other node go on; then histories from a worker on each node across a reshard.
    out = scenario(RESHARD)
    assert (out["grown"]["num_shards"], out["shrunk"]["num_shards"]) == (5, 3)
    assert not out["errors"], out["errors"]
    assert out["acked"] > 1000 and out["lost"] == 0
    assert out["counts_ok"] and out["counted"] > 100
    assert out["remote_epochs"] == [out["shrunk"]["epoch"]] * 2  # each task learnt both
    assert len(out["shard_nodes"]) >= 2  # the shards are spread, not all on one node
    assert all(r["backup_node"] not in (None, r["primary_node"]) for r in out["replicas"])
    assert not out["history_errors"], out["history_errors"]
    assert min(out["spans"]) >= 50, out["spans"]
    assert out["history_ok"], out["explain"]


COORDINATOR = os.path.join(os.path.dirname(SCENARIO), "coordinator_restart_scenario.py")


def test_a_checkpointed_cache_with_replicas_survives_its_coordinator_s_sigkill(ray_session):
    # The coordinator of a checkpointed cache with replicas is SIGKILLed twice: once while
    # counters are bumped, once after it promoted a backup over a lost node (see the
    # scenario's docstring). Nothing acknowledged is lost or refused, the backups it had
    # placed outlive it, its successor routes to the promoted primary, a restore gives the
    # last checkpoint's counts, and a driver that exits without a shutdown leaves no actor.
    out = scenario(COORDINATOR)
    assert out["coordinator_restarted"] and out["bumps_across_first_kill"] >= 300
    assert out["backups_survived"] == [True, True, True]
    assert out["gone"] and out["promoted"]
    assert out["routes_avoid_victim"] and out["failovers_kept"] >= 1
    assert out["backed_up_again"], out["after_second_kill"]  # on the two nodes left
    assert out["errors"] == []
    assert out["checkpoint_ids"] == [0, 1] and out["restored_id"] == 1
    assert out["cache_after_restore"] == out["model"] and sum(out["model"]) > 500
    assert out["stored"] == out["model"]
    assert out["left_after_shutdown"] == []
    assert out["orphan_driver"][0] == 0, out["orphan_driver"]
    assert out["orphan_driver"][1].endswith("2")  # it had two backups
    assert out["orphan_left"] == []
