"""``init`` and ``connect``: create a cache on Ray, or attach to a running one by name."""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ray

from .actors import Coordinator, ShardActor, wait_ready
from .client import _DRIVER_EXITED, NAMESPACE, Cache, _get
from .connector import Connector
from .errors import CacheNotFoundError

__all__ = ["connect", "ensure_ray", "init"]

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
    return f"cache:{name}"


def _why_gone(name: str) -> str:
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


def _check_connector(conn: Any, i: int) -> None:
    for method in ("get_id", "read", "write", "flush"):
        if not callable(getattr(conn, method, None)):
            raise TypeError(f"connectors[{i}] ({type(conn).__qualname__}) has no {method}() "
                            "method; see persistroids_dist.Connector")


def _check_fn(name: str, fn: Any) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, got {type(fn).__qualname__}")


def init(
    connectors: Sequence[Connector] | None = None,
    *,
    init_fn: Callable[[Any], Any] | None = None,
    merge_query_fn: Callable[..., Any] | None = None,
    cache_key: Callable[[Any], Any] | None = None,
    writes_threshold: int = 99,
    millis_threshold: float = 1000,
    checkpoint_handler: Callable[[Any], Any] | None = None,
    num_shards: int = 4,
    name: str | None = None,
    max_entries: int = 1_000_000,
    max_bytes: int | None = None,
    ttl_s: float | None = None,
    detached: bool = False,
    shard_options: dict[str, Any] | None = None,
    get_if_exists: bool = False,
    address: str | None = None,
) -> Cache:
    """Start a cache of ``num_shards`` shard actors and return its handle.

    ``connectors``: stores behind the cache, in read order (default: one in-memory store).
    ``init_fn(args)``: value for a key no store has (cached, never persisted).
    ``merge_query_fn(*values)``: combines the stores' reads (default: shallow dict merge).
    ``cache_key(args)``: the cache key of read/write args (default: the args themselves).
    ``writes_threshold`` / ``millis_threshold``: a shard flushes when more keys than this are
    pending, or when its oldest pending write is this many ms old.
    ``checkpoint_handler(state)``: runs after a flush made by a call that passed
    ``checkpoint=state``, in step with the data.
    ``max_entries`` / ``max_bytes``: LRU bounds of each shard's partition.
    ``ttl_s``: how long an entry stays in the cache after it was written or read from a
    store (None: until evicted); an expired entry is read from the stores again. A store
    that expires keys itself (``RedisConnector(ttl_s=...)``) makes this at most its own.
    ``name``: lets other drivers ``connect(name)``; ``detached`` keeps the cache alive after
    the driver that created it exits (else it ends with that driver).
    ``get_if_exists``: with ``name``, return the running cache of that name if there is one
    (the other arguments are then ignored), so re-running a notebook cell is harmless;
    without it, an existing name raises ValueError.
    ``shard_options``: extra Ray actor options for the shards.
    ``address``: the Ray cluster to use if Ray is not initialized (see ``ensure_ray``):
    by default RAY_ADDRESS, else the running ``ray start`` cluster, else a small local one;
    ``"local"`` always starts a private one.
    """
    if connectors is None:
        from connectors.memory import MemoryConnector
        connectors = [MemoryConnector()]
    connectors = list(connectors)
    for i, conn in enumerate(connectors):
        _check_connector(conn, i)
    ids = [c.get_id() for c in connectors]
    if len(set(ids)) != len(ids):
        raise ValueError(f"connector ids must be unique, got {ids}")
    for fname, fn in (("init_fn", init_fn), ("merge_query_fn", merge_query_fn),
                      ("cache_key", cache_key), ("checkpoint_handler", checkpoint_handler)):
        _check_fn(fname, fn)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not isinstance(writes_threshold, int) or writes_threshold < 0:
        raise ValueError(f"writes_threshold must be an int >= 0, got {writes_threshold!r}")
    if not isinstance(millis_threshold, (int, float)) or millis_threshold <= 0:
        raise ValueError(f"millis_threshold must be > 0, got {millis_threshold!r}")
    if not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if name is not None and (not isinstance(name, str) or not name or ":" in name):
        raise ValueError(f"name must be a non-empty string without ':', got {name!r}")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float))
                              or not ttl_s > 0):
        raise ValueError(f"ttl_s must be a number of seconds > 0 or None, got {ttl_s!r}")
    if get_if_exists and name is None:
        raise ValueError("get_if_exists=True needs a name: only a named cache can be found")

    ensure_ray(address)
    name = name or f"anon-{uuid.uuid4().hex[:12]}"
    try:
        running = ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        if get_if_exists:
            return _handle(running)
        raise ValueError(f"a cache named {name!r} is already running; use connect({name!r}) "
                         "or init(..., get_if_exists=True)")

    secret = os.urandom(32)
    options = dict(init_fn=init_fn, merge_query_fn=merge_query_fn,
                   writes_threshold=writes_threshold, millis_threshold=millis_threshold,
                   max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s,
                   checkpoint_handler=checkpoint_handler)
    actor_opts: dict[str, Any] = {"num_cpus": 0, "namespace": NAMESPACE}
    if detached:
        actor_opts["lifetime"] = "detached"
    actor_opts.update(shard_options or {})
    shards: list[Any] = []
    coordinator = None
    try:
        for i in range(num_shards):
            shards.append(ShardActor.options(name=f"{_actor_name(name)}:shard{i}", **actor_opts)
                          .remote(i, connectors, options, secret))
        addresses = wait_ready([s.address.remote() for s in shards])
        spec: dict[str, Any] = {
            "name": name, "secret": secret, "num_shards": num_shards, "shards": shards,
            "addresses": addresses, "cache_key": cache_key, "detached": detached,
        }
        coord_opts = {"num_cpus": 0, "namespace": NAMESPACE, "name": _actor_name(name)}
        if detached:
            coord_opts["lifetime"] = "detached"
        coordinator = Coordinator.options(**coord_opts).remote(spec, shards, checkpoint_handler)
        spec["coordinator"] = coordinator
        _get(coordinator.spec.remote())  # fail here, not later, if it cannot start
    except BaseException as e:
        for actor in [*shards, coordinator]:
            if actor is not None:
                ray.kill(actor)
        if isinstance(e, ray.exceptions.ActorAlreadyExistsError):  # another driver, just now
            raise ValueError(f"a cache named {name!r} is being created by another driver; "
                             f"use connect({name!r}) once it runs") from None
        raise
    return Cache(spec)


def _handle(coordinator: Any) -> Cache:
    spec = dict(_get(coordinator.spec.remote()))
    spec["coordinator"] = coordinator
    return Cache(spec)


def connect(name: str, *, address: str | None = None) -> Cache:
    """Return a handle on the running cache ``name`` (from any driver, task or notebook).

    Raises CacheNotFoundError (a LookupError) if no cache of that name runs; ``address`` is
    as for ``init``."""
    ensure_ray(address)
    try:
        coordinator = ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        why = _why_gone(name)
        raise CacheNotFoundError(f"no running cache named {name!r}"
                                 + (f": {why}" if why else "")) from None
    return _handle(coordinator)
