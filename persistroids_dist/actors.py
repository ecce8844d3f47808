"""Thin Ray actors: a shard (a ShardHost) and the coordinator.

Ray is the control plane here: it places the actors, restarts them, and finds them by name.
Reads and writes go over the shard's socket (see ``transport``), not through these methods.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import ray

from .errors import PicklingRefusedError, ShardUnavailableError, ShutdownError
from .host import ShardHost, _unpickle_checkpoint

__all__ = ["Coordinator", "ShardActor", "wait_ready"]

log = logging.getLogger("persistroids_dist.actors")

_SWITCH_INTERVAL_S = 0.0005  # see _ActorShardHost.__init__


class _ActorShardHost(ShardHost):
    """A ShardHost that knows it runs in a Ray actor: its node, and how often Ray restarted
    it (counted in its journal folder, which survives the restarts)."""

    def __init__(self, index: int, connectors: list[Any], options: dict[str, Any],
                 secret: bytes) -> None:
        # This process is the shard's alone. While its store thread runs Python (a flush
        # formats ~100k rows for the store), a socket thread that wants the GIL back to
        # answer a read waits up to the switch interval for it, at each hand-off: 5 ms by
        # default, which made most reads during a flush take 5-6 ms. 0.5 ms bounds that
        # wait at a tenth, for more frequent thread switches while a flush runs.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.restarts = 0
        options = dict(options)
        # Clients on this node use the Unix socket; clients on other nodes need TCP, on the
        # address Ray knows this node by (``listen_tcp=False``: this node only).
        tcp_host = ray.util.get_node_ip_address() if options.pop("listen_tcp", True) else None
        super().__init__(index, connectors, options, secret, tcp_host=tcp_host)
        self._address["node_id"] = self.node_id
        if ctx.was_current_actor_reconstructed:
            self.restarts = self._count_restart()
            log.warning("shard %d: restarted by Ray (restart %d) on node %s", self.index,
                        self.restarts, self.node_id[:12])

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
        m = super().metrics()
        m["node_id"] = self.node_id
        m["restarts"] = self.restarts
        m["tcp"] = self._address.get("tcp")
        return m


ShardActor = ray.remote(_ActorShardHost)


@ray.remote
class Coordinator:
    """Knows the shards of one cache; runs synchronized flushes and serves the handle spec."""

    def __init__(self, spec: dict[str, Any], shards: list[Any],
                 checkpoint_handler: Any = None) -> None:
        self._spec = spec
        self._shards = shards
        self._handler = checkpoint_handler

    def spec(self) -> dict[str, Any]:
        return self._spec

    def shards(self) -> list[Any]:
        return self._shards

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
        out, errors = self._each("close" if timeout_s is None else "finish", disconnect)
        if errors:  # a store failed between the phases: those shards still serve
            raise ShutdownError(errors)
        for s in self._shards:
            ray.kill(s)
        return out


def wait_ready(refs: list[Any], timeout: float = 120.0) -> list[Any]:
    """Results of ``refs`` in order; TimeoutError if they are not all ready in ``timeout``."""
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(refs)} shard(s) did not start within "
                           f"{timeout:.0f}s")
    return ray.get(refs)
