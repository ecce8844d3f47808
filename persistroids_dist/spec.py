"""``CacheSpec``: everything a handle needs to reach one cache, shipped with every handle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tls import TLSConfig

__all__ = ["NAMESPACE", "CacheSpec", "coordinator_name"]

#: Ray namespace of every cache's actors, so other drivers can find them by name.
NAMESPACE = "persistroids"


def coordinator_name(name: str) -> str:
    """The Ray actor name of cache ``name``'s coordinator (its shards are named after it)."""
    return f"cache:{name}"


@dataclass(frozen=True)
class CacheSpec:
    """What a ``Cache`` handle carries when it is pickled to a task, an actor or a notebook.

    ``addresses``: per shard, where its socket listens (``{"host", "unix", "tcp"}``).
    ``shards`` and ``coordinator``: Ray actor handles (the control plane; None for a shard
    host run in-process). ``secret`` authenticates every connection and never shows in a
    repr. ``allow_pickle``: whether the shards unpickle ``update`` functions and checkpoint
    states sent to them (else the client refuses them before sending); ``functions``: the
    update functions registered by name at ``init`` (run in-process on a leased key).
    ``tls``: the TLS files' paths (None: plain TCP), for this handle's TCP connections. Paths,
    not the files' contents: the private key stays in its file on each node instead of
    travelling in every pickled handle (through Ray's object store, into task arguments,
    possibly spilled to disk), Python's ``ssl`` loads a certificate chain only from files
    anyway, and the shards need the files on every node in any case (as Ray's own TLS does).
    """

    name: str
    secret: bytes = field(repr=False)
    num_shards: int
    addresses: list[dict[str, Any]]
    shards: list[Any] = field(default_factory=list, repr=False)
    coordinator: Any = field(default=None, repr=False)
    cache_key: Callable[[Any], Any] | None = field(default=None, repr=False)
    detached: bool = False
    shard_wait_s: float = 30.0  # how long a call waits for a restarting shard
    allow_pickle: bool = True
    replicas: int = 0  # backups per shard (0 or 1); with 1, the coordinator routes
    epoch: int = 0  # of the slot table (slot_table(num_shards)); a reshard makes a new one
    functions: dict[str, Callable[[Any], Any]] = field(default_factory=dict, repr=False)
    tls: TLSConfig | None = None
    checkpointed: bool = False  # writes reach the stores only with committed checkpoints

    @classmethod
    def of(cls, spec: CacheSpec | Mapping[str, Any]) -> CacheSpec:
        """``spec`` itself, or a CacheSpec made from a mapping of its fields."""
        if isinstance(spec, CacheSpec):
            return spec
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise TypeError(f"unknown cache spec field(s): {unknown}")
        return cls(**spec)

    def replace(self, **changes: Any) -> CacheSpec:
        return dataclasses.replace(self, **changes)

    # Mapping-style access (``spec["name"]``), kept for code written against the dict.
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)
