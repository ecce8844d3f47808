"""The connector contract: how a store plugs into the cache.

A connector object is configuration created on the driver. It is pickled and shipped to every
shard, where ``connect()`` runs once; each shard then owns its own instance, so connections never
cross processes. A shard calls its connector from one thread at a time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .codec import decode_value, encode_value

__all__ = ["BaseConnector", "Connector", "MsgpackRowsConnector", "as_connector", "deleter",
           "encoded_reader", "reader", "writer"]


@runtime_checkable
class Connector(Protocol):
    """What every connector provides. ``BaseConnector`` documents the optional methods
    and their defaults; an object that is not a BaseConnector gets those defaults too.

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


# Each fast path, and the methods it stands for: a class that overrides one of those without
# overriding the fast path gets the fast path's default (which calls them).
_FAST_PATHS = (
    ("read_many", ("read",)),
    ("read_many_encoded", ("read", "read_many")),
    ("write_encoded", ("write",)),
    ("delete", ("write", "flush")),
)


class BaseConnector:
    """The base class of connectors: three methods to write, the rest has defaults.

    A connector implements ``read``, ``flush`` and (unless the ``(args, value)`` payload
    suits it) ``write``. Every other method has a documented default that delegates to
    those, as dogpile.cache's backends do: ``read_many`` calls ``read`` per key,
    ``read_many_encoded`` calls ``read_many``, ``write_encoded`` calls ``write``. A store
    overrides a default only to do the same work faster (one round trip for many keys,
    msgpack bytes passed through).

    The shard always goes through the batched, encoded paths (``reader``, ``encoded_reader``
    and ``writer`` below); the defaults make that the same as calling the simple methods. A
    fast path counts only while no subclass overrode the method it stands for: a subclass
    that overrides ``write`` (to audit, or to refuse some writes) sees every write even if
    its parent had a ``write_encoded``, and one that overrides ``read`` or ``read_many``
    sees every read. Any method may be ``async def``.
    """

    id: str = "base"
    #: True for a store that lives in the shard's own process (each shard has its own, as
    #: ``MemoryConnector``): what one shard flushed, no other can read. Resharding, which
    #: hands a slot to its new owner through the stores, refuses such a cache.
    process_local: bool = False
    #: True for a store another process may flush while this instance reads: it keeps
    #: nothing of the stored data in memory (a database, a server). The shard then stores
    #: its flushes through a child process holding an instance of its own, unpickled from the
    #: configuration the driver sent and connected there (``init(flush_process=...)``, see
    #: ``flushproc``). A subclass that overrides ``flush`` (it may count, or keep state)
    #: is not, unless it says so itself.
    flush_process_safe: bool = False
    # Whether the fast path stands for this class's own read/read_many/write (set per
    # subclass by __init_subclass__; see ``reader``, ``encoded_reader``, ``writer``).
    _own_read_many = False
    _own_read_many_encoded = False
    _own_write_encoded = False
    _own_delete = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "flush" in own and "flush_process_safe" not in own:
            cls.flush_process_safe = False
        for fast, stands_for in _FAST_PATHS:
            if fast in own:
                setattr(cls, f"_own_{fast}", True)
            elif any(name in own for name in stands_for):
                setattr(cls, f"_own_{fast}", False)  # its default then calls the override

    def get_id(self) -> str:
        """A stable id, unique among the cache's connectors (default: ``self.id``)."""
        return self.id

    def connect(self) -> None:
        """Open connections; runs in the shard process, once, before any other call."""

    def disconnect(self) -> None:
        """Close connections; runs at shutdown when ``disconnect=True`` is asked for."""

    def read(self, args: Any) -> Any:
        """Return the stored value for ``args``, or None if absent. Required."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement read()")

    def read_many(self, args_list: list[Any]) -> Any:
        """The stored values of ``args_list``, in order (None where absent).

        Default: ``read`` per key. Override with one store round trip for all of them."""
        results = [self.read(a) for a in args_list]
        if results and inspect.isawaitable(results[0]):
            return _gather(results)
        return results

    def read_many_encoded(self, encoded_args: list[bytes]) -> Any:
        """Like ``read_many``, given and returning msgpack bytes (``codec.encode_value``).

        Default: decodes the args, calls ``read_many``, encodes the values. Override when
        the store keeps msgpack bytes: the shard then never decodes what it caches."""
        values = self.read_many([decode_value(a) for a in encoded_args])
        return _then(values, _encode_all)

    def write(self, args: Any, value: Any) -> Any:
        """Return the payload to buffer until the next flush for this write (a later write to
        the same key replaces it), or None when nothing is to be buffered.

        Default: the payload is ``(args, value)``."""
        return (args, value)

    def write_encoded(self, args_bytes: bytes, value_bytes: bytes) -> Any:
        """Like ``write``, given the msgpack encodings of args and value.

        Default: decodes both and calls ``write`` (each connector gets its own copy)."""
        return self.write(decode_value(args_bytes), decode_value(value_bytes))

    def delete(self, args: Any) -> Any:
        """Return the payload that deletes ``args`` at the next flush (it replaces a pending
        write of the key, and a later write replaces it), or None if nothing is buffered.

        Default: ``write(args, None)``: the store keeps None, which reads as absent. Override
        to remove the key from the store for real (and handle the payload in ``flush``)."""
        return self.write(args, None)

    def flush(self, payloads: list[Any]) -> None:
        """Persist ``payloads`` (in write order, one per key) as one batch. Required.

        Raise on failure: the shard keeps every payload of this batch buffered and retries."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement flush()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.get_id()!r})"


