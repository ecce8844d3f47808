"""Exceptions raised by persistroids_dist.

Every error is a ``PersistroidsError`` and, where one fits, also the built-in exception people
already catch: a lost shard is a ``ConnectionError``, a missing cache a ``LookupError``, garbage
from a store a ``ValueError``. Errors raised inside a shard reach the caller as these types
(never wrapped in Ray's exceptions).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackpressureError",
    "CacheClosedError",
    "CacheNotFoundError",
    "FlushError",
    "LeaseLostError",
    "MovedError",
    "PersistroidsError",
    "PicklingRefusedError",
    "RemoteError",
    "ShardUnavailableError",
    "ShutdownError",
    "StoreDataError",
    "StoreUnavailableError",
    "UnacknowledgedWritesError",
    "WriteError",
]


class PersistroidsError(Exception):
    """Base class of this library's errors."""


class FlushError(PersistroidsError):
    """One or more connectors failed to flush; their payloads stay buffered for a retry."""

    def __init__(self, shard: int, errors: dict[str, BaseException]) -> None:
        self.shard = shard
        self.errors = errors
        detail = "; ".join(f"{cid}: {type(e).__name__}: {e}" for cid, e in errors.items())
        super().__init__(f"shard {shard}: flush failed for {detail} (payloads kept buffered)")

    def __reduce__(self):  # pickles across processes with its fields
        return (type(self), (self.shard, self.errors))


class WriteError(PersistroidsError):
    """Some writes of a batch were refused by a connector; the others were applied."""

    def __init__(self, shard: int, applied: int, errors: list[tuple[int, BaseException]]) -> None:
        self.shard = shard
        self.applied = applied
        self.errors = errors
        i, first = errors[0]
        super().__init__(f"shard {shard}: {len(errors)} write(s) refused, {applied} applied; "
                         f"first (item {i}): {type(first).__name__}: {first}")

    def __reduce__(self):
        return (type(self), (self.shard, self.applied, self.errors))

    @property
    def first(self) -> BaseException:
        """The first refusal (its own exception type)."""
        return self.errors[0][1]


class RemoteError(PersistroidsError):
    """An exception raised inside a shard that could not be re-raised as its own type."""


class AuthenticationError(PersistroidsError, PermissionError):
    """A peer did not prove the cache's secret."""


class PicklingRefusedError(PersistroidsError, PermissionError):
    """The cache was made with ``init(..., allow_pickle=False)``: a pickled ``update``
    function or checkpoint state is refused, never unpickled (the client refuses it before
    sending; a shard refuses one sent anyway). Register update functions by name with
    ``init(..., functions={name: fn})`` and call ``update(args, name)``."""


class LeaseLostError(PersistroidsError):
    """An exclusive lease expired (its owner stopped renewing) before its writes came back."""


class MovedError(PersistroidsError):
    """A shard refused a request for a key of a slot it does not own (the cache was
    resharded and the client routed by an older table): nothing of the request was
    applied. ``shard`` refused at ``epoch`` (its table's); ``slot`` is the key's. The
    client refreshes its table and sends the request where it belongs."""

    def __init__(self, shard: int, epoch: int, slot: int) -> None:
        self.shard = shard
        self.epoch = epoch
        self.slot = slot
        super().__init__(f"shard {shard} does not own slot {slot} (epoch {epoch}): the "
                         "cache was resharded; refresh the slot table")

    def __reduce__(self):
        return (type(self), (self.shard, self.epoch, self.slot))


class CacheClosedError(PersistroidsError, RuntimeError):
    """The cache was shut down (or its coordinator is gone)."""


class CacheNotFoundError(PersistroidsError, LookupError):
    """No running cache has that name."""


class ShardUnavailableError(PersistroidsError, ConnectionError):
    """A shard could not be reached (it died, is restarting, or the cache is gone)."""


class UnacknowledgedWritesError(ShardUnavailableError):
    """A shard was lost before it acknowledged some writes this process sent it.

    ``shard`` is its index and ``count`` how many writes are unaccounted for: each may or may
    not have been applied. Nothing else this process sent is affected.
    """

    def __init__(self, shard: int, count: int, detail: str = "") -> None:
        self.shard = shard
        self.count = count
        self.detail = detail
        super().__init__(f"shard {shard} was lost before acknowledging {count} write(s); "
                         f"they may not have been applied{': ' + detail if detail else ''}")

    def __reduce__(self):
        return (type(self), (self.shard, self.count, self.detail))


class StoreUnavailableError(PersistroidsError, ConnectionError):
    """A store could not be read or written in time; cached keys keep working."""


class StoreDataError(PersistroidsError, ValueError):
    """A connector returned data the cache cannot use (undecodable bytes, a wrong type, a
    result list of the wrong length). Nothing of it was cached."""


class ShutdownError(FlushError):
    """``shutdown()`` could not flush every shard, so it closed none of them: every shard
    that is alive keeps serving and flushing, and nothing buffered is lost. ``failures``
    maps each failing shard's index to its error; call ``shutdown()`` again once they are
    back (a dead shard's buffered writes are gone with it). A FlushError: ``shard`` is the
    first failing shard, ``errors`` the failing connectors of every shard."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        self.failures = failures
        self.shard = min(failures)
        self.errors = {}
        for i, e in sorted(failures.items()):
            for cid, err in (e.errors.items() if isinstance(e, FlushError)
                             else [(f"shard {i}", e)]):
                self.errors.setdefault(cid, err)
        detail = "; ".join(f"shard {i}: {type(e).__name__}: {e}"
                           for i, e in sorted(failures.items()))
        PersistroidsError.__init__(
            self, f"shutdown failed for {len(failures)} shard(s), nothing was closed: {detail}")

    def __reduce__(self):
        return (type(self), (self.failures,))


class BackpressureError(PersistroidsError, TimeoutError):
    """A shard's write buffer stayed full (``max_pending`` / ``max_pending_bytes``) for
    ``backpressure_timeout_s``, usually because its stores are down: the write was refused
    (not applied); everything accepted before stays buffered."""
