"""A checkpointed cache with ``replicas=1`` whose coordinator is SIGKILLed, on a three-node
``ray.cluster_utils.Cluster`` (run in a process of its own by
``tests/cluster/test_multinode.py``).

1. Counters are bumped (``update``) while the coordinator process is SIGKILLed: Ray
   restarts it, the bumps go on, and the backups it had placed must survive it (an actor
   dies with the process that made it, unless it is detached).
2. A checkpoint after the restart; then a worker node holding a primary is lost (processes
   SIGKILLed, journals deleted): the restarted coordinator promotes the backup.
3. The coordinator is SIGKILLed again: its successor must know of the promotion (the
   routing file), not send clients back to the dead primary.
4. A last checkpoint, more bumps, then ``restore()``: every counter is back at the last
   checkpoint's count, in the cache and, once stored, in SQLite.
5. A second cache whose driver (a subprocess) exits without a shutdown: its detached
   backups must end themselves, leaving no actor behind.

Prints ``RESULT`` and one JSON line.
"""

from __future__ import annotations

import functools
import operator
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import ray
from spread_scenario import report, three_nodes

import persistroids_dist as pd
from persistroids_dist.cluster_demo import FAST_HEALTH_CHECKS
from persistroids_dist.cluster_demo import lose_node as lose
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.spec import NAMESPACE

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import polling  # noqa: E402
from sqlite_rows import stored  # noqa: E402

BUMP = functools.partial(operator.add, 1)
KEYS = [f"c{i}" for i in range(12)]


def zero(_args):
    return 0


def coordinator_pid(cache: pd.Cache) -> int:
    return ray.get(cache._pool.spec.coordinator.pid.remote())


def wait_for(what, timeout: float = 90.0):
    return polling.wait_for(what, timeout, every=0.25)


class Bumper:
    """Bumps the counters round-robin on a thread until stopped; counts what was
    acknowledged per key and keeps every error."""

    def __init__(self, cache: pd.Cache, counts: dict[str, int]) -> None:
        self.cache, self.counts, self.errors = cache, counts, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            k = KEYS[i % len(KEYS)]
            try:
                got = self.cache.update(k, BUMP)
                self.counts[k] += 1
                if got != self.counts[k]:
                    self.errors.append(f"{k}: update returned {got}, "
                                       f"expected {self.counts[k]}")
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def our_actors(name: str) -> list[str]:
    prefix = f"cache:{name}"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))


ORPHAN_DRIVER = """
import sys, ray, persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector
ray.init(address=sys.argv[1])
cache = pd.init([SQLiteConnector(sys.argv[2])], name="orphaned", num_shards=2, replicas=1,
                checkpoints=True, journal=sys.argv[3], init_fn=lambda a: 0)
for i in range(50):
    cache.update("n", lambda v: v + 1)
print(len([r for r in cache.replicas() if r["backup_node"]]), flush=True)
"""


def main() -> int:
    journal = tempfile.mkdtemp(prefix="persistroids-coord-")
    db = os.path.join(journal, "store.db")
    out: dict = {}
    try:
        with three_nodes(FAST_HEALTH_CHECKS) as (cluster, workers):
            cache = pd.init([SQLiteConnector(db)], name="ckrep", num_shards=3, replicas=1,
                            checkpoints=True, journal=journal, shard_wait_s=60,
                            init_fn=zero)
            counts = {k: 0 for k in KEYS}
            before = cache.replicas(detail=True)
            # 1. the coordinator dies while counters are bumped
            bumper = Bumper(cache, counts)
            wait_for(lambda: sum(counts.values()) >= 200)
            first_pid = coordinator_pid(cache)
            os.kill(first_pid, signal.SIGKILL)
            at_kill = sum(counts.values())
            wait_for(lambda: sum(counts.values()) >= at_kill + 300)
            bumper.stop()
            out["bumps_across_first_kill"] = sum(counts.values()) - at_kill
            out["coordinator_restarted"] = coordinator_pid(cache) != first_pid
            after_kill = cache.replicas(detail=True)
            out["backups_survived"] = [
                (a["backup_id"] == b["backup_id"] and a["backup_pid"] == b["backup_pid"]
                 and a["backup_pid"] is not None) for a, b in zip(before, after_kill)]
            first = cache.checkpoint({"n": sum(counts.values())})
            # 2. a node holding a primary is lost; the restarted coordinator promotes
            by_id = {n.node_id: n for n in workers}
            victim = next(r["primary_node"] for r in after_kill if r["primary_node"] in by_id)
            out["victim"] = victim
            out["gone"] = lose(cluster, by_id[victim], cache, journal)
            for k in KEYS:  # waits for the promotion (shard_wait_s)
                counts[k] += 1
                assert cache.update(k, BUMP) == counts[k]
            promoted = wait_for(lambda: all(r["primary_node"] != victim
                                            for r in cache.replicas()))
            out["promoted"] = promoted
            # 3. the coordinator dies again: its successor must route to the promoted one
            second_pid = coordinator_pid(cache)
            os.kill(second_pid, signal.SIGKILL)
            bumper = Bumper(cache, counts)
            wait_for(lambda: coordinator_pid(cache) != second_pid)
            at_kill = sum(counts.values())
            wait_for(lambda: sum(counts.values()) >= at_kill + 200)
            bumper.stop()
            out["errors"] = bumper.errors[:10]
            reps = wait_for(lambda: (lambda rs: rs if all(
                r["backup_node"] not in (None, r["primary_node"]) for r in rs) else None)(
                cache.replicas()))
            out["backed_up_again"] = bool(reps)
            reps = cache.replicas()
            out["after_second_kill"] = reps
            out["routes_avoid_victim"] = all(r["primary_node"] != victim for r in reps)
            out["failovers_kept"] = reps[0]["failovers"]
            # 4. a last checkpoint, bumps after it, and a restore
            last = cache.checkpoint({"n": sum(counts.values())})
            at_last = dict(counts)
            for k in KEYS:
                cache.update(k, BUMP)
            out["checkpoint_ids"] = [first.id, last.id]
            info = cache.restore()
            out["restored_id"] = info.id if info else None
            out["cache_after_restore"] = cache.read_many(KEYS)
            out["model"] = [at_last[k] for k in KEYS]
            wait_for(lambda: all(stored(db).get(k) == at_last[k] for k in KEYS), 60)
            out["stored"] = [stored(db).get(k) for k in KEYS]
            cache.shutdown()
            out["left_after_shutdown"] = our_actors("ckrep")
            # 5. a driver that exits without a shutdown leaves nothing behind
            run = subprocess.run([sys.executable, "-c", ORPHAN_DRIVER, cluster.address,
                                  os.path.join(journal, "orphan.db"), journal],
                                 capture_output=True, text=True, timeout=300)
            out["orphan_driver"] = [run.returncode, run.stdout.strip()[-200:],
                                    run.stderr[-1500:] if run.returncode else ""]
            wait_for(lambda: our_actors("orphaned") == [], timeout=60)
            out["orphan_left"] = our_actors("orphaned")
    finally:
        shutil.rmtree(journal, ignore_errors=True)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