def reader(conn: BaseConnector) -> Callable[[list[Any]], Any]:
    """What the shard calls to read many keys from ``conn``."""
    if conn._own_read_many:
        return conn.read_many
    return functools.partial(BaseConnector.read_many, conn)


def encoded_reader(conn: BaseConnector) -> Callable[[list[bytes]], Any] | None:
    """``conn``'s own ``read_many_encoded``, or None when it has none (reads then go through
    ``reader``, and the shard encodes what it caches)."""
    return conn.read_many_encoded if conn._own_read_many_encoded else None


def deleter(conn: BaseConnector) -> Callable[[Any], Any]:
    """What the shard calls for each delete on ``conn``: its own ``delete``, or the default
    (a write of None) when the class overrode ``write`` but not ``delete``."""
    if conn._own_delete:
        return conn.delete
    return functools.partial(BaseConnector.delete, conn)


def writer(conn: BaseConnector) -> Callable[[bytes, bytes], Any]:
    """What the shard calls for each write to ``conn``, with encoded args and value."""
    if conn._own_write_encoded:
        return conn.write_encoded
    return functools.partial(BaseConnector.write_encoded, conn)


class _Adapted(BaseConnector):
    """A connector that only follows the ``Connector`` protocol, given the base class's
    defaults for what it lacks."""

    def __init__(self, conn: Any) -> None:
        self.wrapped = conn
        for name in ("get_id", "connect", "disconnect", "read", "read_many",
                     "read_many_encoded", "write", "write_encoded", "delete", "flush"):
            fn = getattr(conn, name, None)
            if callable(fn):
                setattr(self, name, fn)  # its own method wins over the default
                if name in ("read_many", "read_many_encoded", "write_encoded", "delete"):
                    setattr(self, f"_own_{name}", True)

    def __repr__(self) -> str:
        return repr(self.wrapped)


def as_connector(conn: Any) -> BaseConnector:
    """``conn`` itself if it is a BaseConnector, else ``conn`` with the defaults added."""
    return conn if isinstance(conn, BaseConnector) else _Adapted(conn)


async def _gather(awaitables: list[Any]) -> list[Any]:
    return [await a for a in awaitables]


def _then(result: Any, fn: Any) -> Any:
    """``fn(result)``, after awaiting ``result`` if it is awaitable."""
    if inspect.isawaitable(result):
        async def chained() -> Any:
            return fn(await result)
        return chained()
    return fn(result)


def _encode_all(values: list[Any]) -> list[bytes | None]:
    return [None if v is None else encode_value(v) for v in values]


class MsgpackRowsConnector(BaseConnector):
    """Base for stores that keep ``(encode_value(args), encode_value(value))`` rows.

    Payloads are those two byte strings. Encoding at write time makes a bad value fail the
    write, not a later flush; ``write_encoded`` lets the shard hand over the bytes it holds.
    """

    def write(self, args: Any, value: Any) -> Any:
        return (encode_value(args), encode_value(value))

    def write_encoded(self, args_bytes: bytes, value_bytes: bytes) -> Any:
        return (args_bytes, value_bytes)
