"""The connector contract: how a store plugs into the cache.

A connector object is configuration created on the driver. It is pickled and shipped to every
shard, where ``connect()`` runs once; each shard then owns its own instance, so connections never
cross processes. A shard calls its connector from one thread at a time.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .codec import encode_value

__all__ = ["BaseConnector", "Connector", "MsgpackRowsConnector"]


@runtime_checkable
class Connector(Protocol):
    """What every connector provides. ``connect`` and ``disconnect`` are optional.

    Any method may be a coroutine function (``async def``); the shard then runs it on its own
    event loop.
    """

    def get_id(self) -> str:
        """A stable id, unique among the cache's connectors; payloads are buffered under it."""
        ...

    def read(self, args: Any) -> Any:
        """Return the stored value for ``args`` (the raw read arguments), or None if absent."""
        ...

    def write(self, args: Any, value: Any) -> Any:
        """Prepare a write of ``value`` for ``args``.

        Return a payload to buffer until the next flush (a later write to the same key replaces
        it), or None when the connector has written the value itself and nothing is buffered.
        """
        ...

    def flush(self, payloads: list[Any]) -> None:
        """Persist ``payloads`` (in write order, one per key) as one batch.

        Raise on failure: the shard keeps every payload of this batch buffered and retries later.
        """
        ...


# Optional fast paths a connector may add (the shard looks for them once, at start):
#   read_many(args_list) -> list of values (None where absent): one store round trip for
#       the keys a read_many missed.
#   write_encoded(args_bytes, value_bytes) -> payload | None: like ``write``, but given the
#       msgpack encodings (``codec.encode_value``) of args and value, so a store that keeps
#       msgpack bytes skips a decode and a re-encode per write.


class BaseConnector:
    """Optional base class: no-op ``connect``/``disconnect`` and ``(args, value)`` payloads."""

    id: str = "base"

    def get_id(self) -> str:
        return self.id

    def connect(self) -> None:
        """Open connections; runs in the shard process, once, before any other call."""

    def disconnect(self) -> None:
        """Close connections; runs at shutdown when ``disconnect=True`` is asked for."""

    def read(self, args: Any) -> Any:
        raise NotImplementedError

    def write(self, args: Any, value: Any) -> Any:
        return (args, value)

    def flush(self, payloads: list[Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.get_id()!r})"


class MsgpackRowsConnector(BaseConnector):
    """Base for stores that keep ``(encode_value(args), encode_value(value))`` rows.

    Payloads are those two byte strings. Encoding at write time makes a bad value fail the
    write, not a later flush; ``write_encoded`` lets the shard hand over the bytes it holds.
    """

    def write(self, args: Any, value: Any) -> Any:
        return (encode_value(args), encode_value(value))

    def write_encoded(self, args_bytes: bytes, value_bytes: bytes) -> Any:
        return (args_bytes, value_bytes)
