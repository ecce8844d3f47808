"""The control plane: every Ray call the library makes outside its actors.

Ray places the shard actors, names them so other drivers find them, restarts them and runs the
coordinator's flushes; the data path (``client``, ``pool``, ``lease``, ``transport``) never
calls Ray. ``api`` builds caches and handles with the functions here.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .actors import Coordinator, ShardActor, wait_ready
from .errors import CacheClosedError, RemoteError, ShardUnavailableError
from .spec import NAMESPACE, CacheSpec, coordinator_name

__all__ = ["NAMESPACE", "ensure_ray", "find_coordinator", "flush_all", "get",
           "resolve_address", "shutdown_cache", "spec_of", "start_cache", "why_gone"]



#: Why a non-detached cache is gone when Ray says its actors' owner died.
_DRIVER_EXITED = ("the driver that created it exited, and a cache lives only as long as the "
                  "driver (or task) that created it unless made with init(..., detached=True)")


#: ``ray.init`` arguments that only size a cluster being started (Ray refuses them on joining).
_START_ONLY = frozenset({"num_cpus", "num_gpus", "resources", "labels", "object_store_memory",
                         "_system_config", "_enable_object_reconstruction", "_node_name"})


def _recorded_cluster(temp_dir: str | None) -> str | None:
    """The address of the running cluster that the last ``ray start`` on this machine
    recorded (the one a plain ``ray.init()`` joins), or None.

    A record whose cluster does not answer (it crashed, or the machine rebooted) counts as
    none, with a warning: a plain ``ray.init()`` would wait for it for minutes.
    """
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # a Ray without it: only RAY_ADDRESS or address= join a cluster
        return None
    recorded = find_bootstrap_address(temp_dir)
    if not recorded:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError):
        warnings.warn(f"the Ray cluster that the last `ray start` on this machine recorded "
                      f"({recorded}) does not answer; starting a local one instead (`ray stop` "
                      "clears the record)", RuntimeWarning, stacklevel=4)
        return None
    return recorded


def _init_options(address: str | None, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The ``ray.init`` arguments for ``ensure_ray``, and how they pick the cluster: "start",
    "address", "RAY_ADDRESS" or "recorded"."""
    env = os.environ.get("RAY_ADDRESS", "")
    start_only = sorted(_START_ONLY.intersection(kwargs))
    if address is not None:
        how = "start" if address == "local" else "address"
    elif env:
        how = "start" if env == "local" else "RAY_ADDRESS"
    elif start_only:
        how = "start"  # sizing a cluster only makes sense for a new one: never join with it
    else:
        how = "recorded" if _recorded_cluster(kwargs.get("_temp_dir")) else "start"
    opts: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if how == "start":
        opts.update(address="local", include_dashboard=False,
                    num_cpus=min(4, os.cpu_count() or 1),
                    _node_ip_address="127.0.0.1")  # keep the local cluster on loopback
    elif start_only:
        chosen = f"address={address!r}" if how == "address" else f"RAY_ADDRESS={env!r}"
        raise ValueError(f"{chosen} joins a running Ray cluster, which takes no "
                         f"{', '.join(start_only)}; pass address='local' to start a private one")
    elif how == "address":
        opts["address"] = address
    # RAY_ADDRESS or the recorded cluster: no address, so Ray finds it as a plain ray.init()
    opts.update(kwargs)
    return opts, how


def ensure_ray(address: str | None = None, **kwargs: Any) -> None:
    """Make sure this process is connected to Ray, following Ray's own convention.

    If Ray is initialized, use it. Otherwise ``address`` picks the cluster: ``"local"`` starts
    a small private one (at most 4 CPUs, no dashboard), any other value is passed to
    ``ray.init`` to join that cluster. Without it, join the cluster in RAY_ADDRESS, else the
    one a ``ray start`` on this machine is running (as a plain ``ray.init()`` does), else
    start a small local one. ``kwargs`` go to ``ray.init``; those that size a new cluster
    (``num_cpus``, ``resources``, ...) make it start one instead of joining a ``ray start``.
    """
    if ray.is_initialized():
        return
    opts, how = _init_options(address, kwargs)
    try:
        ray.init(**opts)
    except ConnectionError as e:
        if how != "recorded":
            raise
        raise ConnectionError(
            f"could not join the Ray cluster that the last `ray start` on this machine "
            f"recorded: {e}. Pass address='local' to start a private cluster instead") from e


