"""Thin Ray actors: a shard (a ShardHost) and the coordinator.

Ray is the control plane here: it places the actors, restarts them, and finds them by name.
Reads and writes go over the shard's socket (see ``transport``), not through these methods.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import msgpack
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .checkpoints import CheckpointStore, default_store, encode_state, manifest
from .codec import NUM_SLOTS
from .errors import PicklingRefusedError, ShardUnavailableError, ShutdownError
from .host import ShardHost, _unpickle_checkpoint
from .replica import Backup, ReplicaDeposedError
from .spec import NAMESPACE, coordinator_name

__all__ = ["Coordinator", "ShardActor", "wait_ready"]

log = logging.getLogger("persistroids_dist.actors")

_SWITCH_INTERVAL_S = 0.00002  # see _ActorShardHost.__init__


class _ActorShardHost(ShardHost):
    """A ShardHost that knows it runs in a Ray actor: its node, and how often Ray restarted
    it (counted in its journal folder, which survives the restarts).

    With ``role="backup"`` it starts as a backup of shard ``index`` (a ``replica.Backup``:
    a copy of the primary's journal on this node) until the coordinator ``promote``s it."""

    def __init__(self, index: int, connectors: list[Any], options: dict[str, Any],
                 secret: bytes, role: str = "primary") -> None:
        # This process is the shard's alone. While its store thread runs Python (a flush
        # formats ~100k rows for the store), a socket thread that wants the GIL back to
        # answer a read waits up to the switch interval for it, at each hand-off: 5 ms by
        # default, which made most reads during a flush take 5-6 ms. A read hands the GIL
        # over several times (each socket call releases it), so the wait adds up: 20 us
        # (the interval only matters while two threads want the GIL, so an idle or
        # single-threaded shard pays nothing). Raw p99 of reads during a 100k-row flush:
        # ~700 us at 0.5 ms, 460-550 us at 0.1 ms, 340-410 us at 20 us (8 runs, A/B in one
        # hour); 5 us was no better; flush time, counter updates (B5) and journaled writes
        # (J1) unchanged within noise.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.actor_id = ctx.get_actor_id()
        self.restarts = 0
        options = dict(options)
        self._cache_name = options.pop("cache_name", None)
        self._replicated = bool(options.pop("replicas", 0))
        if options.pop("watch_coordinator", False):
            threading.Thread(target=self._watch_coordinator, daemon=True,
                             name="persistroids-watch").start()
        # Clients on this node use the Unix socket; clients on other nodes need TCP, on the
        # address Ray knows this node by (``listen_tcp=False``: this node only).
        tcp_host = ray.util.get_node_ip_address() if options.pop("listen_tcp", True) else None
        self._reconstructed = _was_restarted()
        if self._reconstructed and self._replicated:
            # Ray restarted this process: the coordinator says what it is now (a backup
            # may have been promoted meanwhile, a primary deposed).
            role = self._ask("role_of", index, self.actor_id)
            if role == "retired":
                raise ReplicaDeposedError(f"shard {index}: this replica was replaced while "
                                          "it was down; it does not serve again")
        self.role = role
        self._args = (index, connectors, options, secret, tcp_host)
        if role == "backup":
            self.index = index
            self._backup_dir = os.path.join(options["journal"],
                                            f"shard{index}.backup-{self.actor_id[:12]}")
            self._sock_dir = tempfile.mkdtemp(prefix="persistroids-")
            self._backup: Backup | None = Backup(
                index, self._backup_dir, options.get("fsync", "interval"), secret,
                unix_path=os.path.join(self._sock_dir, f"backup{index}.sock"),
                tcp_host=tcp_host, tls=options.get("tls"))
            self._backup.address["node_id"] = self.node_id
            if self._reconstructed:  # its copy is stale: the primary sends it all again
                self._backup.files.reset()
            return
        self._serve(options)

    def _serve(self, options: dict[str, Any]) -> None:
        index, connectors, _, secret, tcp_host = self._args
        super().__init__(index, connectors, options, secret, tcp_host=tcp_host)
        self._address["node_id"] = self.node_id
        if self._reconstructed:
            self.restarts = self._count_restart()
            log.warning("shard %d: restarted by Ray (restart %d) on node %s", self.index,
                        self.restarts, self.node_id[:12])

    def _watch_coordinator(self, every_s: float = 2.0, misses: int = 3) -> None:
        """A detached replica (see ``Coordinator._add_backup``) ends itself once its cache
        has no coordinator any more (not even one restarting): ``misses`` lookups in a
        row, ``every_s`` apart, so one slow answer does not end it."""
        missed = 0
        while missed < misses:
            time.sleep(every_s)
            try:
                ray.get_actor(coordinator_name(self._cache_name), namespace=NAMESPACE)
                missed = 0
            except ValueError:
                missed += 1
            except Exception:  # the GCS is busy: not an answer either way
                pass
        log.warning("shard %d: the coordinator of cache %r is gone; this %s replica ends",
                    self._args[0], self._cache_name, getattr(self, "role", "?"))
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _ask(self, method: str, *args: Any) -> Any:
        """Call the coordinator of this shard's cache (found by name)."""
        coordinator = ray.get_actor(coordinator_name(self._cache_name), namespace=NAMESPACE)
        return ray.get(getattr(coordinator, method).remote(*args), timeout=60)

    def _before_serving(self) -> None:
        # A restarted checkpointed shard may have missed the commit of a checkpoint it had
        # sealed (the coordinator sends it once): the last one would never be stored.
        if self.core.staged and self._reconstructed and self._cache_name:
            try:
                committed = self._ask("checkpoint_committed")
                with self._lease_cond:
                    self.core.commit(committed)
            except Exception as e:  # the next checkpoint commits it too
                log.warning("shard %d: could not ask for the last checkpoint: %s",
                            self.index, e)
        # A restarted primary takes its backup back before it acknowledges anything: the
        # backup's copy is older than the journal just replayed, so it is sent whole.
        if self._replicated and self._reconstructed:
            address = self._ask("backup_of", self.index)
            if address is not None:
                self.attach_backup(address, self.node_id)

    def _mirror_lost(self, error: BaseException) -> None:
        """The backup stopped answering: the coordinator decides. If it already promoted
        the backup (it took this shard's node for dead), this shard must not acknowledge
        anything more; otherwise it goes on alone until the coordinator gives it a new
        backup. If the coordinator cannot be asked, the shard refuses too (going on alone
        might be going on beside a promoted backup), unless it is gone for good and Ray
        still counts this shard's node alive: a backup is promoted only over a node Ray
        reports dead (never alive again), and with no coordinator none can be promoted from
        now on, so this shard goes on alone: it has no backup and no failover any more,
        but every write is still acknowledged (its backups died with the coordinator
        process that made them)."""
        try:
            alone = self._ask("backup_lost", self.index, self.actor_id)
        except (ValueError, ray.exceptions.ActorDiedError) as e:  # gone, none restarting
            if not self._node_alive():
                raise ReplicaDeposedError(
                    f"shard {self.index}: its backup stopped answering, its coordinator is "
                    "gone and Ray reports this node dead") from e
            log.error("shard %d: its backup stopped answering and the coordinator of cache "
                      "%r is gone for good: going on without a backup (no failover from "
                      "now on)", self.index, self._cache_name)
            alone = True
        except Exception as e:
            raise ReplicaDeposedError(f"shard {self.index}: its backup stopped answering "
                                      f"and the coordinator could not be asked ({e})") from e
        if not alone:
            self._retire_server()
            raise ReplicaDeposedError(f"shard {self.index}: deposed (its backup was "
                                      "promoted); clients move to the new primary")
        super()._mirror_lost(error)

    def _node_alive(self) -> bool:
        """Whether Ray's control store counts this shard's node alive (False if it cannot
        be asked: the safe answer for a shard deciding whether to go on alone)."""
        try:
            return any(n.get("NodeID") == self.node_id and n.get("Alive")
                       for n in ray.nodes())
        except Exception:
            return False

    def _retire_server(self) -> None:
        self.role = "retired"
        self.server.close()

    def promote(self) -> dict[str, Any]:
        """Become the primary: stop mirroring, replay the copy of the journal (writes,
        dead letters, sessions) and serve. Returns the new address."""
        if self.role == "primary":
            return self._address
        if self.role != "backup" or self._backup is None:
            raise ReplicaDeposedError(f"shard {self.index}: a {self.role} replica cannot be "
                                      "promoted")
        self._backup.stop()
        self._backup = None
        self._remove_sock_dir()
        options = {**self._args[2], "journal_path": self._backup_dir}
        self.role = "primary"
        self._serve(options)
        log.warning("shard %d: promoted on node %s (replayed %d write(s) from the backup)",
                    self.index, self.node_id[:12], self.core.c["replayed"])
        return self._address

    def mirror_address(self) -> dict[str, Any]:
        """Where a backup listens for its primary."""
        if self._backup is None:
            raise ReplicaDeposedError(f"shard {self.index}: not a backup ({self.role})")
        return self._backup.address

    def retire(self, remove: bool = False) -> None:
        """Stop serving for good (a backup replaced, or the cache shut down); ``remove``
        deletes a backup's copy of the journal (everything in it is stored)."""
        if self.role == "backup" and self._backup is not None:
            self._backup.stop(remove=remove)
            self._remove_sock_dir()
        elif self.role == "primary":
            self._retire_server()
        self.role = "retired"

    def _remove_sock_dir(self) -> None:
        # The backup's socket folder (a primary's is its ShardHost's, removed by close):
        # without this, every backup retired or promoted left an empty folder in /tmp.
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def address(self) -> dict[str, Any]:
        if self.role != "primary":
            raise ShardUnavailableError(f"shard {self.index}: this replica is a {self.role}")
        return self._address

    def _count_restart(self) -> int:
        if self.journal is None:
            return 1  # restarted at least once; without a journal folder, not counted
        path = os.path.join(self.journal.directory, "restarts")
        try:
            with open(path) as f:
                n = int(f.read().strip() or 0) + 1
        except (OSError, ValueError):
            n = 1
        with open(path, "w") as f:
            f.write(str(n))
        return n

    def metrics(self) -> dict[str, Any]:
        if self.role == "backup" and self._backup is not None:
            m = self._backup.metrics()
        else:
            m = super().metrics()
            m["tcp"] = self._address.get("tcp")
            m["restarts"] = self.restarts
        m["node_id"] = self.node_id
        return m


ShardActor = ray.remote(_ActorShardHost)


def _was_restarted() -> bool:
    """Whether Ray restarted this actor. Ray's own property reads a deprecated attribute and
    warned in every actor's log on every start: the warning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class _Stuck(Exception):
    """A reshard some shards finished handing over and others could not."""


@ray.remote
class Coordinator:
    """Knows the shards of one cache; runs synchronized flushes and serves the handle spec.

    With replicas (``replication`` given), it is also the one place that decides who serves
    a shard: it gives each primary a backup on another node, promotes the backup when the
    primary's node is dead (as Ray reports it), and answers a primary whose backup stopped
    answering whether it may go on alone. Deciding both in one place is what keeps a
    deposed primary and a promoted backup from acknowledging writes side by side. Runs
    threaded (``max_concurrency``), with a monitor thread that does the promoting and the
    re-backing-up without waiting for a client to ask."""

    def __init__(self, spec: dict[str, Any], shards: list[Any],
                 checkpoint_handler: Any = None,
                 making: dict[str, Any] | None = None) -> None:
        self._spec = spec
        self._shards = list(shards)
        self._handler = checkpoint_handler
        # How to start a shard (connectors, options, secret, actor options): for backups
        # (``replicas``) and for the shards a reshard adds.
        self._making = making
        replication = making if making and making.get("replicas") else None
        self._replication = replication
        self._epoch_changed = threading.Condition()
        self._reshard_lock = threading.Lock()
        self._leftover: list[Any] = []  # shards a shrink retired (see ``reshard``)
        n = len(self._shards)
        self._lock = threading.RLock()
        self._primary_nodes: list[str | None] = [a.get("node_id") for a in spec.addresses]
        self._backups: list[Any] = [None] * n
        self._backup_nodes: list[str | None] = [None] * n
        self._retired: set[str] = set()  # actor ids of replicas that must not serve again
        self.failovers = 0
        self._made = 0
        self._stop = threading.Event()
        # Ray restarts a checkpointed cache's coordinator (``making["restartable"]``). With
        # replicas, who serves each shard changes at run time (failovers, new backups): it
        # is kept in a file beside the journals and read back here after a restart, with
        # every actor found again by its name.
        self._names = [f"{coordinator_name(spec.name)}:shard{i}" for i in range(n)]
        self._backup_names: list[str | None] = [None] * n
        self._restartable = bool((making or {}).get("restartable"))
        if self._restartable and replication and _was_restarted():
            self._load_routing()
        # Checkpoints (a checkpointed cache): one at a time; ids grow from the last one.
        self._ckpt_lock = threading.Lock()
        self._ckpt_store: CheckpointStore | None = None
        self._ckpt_next: int | None = None
        self._ckpt_last: dict[str, Any] | None = None
        self.c_taken = self.c_failed = 0
        if (making or {}).get("options", {}).get("staged") and _was_restarted():
            # Restarted: a checkpoint this coordinator was taking when it died holds the
            # shards' writes (paused) until they hear from it: settle them now.
            threading.Thread(target=self.checkpoint_recover, args=(False,), daemon=True,
                             name="persistroids-recover").start()
        every = (making or {}).get("checkpoint_every_s")
        if every:
            threading.Thread(target=self._periodic,
                             args=(every, (making or {}).get("checkpoint_state")),
                             daemon=True, name="persistroids-checkpoints").start()
        if replication:
            threading.Thread(target=self._monitor, daemon=True,
                             name="persistroids-replicas").start()

    # -- replicas -------------------------------------------------------------------------
    @staticmethod
    def _id(actor: Any) -> str:
        return actor._actor_id.hex()

    @staticmethod
    def _alive_nodes() -> list[str]:
        return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))

    def _monitor(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.heal()
            except Exception as e:  # keep watching; the next round tries again
                log.warning("replica monitor: %s: %s", type(e).__name__, e)

    def heal(self) -> dict[str, Any]:
        """Promote the backup of every primary whose node is dead, drop backups whose node
        is dead, and give every primary without a backup a new one on another alive node.
        Returns ``replicas()``."""
        if not self._replication:
            return self.replicas()
        with self._lock:
            alive = set(self._alive_nodes())
            for i in range(len(self._shards)):
                if self._backups[i] is not None and self._backup_nodes[i] not in alive:
                    self._drop_backup(i)
                if self._primary_nodes[i] not in alive and self._backups[i] is not None:
                    self._promote(i)
            for i in range(len(self._shards)):
                if self._backups[i] is None and self._primary_nodes[i] in alive:
                    self._add_backup(i, alive)
        return self.replicas()

    def _drop_backup(self, i: int) -> None:
        backup, self._backups[i], self._backup_nodes[i] = self._backups[i], None, None
        self._backup_names[i] = None
        if backup is not None:
            self._retired.add(self._id(backup))
            self._save_routing()
            try:
                ray.kill(backup, no_restart=True)
            except Exception:
                pass

    def _promote(self, i: int) -> None:
        old, backup = self._shards[i], self._backups[i]
        self._retired.add(self._id(old))
        address = ray.get(backup.promote.remote(), timeout=300)  # it replays its copy
        self._shards[i] = backup
        self._names[i] = self._backup_names[i] or self._names[i]
        self._primary_nodes[i] = self._backup_nodes[i]
        self._backups[i] = self._backup_nodes[i] = self._backup_names[i] = None
        addresses = list(self._spec.addresses)
        addresses[i] = address
        self._spec = self._spec.replace(shards=list(self._shards), addresses=addresses)
        self.failovers += 1
        self._save_routing()
        log.warning("shard %d: its node %s is dead; its backup on %s is the primary now", i,
                    str(old)[:40], self._primary_nodes[i])
        try:
            ray.kill(old, no_restart=True)  # never to come back beside the new primary
        except Exception:
            pass

    def _add_backup(self, i: int, alive: set[str]) -> None:
        """Start a backup of shard ``i`` on the alive node (not the primary's, unless the
        cache is packed on purpose) holding the fewest replicas, and attach it."""
        rep = self._replication
        assert rep is not None
        load = {node: 0 for node in alive}
        for node in [*self._primary_nodes, *self._backup_nodes]:
            if node in load:
                load[node] += 1
        candidates = sorted((n for n in alive if n != self._primary_nodes[i]),
                            key=lambda n: (load[n], n))
        if not candidates:
            if not rep.get("same_node"):
                return  # one node left: no backup until another joins
            candidates = [self._primary_nodes[i]]
        node = candidates[0]
        self._made += 1
        name = f"{coordinator_name(self._spec.name)}:shard{i}:backup{self._made}"
        opts = {**rep["actor_options"], "name": name,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        options = rep["options"]
        if self._restartable:
            # An actor dies with the process that made it, and a restarted coordinator is a
            # new process: detached, a backup (and the primary it may become) outlives this
            # one; it ends itself once no coordinator of its cache exists (the driver of a
            # cache that is not detached ended), so nothing is left behind.
            opts["lifetime"] = "detached"
            options = {**options, "watch_coordinator": True}
        backup = ShardActor.options(**opts).remote(i, rep["connectors"], options,
                                                  rep["secret"], "backup")
        try:
            address = ray.get(backup.mirror_address.remote(), timeout=120)
            ray.get(self._shards[i].attach_backup.remote(address, self._primary_nodes[i]),
                    timeout=120)
        except Exception:
            ray.kill(backup, no_restart=True)
            raise
        self._backups[i], self._backup_nodes[i] = backup, node
        self._backup_names[i] = name
        self._save_routing()

    def _routing_path(self) -> str | None:
        journal = (self._making or {}).get("options", {}).get("journal")
        return os.path.join(journal, "coordinator.routing") if journal else None

    def _save_routing(self) -> None:
        """Write who serves each shard (names, nodes, addresses), the retired replicas and
        the counters to the routing file, atomically. Call with ``_lock`` held."""
        path = self._routing_path()
        if not self._restartable or path is None:
            return
        blob = msgpack.packb({
            "names": self._names, "nodes": self._primary_nodes,
            "backup_names": self._backup_names, "backup_nodes": self._backup_nodes,
            "addresses": [dict(a) for a in self._spec.addresses],
            "retired": sorted(self._retired), "failovers": self.failovers,
            "made": self._made})
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load_routing(self) -> None:
        """After a restart: take back the routing file's view (a predecessor may have
        promoted backups and placed new ones), find every actor by name, and remove any
        backup it started but died before recording (nothing else knows of it)."""
        path = self._routing_path()
        try:
            with open(path or "", "rb") as f:
                state = msgpack.unpackb(f.read())
        except (OSError, ValueError) as e:
            log.warning("coordinator restarted without its routing file (%s): the shards "
                        "it started with serve; their backups are placed again", e)
            state = None
        prefix = f"{coordinator_name(self._spec.name)}:shard"
        if state is not None:
            self._names = list(state["names"])
            self._primary_nodes = list(state["nodes"])
            self._retired = set(state["retired"])
            self.failovers = int(state["failovers"])
            self._made = int(state["made"])
            for i, name in enumerate(self._names):
                try:
                    self._shards[i] = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:  # gone for good: the monitor promotes its backup
                    log.warning("shard %d: its primary %s is gone", i, name)
            for i, name in enumerate(state["backup_names"]):
                try:
                    if name is not None:
                        self._backups[i] = ray.get_actor(name, namespace=NAMESPACE)
                        self._backup_names[i] = name
                        self._backup_nodes[i] = state["backup_nodes"][i]
                except ValueError:
                    pass
            self._spec = self._spec.replace(shards=list(self._shards),
                                            addresses=list(state["addresses"]))
        known = {*self._names, *(n for n in self._backup_names if n)}
        for named in ray.util.list_named_actors(all_namespaces=True):
            name = named["name"] if isinstance(named, dict) else named
            if not name.startswith(prefix) or ":backup" not in name:
                continue
            try:
                self._made = max(self._made, int(name.rsplit(":backup", 1)[1]))
            except ValueError:
                continue
            if name not in known:
                try:
                    stray = ray.get_actor(name, namespace=NAMESPACE)
                    self._retired.add(self._id(stray))
                    ray.kill(stray, no_restart=True)
                except ValueError:
                    pass
        log.warning("coordinator restarted: shards served by %s, backups %s, %d failover(s)",
                    self._names, self._backup_names, self.failovers)

    def route(self, i: int) -> Any:
        """The actor serving shard ``i`` now (promoting its backup first if the primary's
        node is dead): a client that lost its connection asks here."""
        if self._replication:
            with self._lock:
                if self._backups[i] is not None and \
                        self._primary_nodes[i] not in set(self._alive_nodes()):
                    self._promote(i)
        return self._shards[i]

    def role_of(self, i: int, actor_id: str) -> str:
        """What a replica restarted by Ray is now: "primary", "backup" or "retired"."""
        if actor_id in self._retired:
            return "retired"
        if self._id(self._shards[i]) == actor_id:
            return "primary"
        backup = self._backups[i]
        return "backup" if backup is not None and self._id(backup) == actor_id else "retired"

    def backup_of(self, i: int) -> dict[str, Any] | None:
        """Where shard ``i``'s backup listens (for a primary Ray restarted), or None."""
        backup = self._backups[i]
        if backup is None:
            return None
        try:
            return ray.get(backup.mirror_address.remote(), timeout=30)
        except Exception:
            return None

    def backup_lost(self, i: int, actor_id: str) -> bool:
        """A primary's backup stopped answering. True: go on alone (a new backup follows);
        False: the asker is not the primary any more (deposed) and must stop."""
        with self._lock:
            if self._id(self._shards[i]) != actor_id:
                return False
            self._drop_backup(i)
            return True

    def replicas(self, detail: bool = False) -> list[dict[str, Any]]:
        """Per shard: the primary's node, the backup's node (None: none now), and with
        ``detail`` each one's actor id and process id (None if it does not answer)."""
        out = [{"shard": i, "primary_node": self._primary_nodes[i],
                "backup_node": self._backup_nodes[i], "failovers": self.failovers}
               for i in range(len(self._shards))]
        if detail:
            for r, primary, backup in zip(out, self._shards, self._backups, strict=True):
                for role, actor in (("primary", primary), ("backup", backup)):
                    r[f"{role}_id"] = self._id(actor) if actor is not None else None
                    try:
                        r[f"{role}_pid"] = ray.get(actor.metrics.remote(), timeout=10)["pid"]
                    except Exception:
                        r[f"{role}_pid"] = None
        return out

    def spec(self) -> dict[str, Any]:
        return self._spec

    def epoch(self) -> int:
        """The epoch of the current slot table."""
        return self._spec.epoch

    def spec_at(self, min_epoch: int, timeout_s: float = 300.0) -> Any:
        """The spec once its slot table's epoch is ``min_epoch`` or later: a client whose
        request a shard refused as moved waits here while the reshard finishes."""
        deadline = time.monotonic() + timeout_s
        with self._epoch_changed:
            while self._spec.epoch < min_epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no slot table of epoch {min_epoch} after "
                                       f"{timeout_s:g} s (now {self._spec.epoch})")
                self._epoch_changed.wait(left)
            return self._spec

    # -- resharding -------------------------------------------------------------------------
    def reshard(self, num_shards: int) -> dict[str, Any]:
        """Move slot ranges so that ``num_shards`` shards serve the cache (see
        ``Cache.reshard``): start the shards a grow adds (owning nothing yet), hand every
        moving slot with its pending state from its old owner to its new one
        (``_hand_over``), publish the new table (clients waiting in ``spec_at`` get it),
        then retire the shards a shrink leaves without slots. If a shard cannot hand its
        slots over before any old owner finished, the handoff is cancelled, the new shards
        go, and this raises: the cache stays as it was."""
        from .pool import slot_table  # the client's table: one definition

        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        with self._reshard_lock:
            old_n = len(self._shards)
            if num_shards == old_n:
                return {"epoch": self._spec.epoch, "num_shards": old_n, "moved_slots": 0}
            making = self._making
            if making is not None and making["options"].get("staged"):
                raise ValueError("resharding a checkpointed cache is not supported yet (the "
                                 "handoff moves pending writes, not sealed epochs)")
            if making is None or not making["options"].get("journal"):
                raise ValueError("resharding needs the journal (a restarted shard learns "
                                 "from it which slots it owns)")
            local = [c.get_id() for c in making["connectors"]
                     if getattr(c, "process_local", False)]
            if local:
                raise ValueError(
                    f"resharding hands slots over through the stores, and {local} keep(s) "
                    "what each shard flushed in that shard's own process (no other shard "
                    "can read it): use a shared store (SQLite, PostgreSQL, Redis, files)")
            epoch = self._spec.epoch + 1
            old, new = slot_table(old_n), slot_table(num_shards)
            load: dict[str, int] = {}
            for node in [*self._primary_nodes, *self._backup_nodes]:
                if node is not None:
                    load[node] = load.get(node, 0) + 1
            added = [self._start_shard(i, epoch, load) for i in range(old_n, num_shards)]
            try:
                addresses = ray.get([a.address.remote() for a in added], timeout=120)
            except BaseException:
                for a in added:
                    ray.kill(a, no_restart=True)
                raise
            if added:
                # The new shards join the lists now (owning nothing, and not in the spec yet),
                # so that with replicas they are backed up before they own a slot.
                with self._lock:
                    self._shards = self._shards + added
                    self._primary_nodes = self._primary_nodes[:old_n] + [
                        a.get("node_id") for a in addresses]
                    self._backups = self._backups + [None] * len(added)
                    self._backup_nodes = self._backup_nodes + [None] * len(added)
                    self._backup_names = self._backup_names + [None] * len(added)
                    self._names = self._names[:old_n] + [
                        self._new_shard_name(i, epoch) for i in range(old_n, num_shards)]
                if self._replication:
                    self.heal()
            losing = {i: [s for s in range(len(old)) if old[s] == i and new[s] != i]
                      for i in range(old_n)}
            gaining = {i: [s for s in range(len(new)) if new[s] == i and old[s] != i]
                       for i in range(num_shards)}
            try:
                handed = self._hand_over(losing, gaining, new, epoch)
            except _Stuck as e:
                # Nothing is lost (every step was journaled) but the table cannot say where
                # the slots are; the shards stay as they are, refusing the moved slots.
                log.error("reshard epoch %d is stuck: %s", epoch, e)
                raise RuntimeError(f"reshard to {num_shards} shards is stuck half-way: "
                                   f"{e}") from e
            except Exception as e:
                with self._lock:
                    dropped = self._backups[old_n:]
                    self._shards = self._shards[:old_n]
                    self._primary_nodes = self._primary_nodes[:old_n]
                    self._backups = self._backups[:old_n]
                    self._backup_nodes = self._backup_nodes[:old_n]
                    self._backup_names = self._backup_names[:old_n]
                    self._names = self._names[:old_n]
                for a in [*added, *(b for b in dropped if b is not None)]:
                    ray.kill(a, no_restart=True)
                # The same table under the new epoch: clients refused as moved meanwhile
                # (waiting in spec_at for this epoch) go on with it.
                with self._epoch_changed:
                    self._spec = self._spec.replace(epoch=epoch)
                    self._epoch_changed.notify_all()
                raise RuntimeError(f"reshard aborted, nothing moved: {e}") from e
            shards = self._shards[:num_shards]
            with self._lock:
                retired = self._shards[num_shards:]
                retired_backups = [b for b in self._backups[num_shards:] if b is not None]
                self._shards = shards
                self._backups = self._backups[:num_shards]
                self._backup_nodes = self._backup_nodes[:num_shards]
                self._backup_names = self._backup_names[:num_shards]
                self._names = self._names[:num_shards]
                self._primary_nodes = self._primary_nodes[:num_shards]
                spec_addresses = (list(self._spec.addresses) + addresses)[:num_shards]
            with self._epoch_changed:
                self._spec = self._spec.replace(num_shards=num_shards, shards=list(shards),
                                                addresses=spec_addresses, epoch=epoch)
                self._epoch_changed.notify_all()
            # Retired shards own nothing now (everything they had is stored) and stay up
            # until shutdown, refusing every key as moved: a process that has not heard of
            # this reshard yet learns of it from them, instead of meeting a dead shard.
            self._leftover.extend(retired)
            for actor in retired:
                try:
                    ray.get(actor.detach_backup.remote(), timeout=60)
                except Exception:
                    pass
            for b in retired_backups:
                try:
                    ray.get(b.retire.remote(True), timeout=30)
                except Exception:
                    pass
                ray.kill(b, no_restart=True)
            if self._replication:
                self.heal()
            moved = sum(len(v) for v in losing.values())
            log.warning("resharded %d -> %d shards (epoch %d): %d slots moved, %d keys with "
                        "pending state handed over", old_n, num_shards, epoch, moved, handed)
            return {"epoch": epoch, "num_shards": num_shards, "moved_slots": moved,
                    "handed_keys": handed}

    def _hand_over(self, losing: dict[int, list[int]], gaining: dict[int, list[int]],
                   table: list[int], epoch: int, deadline_s: float = 300.0) -> int:
        """Move slots, with everything pending on them, from the shards ``losing`` them to
        the ones ``gaining`` them (``table``: the new slot table). Each step is journaled
        where it lands before the next one undoes it elsewhere, so a shard process killed
        at any point loses nothing:

        1. every source exports the slots' state and leases (``export_slots``: refused from
           then on, its flushes held, nothing dropped);
        2. every destination journals the part meant for it (``stage_slots``);
        3. every source drops its copy and journals that it gave the slots away
           (``finish_handoff``). A source that restarted meanwhile replayed its journal,
           still owns the slots and refuses this: it is exported and staged again;
        4. every destination adopts what was staged and owns the slots (``own_slots``).

        A failure before 3 cancels it all (sources keep their slots, destinations drop
        what was staged) and raises. Returns how many keys with pending state moved."""
        from .control import _first_line  # the one way errors are shortened for users

        shards = self._shards
        sources = {i: slots for i, slots in losing.items() if slots}

        def export(i: int) -> Any:
            moves = {s: table[s] for s in sources[i]}
            return self._shards[i].export_slots.remote(moves, epoch)

        def stage(i: int, parts: dict[int, tuple[bytes, list[Any]]]) -> None:
            ray.get([shards[j].stage_slots.remote(epoch, i, blob, grants)
                     for j, (blob, grants) in parts.items()], timeout=120)

        handed = 0
        finished: set[int] = set()
        try:
            refs = {i: export(i) for i in sources}
            exported, failed = {}, {}
            for i, ref in refs.items():
                try:
                    exported[i] = ray.get(ref, timeout=600)
                except Exception as e:
                    failed[i] = e
            if failed:
                raise RuntimeError("; ".join(f"shard {i}: {_first_line(e)[:300]}"
                                             for i, e in failed.items()))
            for i, parts in exported.items():
                try:
                    stage(i, parts)
                except Exception as e:
                    raise RuntimeError(f"staging shard {i}'s slots: {_first_line(e)[:300]}"
                                       ) from e
            deadline = time.monotonic() + deadline_s
            for i in sources:
                while True:
                    try:
                        ray.get(self._shards[i].finish_handoff.remote(epoch), timeout=120)
                        break
                    except Exception as e:
                        if time.monotonic() > deadline:
                            raise
                        # Restarted (or promoted) since its export: it replayed its journal
                        # and owns the slots again, with what was pending and any write
                        # acknowledged since. Export that, stage it over the first one.
                        log.warning("reshard epoch %d: shard %d refused to finish its "
                                    "handoff (%s); exporting again", epoch, i,
                                    _first_line(e)[:300])
                        time.sleep(0.5)
                        try:
                            parts = ray.get(export(i), timeout=600)
                            stage(i, parts)
                        except Exception as again:
                            log.warning("reshard epoch %d: shard %d: %s", epoch, i, again)
                finished.add(i)
                handed += sum(len(pickle.loads(blob)) for blob, _ in exported[i].values())
        except Exception:
            if finished:  # they dropped what they handed over: there is no way back
                raise _Stuck(f"shard(s) {sorted(finished)} handed their slots over, shard(s) "
                             f"{sorted(set(sources) - finished)} could not (their state "
                             "is kept in their journals and in the new owners' journals)"
                             ) from None
            for i in sources:
                try:
                    ray.get(self._shards[i].cancel_handoff.remote(epoch), timeout=60)
                except Exception as e:
                    log.error("reshard abort: shard %d could not cancel its handoff: %s "
                              "(it cancels it itself when its freeze runs out)", i, e)
            for j in {j for j, slots in gaining.items() if slots}:
                try:
                    ray.get(shards[j].discard_staged.remote(epoch), timeout=60)
                except Exception as e:
                    log.error("reshard abort: shard %d kept staged state: %s", j, e)
            raise
        deadline = time.monotonic() + deadline_s
        for j, slots in gaining.items():
            if not slots:
                continue
            while True:  # journaled since step 2: a restarted destination still has it
                try:
                    ray.get(self._shards[j].own_slots.remote(slots, epoch), timeout=120)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return handed

    def _new_shard_name(self, i: int, epoch: int) -> str:
        return f"{coordinator_name(self._spec.name)}:shard{i}.e{epoch}"

    def _start_shard(self, i: int, epoch: int, load: dict[str, int]) -> Any:
        """A new shard ``i`` for a reshard: it owns no slot until ``own_slots``, and checks
        every key (a client of an older table may send it keys it never owned). Placed on
        the alive node with the fewest replicas (``load``, counted up here), pinned (as
        ``spread`` does) when there are several."""
        making = self._making
        assert making is not None
        options = {**making["options"], "slots": bytes(NUM_SLOTS), "check_slots": True,
                   "epoch": epoch}
        opts = {**making["actor_options"], "name": self._new_shard_name(i, epoch)}
        alive = self._alive_nodes()
        if len(alive) > 1 and not making.get("same_node"):
            node = min(alive, key=lambda n: (load.get(n, 0), n))
            load[node] = load.get(node, 0) + 1
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        return ShardActor.options(**opts).remote(i, making["connectors"], options,
                                                 making["secret"])

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoints(self) -> CheckpointStore:
        """The checkpoint store (``init(checkpoint_store=...)``; default: a SQLite file in
        the cache's journal folder)."""
        if self._ckpt_store is None:
            making = self._making or {}
            conn = making.get("checkpoint_store")
            if conn is None:
                conn = default_store(making["options"]["journal"])
            self._ckpt_store = CheckpointStore(conn, self._spec.name)
        return self._ckpt_store

    def _staged_check(self) -> None:
        if not (self._making or {}).get("options", {}).get("staged"):
            raise ValueError("this cache is not checkpointed: make it with "
                             "init(..., checkpoints=True)")

    def checkpoint_recover(self, rollback: bool) -> dict[str, Any] | None:
        """Settle every shard with the last complete checkpoint (at start, and for a
        restore): its epoch and older are committed; with ``rollback`` every write after it
        is dropped (the job restores it and replays its input from there), else writes
        of checkpoints that never completed belong to the next one. Returns the last
        checkpoint's manifest, or None (then ``rollback`` drops every write not stored)."""
        self._staged_check()
        with self._ckpt_lock, self._reshard_lock:
            return self._recover(rollback)

    def _recover(self, rollback: bool) -> dict[str, Any] | None:
        last = self._checkpoints().last()
        epoch = last["id"] if last else -1
        ray.get([s.checkpoint_recover.remote(epoch, rollback) for s in self._shards],
                timeout=300)
        self._ckpt_next = epoch + 1
        return last

    def checkpoint(self, state: bytes, timeout_s: float = 300.0) -> dict[str, Any]:
        """Take checkpoint ``_ckpt_next``, a consistent cut across the shards, with the
        msgpack-encoded ``state``; return its manifest once it is complete.

        1. every shard, in parallel, holds new writes (they go after the cut), recalls
           its leases (their owners' writes go in), seals what is pending and journals it;
        2. once all have sealed, writes resume (the pause is reported);
        3. the manifest is written to the checkpoint store: complete from here;
        4. the shards learn it is committed and store it in the background, oldest first.
        A failure before 3 aborts it: every shard gives the sealed writes to the next
        checkpoint, nothing is recorded, and this raises. One checkpoint at a time."""
        self._staged_check()
        started = time.monotonic()
        with self._ckpt_lock, self._reshard_lock:
            if self._ckpt_next is None:
                self._recover(False)
            epoch = self._ckpt_next
            shards = list(self._shards)
            refs = [s.checkpoint_seal.remote(epoch) for s in shards]
            counts: list[Any] = []
            error: BaseException | None = None
            for ref in refs:
                try:
                    counts.append(ray.get(ref, timeout=timeout_s))
                except Exception as e:
                    error = error or e
            if error is None:
                for ref in [s.checkpoint_resume.remote(epoch) for s in shards]:
                    try:
                        ray.get(ref, timeout=60)
                    except Exception as e:  # gone since it sealed: its seal may be lost
                        error = error or e
                pause_s = time.monotonic() - started
            if error is None:  # each seal on the disk before the manifest (power loss)
                for ref in [s.checkpoint_durable.remote(epoch) for s in shards]:
                    try:
                        ray.get(ref, timeout=120)
                    except Exception as e:
                        error = error or e
            if error is None:
                m = manifest(epoch, state, counts, started, pause_s)
                try:
                    self._checkpoints().commit(m)
                except Exception as e:
                    error = e
            if error is not None:
                for s in shards:
                    try:
                        ray.get(s.checkpoint_abort.remote(epoch), timeout=60)
                    except Exception as e:
                        log.error("checkpoint %d abort: a shard could not undo its seal "
                                  "(%s); it does at its next restart", epoch, e)
                self.c_failed += 1
                from .control import _first_line

                raise RuntimeError(f"checkpoint {epoch} failed, nothing recorded: "
                                   f"{_first_line(error)[:500]}") from None
            self._ckpt_next = epoch + 1
            self._ckpt_last = m
            for s in shards:  # complete already: a shard that misses this learns at the next
                s.checkpoint_commit.remote(epoch)
            self.c_taken += 1
        if self._handler is not None:  # the seed's handler, after the commit
            try:
                self._handler(msgpack.unpackb(state))
            except Exception:
                log.exception("checkpoint %d: the checkpoint handler failed", epoch)
        return m

    def checkpoint_committed(self) -> int:
        """The id of the last complete checkpoint (-1: none yet). Takes no checkpoint lock:
        a shard restarting in the middle of a checkpoint asks it."""
        last = self._ckpt_last
        if last is None:
            last = self._checkpoints().last()
        return -1 if last is None else last["id"]

    def checkpoint_metrics(self) -> dict[str, Any]:
        """Checkpoints taken and failed by this coordinator, the last one's figures, and
        whether one is running."""
        self._staged_check()
        last = self._ckpt_last
        return {"taken": self.c_taken, "failed": self.c_failed,
                "running": self._ckpt_lock.locked(),
                "last": None if last is None else {k: last[k] for k in (
                    "id", "time", "keys", "duration_s", "pause_s")}}

    def last_checkpoint(self) -> dict[str, Any] | None:
        self._staged_check()
        return self._checkpoints().last()

    def list_checkpoints(self) -> list[dict[str, Any]]:
        self._staged_check()
        store = self._checkpoints()
        return [m for cid in store.index() if (m := store.manifest(cid)) is not None]

    def _periodic(self, every_s: float, state_fn: Any) -> None:
        """Take a checkpoint every ``every_s`` with ``state_fn()``'s state; skip a round
        while one is in flight (at most one at a time)."""
        while not self._stop.wait(every_s):
            if self._ckpt_lock.locked():
                continue
            try:
                state = encode_state(state_fn() if state_fn is not None else None)
                self.checkpoint(state)
            except Exception as e:
                log.warning("periodic checkpoint failed: %s", e)

    def shards(self) -> list[Any]:
        return self._shards

    def pid(self) -> int:
        """This process's id (fault tests kill it)."""
        return os.getpid()

    def flush_all(self, checkpoint_blob: bytes | None = None) -> Any:
        """Flush every shard in parallel; then run the checkpoint handler if one was given.

        Returns the handler's result when a checkpoint ran, else the number of keys flushed;
        None when nothing was pending (the seed's flush-now contract). A cache made with
        allow_pickle=False refuses a checkpoint state (a pickle), before flushing anything.
        """
        if checkpoint_blob and not self._spec.get("allow_pickle", True):
            raise PicklingRefusedError("this cache was made with allow_pickle=False: a "
                                       "checkpoint state (a pickle) is refused, never unpickled")
        flushed = sum(ray.get([s.flush.remote() for s in self._shards]))
        if flushed == 0:
            return None
        if checkpoint_blob and self._handler is not None:
            return self._handler(_unpickle_checkpoint(checkpoint_blob))
        return flushed

    def metrics(self) -> list[dict[str, Any]]:
        return ray.get([s.metrics.remote() for s in self._shards])

    def _each(self, method: str, *args: Any) -> tuple[list[Any], dict[int, BaseException]]:
        """Call ``method`` on every shard; per shard its result, or its error."""
        refs = [getattr(s, method).remote(*args) for s in self._shards]
        out: list[Any] = [None] * len(refs)
        errors: dict[int, BaseException] = {}
        for i, ref in enumerate(refs):
            try:
                out[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else None
                errors[i] = cause or ShardUnavailableError(str(e).strip().splitlines()[-1])
            except ray.exceptions.RayActorError as e:
                errors[i] = ShardUnavailableError(f"shard {i} is gone: {type(e).__name__}")
            except Exception as e:
                errors[i] = e
        return out, errors

    def shutdown(self, disconnect: bool = False, timeout_s: float | None = None
                 ) -> list[dict[str, Any]]:
        """Flush every shard, then close them all and remove the actors.

        Two phases, so a failure never half-closes the cache: if any shard cannot flush
        (its store is down, or it is dead), nothing is closed and ShutdownError lists every
        failing shard; the others keep serving and flushing.

        With ``timeout_s``, a shard's store that still refuses when it has passed no longer
        stops the shutdown if that shard has a journal: the shard stops, its unwritten keys
        stay in its journal for the next ``init`` of this cache, and its metrics say how many
        (``unwritten``). A shard without a journal, or a dead one, still fails it as above."""
        if timeout_s is None:
            _, errors = self._each("flush")
        else:
            _, errors = self._each("flush_within", timeout_s)
        if errors:
            raise ShutdownError(errors)
        with self._lock:  # no promotion or new backup while the shards close
            out, errors = self._each("close" if timeout_s is None else "finish", disconnect)
            if errors:  # a store failed between the phases: those shards still serve
                raise ShutdownError(errors)
            self._stop.set()
            backups = [b for b in self._backups if b is not None]
            # Everything the backups hold is stored now (or, after a deadline, still in
            # the primaries' journals): their copies go.
            for ref in [b.retire.remote(True) for b in backups]:
                try:
                    ray.get(ref, timeout=30)
                except Exception:
                    pass
            for s in self._leftover:  # own nothing, hold nothing: closed for tidiness
                try:
                    ray.get(s.close.remote(), timeout=60)
                except Exception:
                    pass
            for s in [*self._shards, *backups, *self._leftover]:
                ray.kill(s)
        return out


def wait_ready(refs: list[Any], timeout: float = 120.0) -> list[Any]:
    """Results of ``refs`` in order; TimeoutError if they are not all ready in ``timeout``."""
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(refs)} shard(s) did not start within "
                           f"{timeout:.0f}s")
    return ray.get(refs)
