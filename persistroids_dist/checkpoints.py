"""Checkpoints of a checkpointed cache (``init(..., checkpoints=True)``): what one is, and
where they are recorded.

A checkpoint is a consistent cut across every shard (see ``Coordinator.checkpoint``). It is
complete once its manifest is in the checkpoint store: the manifest names it (an id that
only grows), says when it was taken, what each shard sealed, and carries the caller's
``state`` (anything msgpack encodes: an input offset, say). The store is any connector; the
default is a SQLite file in the cache's journal folder. The manifest and the pointer to the
newest one are written in one ``flush`` call (one transaction for SQL stores), the pointer
last, so a checkpoint whose pointer was not written is not complete.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .connector import BaseConnector, as_connector

__all__ = ["CheckpointInfo", "CheckpointStore", "default_store", "encode_state"]

#: How many manifests ``checkpoints()`` lists (the newest ones).
KEEP = 100


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint: ``id`` (grows by one per checkpoint of a cache), ``time``
    (Unix seconds), the caller's ``state``, ``keys`` sealed in it (writes since the
    previous one, per distinct key), per-shard counts, ``duration_s`` of the whole
    checkpoint and ``pause_s``, the longest time writes to a shard waited for the cut."""

    id: int
    time: float
    state: Any
    keys: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    pause_s: float = 0.0

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> CheckpointInfo:
        return cls(id=m["id"], time=m["time"], state=msgpack.unpackb(m["state"]),
                   keys=m["keys"], shards=list(m["shards"]), duration_s=m["duration_s"],
                   pause_s=m["pause_s"])


def encode_state(state: Any) -> bytes:
    """``state`` as msgpack; TypeError naming what msgpack cannot encode."""
    try:
        return msgpack.packb(state, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"a checkpoint state must be something msgpack encodes (None, bool, "
                        f"int, float, str, bytes, lists and dicts of them): {e}") from None


class CheckpointStore:
    """The manifests of cache ``name`` in ``connector``, under keys ``("checkpoint", name,
    id)``, with ``("checkpoint", name, "index")`` listing the newest ids."""

    def __init__(self, connector: Any, name: str) -> None:
        self.conn: BaseConnector = as_connector(connector)
        self.name = name
        self._connected = False
        # The coordinator is threaded: one call at a time on the connector.
        self._lock = threading.RLock()

    def _connect(self) -> None:
        if not self._connected:
            self.conn.connect()
            self._connected = True

    def _read(self, key: Any) -> Any:
        with self._lock:
            self._connect()
            return self.conn.read(("checkpoint", self.name, key))

    def index(self) -> list[int]:
        ids = self._read("index")
        return list(ids) if ids else []

    def last(self) -> dict[str, Any] | None:
        ids = self.index()
        return self.manifest(ids[-1]) if ids else None

    def manifest(self, cid: int) -> dict[str, Any] | None:
        return self._read(cid)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest`` and make it the newest: complete from here on."""
        with self._lock:
            self._connect()
            ids = [*self.index(), manifest["id"]][-KEEP:]
            payloads = [self.conn.write(("checkpoint", self.name, manifest["id"]), manifest),
                        self.conn.write(("checkpoint", self.name, "index"), ids)]
            self.conn.flush(payloads)

    def close(self) -> None:
        with self._lock:
            if self._connected:
                self.conn.disconnect()
                self._connected = False


def default_store(folder: str) -> BaseConnector:
    """The checkpoint store of a cache made without ``checkpoint_store``: a SQLite file,
    ``checkpoints.sqlite`` in ``folder`` (the cache's journal folder), made if missing.

    ``synchronous=FULL``: a manifest is on the disk when its commit returns. The shards
    store the epoch right after it, so a manifest that a power loss took back while its
    writes had reached the stores would let a restore read those writes from the stores and
    a replay count them twice."""
    import os

    from .connectors.sqlite import SQLiteConnector

    os.makedirs(folder, mode=0o700, exist_ok=True)
    return SQLiteConnector(os.path.join(folder, "checkpoints.sqlite"), synchronous="FULL")


def manifest(cid: int, state: bytes, counts: list[dict[str, Any]], started: float,
             pause_s: float) -> dict[str, Any]:
    return {"id": cid, "time": time.time(), "state": state,
            "keys": sum(c.get("keys", 0) for c in counts),
            "shards": [{"shard": i, **c} for i, c in enumerate(counts)],
            "duration_s": time.monotonic() - started, "pause_s": pause_s}