def _actor_name(name: str) -> str:
    return coordinator_name(name)


def why_gone(name: str) -> str:
    """Why the cache ``name`` has no live coordinator, from the dead actors Ray still
    remembers; '' if Ray knows of none."""
    try:
        from ray._private.state import actors
        dead = actors(actor_state_name="DEAD").values()
    except Exception:  # a private Ray API: the message just stays shorter without it
        return ""
    target, latest, ctx = _actor_name(name), None, None
    for info in dead:
        cause = info.get("DeathCause")
        c = (cause.actor_died_error_context
             if cause is not None and cause.HasField("actor_died_error_context") else None)
        other_namespace = c is not None and c.ray_namespace not in ("", NAMESPACE)
        if info.get("Name") != target or other_namespace:
            continue
        if latest is None or info.get("EndTime", 0) >= latest.get("EndTime", 0):
            latest, ctx = info, c
    if latest is None:
        return ""
    if ctx is None:
        return "its coordinator died"
    reason = ctx.DESCRIPTOR.fields_by_name["reason"].enum_type.values_by_number[ctx.reason].name
    if reason == "OWNER_DIED" and not latest.get("IsDetached"):
        return _DRIVER_EXITED
    if reason == "RAY_KILL":
        return "it was shut down (or its coordinator was killed)"
    detail = ctx.error_message.strip().splitlines()
    return f"its coordinator died ({reason}{': ' + detail[0] if detail else ''})"


def get(ref: Any) -> Any:
    """``ray.get`` of a coordinator call, raising what the actors raised as its own type:
    a plain FlushError (say), never wrapped in Ray's exceptions or their traceback text."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause: Any = e
        while isinstance(cause, ray.exceptions.RayTaskError):  # a shard's, via the coordinator
            cause = cause.cause
        if isinstance(cause, ray.exceptions.RayActorError):
            error: BaseException = (
                CacheClosedError(f"the cache is gone: {_DRIVER_EXITED}")
                if "owner has died" in str(cause) else
                ShardUnavailableError(f"a shard of the cache is gone: {_first_line(cause)}"))
        elif isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            error = cause
        else:  # not rebuildable here, or a failure of Ray's own: say what it was
            error = RemoteError(_first_line(cause if cause is not None else e))
    except ray.exceptions.RayActorError as e:
        error = CacheClosedError(f"the cache is gone: {_DRIVER_EXITED}" if "owner has died"
                                 in str(e) else f"the cache's coordinator is gone: {e}")
    raise error from None


def _first_line(error: BaseException) -> str:
    """``Type: message`` of ``error``'s first line, without terminal color codes (for a Ray
    task error, the last line of its traceback: the original ``Type: message``)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() or [""]
    if isinstance(error, ray.exceptions.RayTaskError):
        return lines[-1]
    return f"{type(error).__name__}: {lines[0]}"



def find_coordinator(name: str) -> Any | None:
    """The coordinator actor of the running cache ``name``, or None."""
    try:
        return ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def spec_of(coordinator: Any) -> CacheSpec:
    """The spec of the cache that ``coordinator`` runs."""
    return CacheSpec.of(get(coordinator.spec.remote())).replace(coordinator=coordinator)


_PLACEMENTS = ("spread", "pack")


def check_placement(placement: Any) -> None:
    """Raise ValueError naming what is wrong with an ``init(placement=...)``."""
    if placement is None or placement in _PLACEMENTS:
        return
    if isinstance(placement, dict) and len(placement) == 1:
        (kind, value), = placement.items()
        if kind == "labels" and isinstance(value, dict) and value and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return
        if kind == "resources" and isinstance(value, dict) and value and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v > 0 for k, v in value.items()):
            return
    raise ValueError(
        f"placement must be None, 'spread', 'pack', {{'labels': {{str: str}}}} or "
        f"{{'resources': {{name: amount > 0}}}}, got {placement!r}")


