"""``init`` and ``connect``: create a cache on Ray, or attach to a running one by name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray

from .actors import Coordinator, ShardActor, wait_ready
from .client import NAMESPACE, Cache
from .connector import Connector

__all__ = ["connect", "ensure_ray", "init"]


def ensure_ray(**kwargs: Any) -> None:
    """Join the Ray cluster in RAY_ADDRESS, or start a small local one (no dashboard)."""
    if ray.is_initialized():
        return
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                            "configure_logging": False}
    if not os.environ.get("RAY_ADDRESS") and "address" not in kwargs:
        opts["num_cpus"] = min(4, os.cpu_count() or 1)
        opts["_node_ip_address"] = "127.0.0.1"  # keep the local cluster on loopback
    opts.update(kwargs)
    ray.init(**opts)


def _actor_name(name: str) -> str:
    return f"cache:{name}"


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
    detached: bool = False,
    shard_options: dict[str, Any] | None = None,
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
    ``name``: lets other drivers ``connect(name)``; ``detached`` keeps the cache alive after
    this driver exits. ``shard_options``: extra Ray actor options for the shards.
    Starts a local Ray (or joins RAY_ADDRESS) if Ray is not initialized.
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

    ensure_ray()
    name = name or f"anon-{uuid.uuid4().hex[:12]}"
    try:
        ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise ValueError(f"a cache named {name!r} is already running; use connect({name!r})")

    secret = os.urandom(32)
    options = dict(init_fn=init_fn, merge_query_fn=merge_query_fn,
                   writes_threshold=writes_threshold, millis_threshold=millis_threshold,
                   max_entries=max_entries, max_bytes=max_bytes,
                   checkpoint_handler=checkpoint_handler)
    actor_opts: dict[str, Any] = {"num_cpus": 0, "namespace": NAMESPACE}
    if detached:
        actor_opts["lifetime"] = "detached"
    actor_opts.update(shard_options or {})
    shards = [
        ShardActor.options(name=f"{_actor_name(name)}:shard{i}", **actor_opts)
        .remote(i, connectors, options, secret)
        for i in range(num_shards)
    ]
    try:
        addresses = wait_ready([s.address.remote() for s in shards])
    except Exception:
        for s in shards:
            ray.kill(s)
        raise
    spec: dict[str, Any] = {
        "name": name, "secret": secret, "num_shards": num_shards, "shards": shards,
        "addresses": addresses, "cache_key": cache_key,
    }
    coord_opts = {"num_cpus": 0, "namespace": NAMESPACE, "name": _actor_name(name)}
    if detached:
        coord_opts["lifetime"] = "detached"
    coordinator = Coordinator.options(**coord_opts).remote(spec, shards, checkpoint_handler)
    spec["coordinator"] = coordinator
    ray.get(coordinator.spec.remote())  # fail here, not later, if it cannot start
    return Cache(spec)


def connect(name: str) -> Cache:
    """Return a handle on the running cache ``name`` (from any driver, task or notebook)."""
    ensure_ray()
    try:
        coordinator = ray.get_actor(_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"no running cache named {name!r}") from None
    spec = dict(ray.get(coordinator.spec.remote()))
    spec["coordinator"] = coordinator
    return Cache(spec)
