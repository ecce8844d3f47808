"""Exceptions raised by persistroids_dist."""

from __future__ import annotations

__all__ = ["AuthenticationError", "CacheClosedError", "FlushError", "LeaseLostError",
           "PersistroidsError", "RemoteError", "WriteError"]


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


class AuthenticationError(PersistroidsError):
    """A peer did not prove the cache's secret."""


class LeaseLostError(PersistroidsError):
    """An exclusive lease expired (its owner stopped renewing) before its writes came back."""


class CacheClosedError(PersistroidsError):
    """The cache was shut down."""