def placement_options(placement: Any, num_shards: int) -> list[dict[str, Any]]:
    """Per shard, the Ray actor options that place it as ``placement`` says (see ``init``).

    "spread" deals the shards out over the alive nodes in turn, each pinned to its node.
    Ray's SPREAD strategy is best effort (it put two of three shards on one node of three in
    a test), and so was a soft affinity on simulated nodes. Pinned, a shard restarts on its
    own node, where its journal is; if the node is gone, so is the shard, loudly (calls
    raise), rather than coming back empty elsewhere and serving older stored values."""
    if placement is None or placement == "spread":
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        if placement == "spread" or len(nodes) > 1:
            return [{"scheduling_strategy": NodeAffinitySchedulingStrategy(
                nodes[i % len(nodes)], soft=False)} for i in range(num_shards)]
        placement = "pack"
    if placement == "pack":
        return [{} for _ in range(num_shards)]
    (kind, value), = placement.items()
    if kind == "labels":
        from ray.util.scheduling_strategies import In, NodeLabelSchedulingStrategy
        return [{"scheduling_strategy": NodeLabelSchedulingStrategy(
            hard={k: In(v) for k, v in value.items()})} for _ in range(num_shards)]
    return [{"resources": dict(value)} for _ in range(num_shards)]


def start_cache(name: str, num_shards: int, connectors: list[Any], options: dict[str, Any],
                *, cache_key: Any, checkpoint_handler: Any, detached: bool,
                shard_options: dict[str, Any] | None, shard_wait_s: float = 30.0,
                placement: Any = None, replicas: int = 0,
                checkpoints: dict[str, Any] | None = None) -> CacheSpec:
    """Start the shard actors and the coordinator of a new cache; its spec. With
    ``replicas=1`` the coordinator then gives every shard a backup on another node before
    this returns. ``checkpoints`` (a checkpointed cache): ``store``, ``every_s``, ``state``
    and ``restore`` (see ``init``); the shards are settled with the last checkpoint before
    this returns. On any failure every actor started here is removed again."""
    secret = os.urandom(32)
    # Shards restart after a crash (their journal brings back what they acknowledged),
    # unless the caller's shard_options say otherwise.
    actor_opts: dict[str, Any] = {"num_cpus": 0, "namespace": NAMESPACE, "max_restarts": -1}
    if detached:
        actor_opts["lifetime"] = "detached"
    placed = placement_options(placement, num_shards)
    # The shards find their coordinator by the cache's name (a restarted one asks it what
    # it missed: its backup, the last committed checkpoint).
    options = {**options, "cache_name": name}
    if replicas:
        options["replicas"] = replicas
    shards: list[Any] = []
    coordinator = None
    try:
        for i in range(num_shards):
            opts = {**actor_opts, **placed[i], **(shard_options or {})}
            shards.append(ShardActor.options(name=f"{_actor_name(name)}:shard{i}", **opts)
                          .remote(i, connectors, options, secret))
        addresses = wait_ready([s.address.remote() for s in shards])
        spec = CacheSpec(name=name, secret=secret, num_shards=num_shards, shards=shards,
                         addresses=addresses, cache_key=cache_key, detached=detached,
                         allow_pickle=options.get("allow_pickle", True),
                         shard_wait_s=shard_wait_s, replicas=replicas,
                         tls=options.get("tls"),
                         functions=dict(options.get("functions") or {}),
                         checkpointed=bool(options.get("staged")))
        # The coordinator runs on the caller's node: the driver that runs flushes and
        # checkpoints talks to it most, and it must not share the fate of a shard's node
        # (with replicas it is what promotes the backups). Pinned: a soft affinity let Ray
        # put it on another node of a simulated cluster.
        coord_opts = {"num_cpus": 0, "namespace": NAMESPACE, "name": _actor_name(name),
                      "scheduling_strategy": NodeAffinitySchedulingStrategy(
                          ray.get_runtime_context().get_node_id(), soft=False)}
        if detached:
            coord_opts["lifetime"] = "detached"
        # Threaded: a primary asking about its lost backup, or a client waiting for a
        # reshard's table, must get an answer while the coordinator waits on a shard.
        coord_opts["max_concurrency"] = 16
        if checkpoints is not None:
            # A checkpointed cache's coordinator comes back after a crash (it cannot
            # reshard, so its arguments are still its slot table): the checkpoint store,
            # the shards' journals and, with replicas, its routing file hold the rest.
            # Calls in flight are sent again.
            coord_opts.update(max_restarts=-1, max_task_retries=-1)
        # What it needs to start shards itself (backups, a reshard's new shards).
        making = {"connectors": connectors, "options": options, "secret": secret,
                  "actor_options": {**actor_opts, **(shard_options or {})},
                  "same_node": placement == "pack", "replicas": replicas,
                  "restartable": checkpoints is not None}
        if checkpoints is not None:
            making.update(checkpoint_store=checkpoints.get("store"),
                          checkpoint_every_s=checkpoints.get("every_s"),
                          checkpoint_state=checkpoints.get("state"))
        coordinator = Coordinator.options(**coord_opts).remote(spec, shards, checkpoint_handler,
                                                               making)
        get(coordinator.spec.remote())  # fail here, not later, if it cannot start
        if checkpoints is not None:  # the journals may hold a previous run's epochs
            get(coordinator.checkpoint_recover.remote(bool(checkpoints.get("restore"))))
        if replicas:
            missing = [r["shard"] for r in get(coordinator.heal.remote())
                       if r["backup_node"] is None]
            if missing:
                raise ValueError(
                    f"replicas=1: no backup could be placed for shard(s) {missing}: a backup "
                    f"needs another alive node than its primary's ({len(ray.nodes())} node(s) "
                    "known); pass placement='pack' to keep backups on the same node (they "
                    "then survive a process, not a node)")
    except BaseException as e:
        for actor in [*shards, coordinator]:
            if actor is not None:
                ray.kill(actor)
        if isinstance(e, ray.exceptions.ActorAlreadyExistsError):  # another driver, just now
            raise ValueError(f"a cache named {name!r} is being created by another driver; "
                             f"use connect({name!r}) once it runs") from None
        raise
    return spec.replace(coordinator=coordinator)


_NODE_ID: list[str | None] = []


def local_node_id() -> str | None:
    """This process's Ray node id (None outside Ray), asked once: it is local state, not a
    call to the cluster, but a connection is opened often enough to keep it."""
    if not _NODE_ID:
        node = None
        if ray.is_initialized():
            try:
                node = ray.get_runtime_context().get_node_id()
            except Exception:  # a driver not connected after all: fall back to host names
                node = None
        if node is None:
            return None
        _NODE_ID.append(node)
    return _NODE_ID[0]


def resolve_address(spec: CacheSpec, shard: int) -> dict[str, Any]:
    """Where ``shard`` listens now (Ray may have restarted it with a new socket). While Ray
    restarts it, wait up to ``spec.shard_wait_s``, then raise ShardUnavailableError."""
    deadline = time.monotonic() + spec.shard_wait_s
    delay = 0.02
    if spec.replicas and spec.coordinator is not None:
        return _route(spec, shard, deadline)
    while True:
        try:
            return ray.get(spec.shards[shard].address.remote(),
                           timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:  # restarting: its journal replays
            if time.monotonic() + delay > deadline:
                raise ShardUnavailableError(
                    f"cache {spec.name!r}: shard {shard} did not come back within "
                    f"{spec.shard_wait_s:g} s (Ray is restarting it)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except ray.exceptions.GetTimeoutError:
            raise ShardUnavailableError(
                f"cache {spec.name!r}: shard {shard} did not answer within "
                f"{spec.shard_wait_s:g} s") from None
        except ray.exceptions.RayActorError as e:  # dead for good
            if "owner has died" in str(e):  # only a non-detached cache's actors have one
                why = ("the driver that created the cache exited, and a cache lives only as "
                       "long as the driver (or task) that created it unless made with "
                       "init(..., detached=True)")
            else:
                why = f"{type(e).__name__}; was the cache shut down?"
            raise CacheClosedError(
                f"cache {spec.name!r}: shard {shard} is gone ({why})") from None


def _route(spec: CacheSpec, shard: int, deadline: float) -> dict[str, Any]:
    """``resolve_address`` with replicas: the coordinator says which actor serves ``shard``
    now (it promotes the backup once Ray reports the primary's node dead, which can take
    Ray some seconds), and that actor where it listens. Retried until ``deadline``."""
    delay = 0.05
    last: BaseException | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            actor = ray.get(spec.coordinator.route.remote(shard), timeout=max(0.1, left))
        except ray.exceptions.RayActorError as e:
            raise CacheClosedError(f"cache {spec.name!r}: its coordinator is gone "
                                   f"({_first_line(e)})") from None
        except ray.exceptions.GetTimeoutError as e:
            actor, last = None, e
        if actor is not None:
            try:
                return ray.get(actor.address.remote(), timeout=max(0.1, min(2.0, left)))
            except ray.exceptions.RayTaskError as e:
                if not isinstance(e.cause, ShardUnavailableError):
                    raise
                last = e  # a backup, not promoted yet
            except ray.exceptions.RayError as e:
                # The old primary: dead, unschedulable (its node is gone), restarting or
                # silent. The coordinator promotes its backup once Ray says the node died.
                last = e
        if time.monotonic() + delay > deadline:
            raise ShardUnavailableError(
                f"cache {spec.name!r}: shard {shard} did not come back within "
                f"{spec.shard_wait_s:g} s (last: {_first_line(last)})") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def spec_at(spec: CacheSpec, min_epoch: int) -> CacheSpec:
    """The cache's spec once its slot table is of epoch ``min_epoch`` or later (a reshard
    running now publishes it when its slots have moved)."""
    fresh = CacheSpec.of(get(spec.coordinator.spec_at.remote(min_epoch)))
    return fresh.replace(coordinator=spec.coordinator)


def reshard(spec: CacheSpec, num_shards: int) -> dict[str, Any]:
    """Run the coordinator's reshard to ``num_shards`` shards (see ``Coordinator.reshard``)."""
    return get(spec.coordinator.reshard.remote(num_shards))


def flush_all(spec: CacheSpec, checkpoint_blob: bytes | None) -> Any:
    """Run the coordinator's synchronized flush (and checkpoint)."""
    return get(spec.coordinator.flush_all.remote(checkpoint_blob))


def checkpoint(spec: CacheSpec, state: bytes) -> dict[str, Any]:
    """Take a checkpoint through the coordinator (see ``Coordinator.checkpoint``)."""
    return get(spec.coordinator.checkpoint.remote(state))


def checkpoint_call(spec: CacheSpec, method: str, *args: Any) -> Any:
    """Call the coordinator's checkpoint ``method`` (last, list, recover)."""
    return get(getattr(spec.coordinator, method).remote(*args))


def shutdown_cache(spec: CacheSpec, disconnect: bool, timeout_s: float | None = None
                   ) -> list[dict[str, Any]]:
    """Flush and close every shard, then remove the coordinator; the shards' last metrics
    (``timeout_s``: see ``Coordinator.shutdown``)."""
    shards = get(spec.coordinator.shutdown.remote(disconnect, timeout_s))
    ray.kill(spec.coordinator)
    _wait_names_released(spec.name)
    return shards


def _wait_names_released(name: str, timeout: float = 30.0) -> None:
    """Wait until Ray has released the actor names of cache ``name`` (its coordinator,
    shards and backups). ``ray.kill`` returns before the names are free, and an ``init``
    of the same name right after a shutdown (a notebook cell run again) must not find the
    dying coordinator and refuse as "already running". Gives up quietly after ``timeout``."""
    own = coordinator_name(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if isinstance(a, dict) and a.get("namespace") == NAMESPACE
                and (a["name"] == own or a["name"].startswith(own + ":"))]
        if not left:
            return
        time.sleep(0.02)
