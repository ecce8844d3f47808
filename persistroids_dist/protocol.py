"""The wire frames between a client and a shard: every request, in one place.

A request is one msgpack array ``[op, *args]``; the shard answers ``[0, result]`` or
``[1, pickled exception]``, in request order (``transport`` frames and authenticates; the
shard's handlers, in ``host.ShardHost``, take the arguments listed here). Keys travel as
canonical key bytes ``kb``, read arguments as ``ab`` (msgpack bytes of the args, None when
they are the key itself), values as msgpack bytes ``vb``. A request carries a pickle only
in UPDATE's function and in the checkpoint state of READ, WRITE and WRITE_MANY; a shard of a
cache made with ``allow_pickle=False`` refuses those, unread (UPDATE_NAMED carries a name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

__all__ = ["SEQUENCED", "Op"]

_packb = msgpack.packb


class Op:
    """Request opcodes (one integer each, to keep frames small)."""

    READ = 1  # [kb, ab, checkpoint?] -> vb
    READ_MANY = 2  # [kbs, abs | None] -> [vb, ...]
    WRITE = 3  # [kb, ab, vb, checkpoint?, ttl_s?] -> None
    WRITE_MANY = 4  # [[[kb, ab, vb(, ttl_s)], ...], checkpoint?] -> applied count
    UPDATE = 5  # [kb, ab, fn digest, cloudpickled fn | None] -> new vb
    FLUSH = 6  # [] -> keys flushed
    METRICS = 7  # [] -> {counter: value}
    PING = 8  # [] -> shard index
    LEASE = 9  # [kbs, owner, ttl_ms] -> [generation, [vb, ...]]
    RELEASE = 10  # [owner, [[kb, ab, vb, gen], ...], [[kb, gen], ...]] -> writes applied
    POLL = 11  # [owner, ttl_ms, wait_ms, [[kb, gen], ...]] -> recalled [[kb, gen], ...]
    DELETE = 12  # [kb, ab] -> None
    GET = 13  # [kb, ab] -> vb | None (None: stored nowhere)
    INVALIDATE = 14  # [kb] -> was cached
    INVALIDATE_ALL = 15  # [] -> entries dropped
    READ_MANY_VALUES = 16  # [kbs] -> [value, ...] inline (decoded with the answer)
    UPDATE_NAMED = 17  # [kb, ab, name] -> new vb (a function registered at init, by name)
    DEAD_LETTERS = 18  # [] -> [{key, connector, error, attempts, shard}, ...]
    RETRY_DEAD_LETTERS = 19  # [] -> how many went back into the buffer
    DISCARD_DEAD_LETTERS = 20  # [] -> how many were dropped
    # A connection's first request: [session id, first unanswered seq, next seq] -> the last
    # seq the shard applied for that session, or None (see ``session``).
    SESSION = 21
    # A primary to its backup (see ``replica``): journal bytes for a segment, the segments a
    # flush released, and "forget everything" (the whole journal follows).
    MIRROR_APPEND = 22  # [seg, bytes] -> None
    MIRROR_RELEASE = 23  # [upto] -> None
    MIRROR_RESET = 24  # [] -> None


#: The requests that change a shard's state and are numbered per session (implicitly: both
#: ends count them), so a request resent after a reconnect is never applied twice.
SEQUENCED = frozenset({Op.WRITE, Op.WRITE_MANY, Op.UPDATE, Op.UPDATE_NAMED, Op.DELETE,
                       Op.LEASE, Op.RELEASE})


def read(kb: bytes, ab: bytes | None, checkpoint: bytes | None = None) -> bytes:
    if checkpoint is None:
        return _packb([Op.READ, kb, ab])
    return _packb([Op.READ, kb, ab, checkpoint])


def read_many(kbs: Sequence[bytes], abs_: Sequence[bytes | None] | None) -> bytes:
    return _packb([Op.READ_MANY, kbs, abs_])


def read_many_values(kbs: Sequence[bytes]) -> bytes:
    return _packb([Op.READ_MANY_VALUES, kbs])


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def write(kb: bytes, ab: bytes | None, vb: bytes, checkpoint: bytes | None = None,
          ttl_s: float | None = None) -> bytes:
    return _packb([Op.WRITE, kb, ab, vb, checkpoint, ttl_s])


def write_many(items: Sequence[Sequence[Any]]) -> bytes:
    """``items``: ``[kb, ab, vb]`` or ``[kb, ab, vb, ttl_s]`` each."""
    return _packb([Op.WRITE_MANY, items])


def update(kb: bytes, ab: bytes | None, digest: bytes, fn_blob: bytes | None) -> bytes:
    """``fn_blob`` only the first time this connection uses the function ``digest``."""
    return _packb([Op.UPDATE, kb, ab, digest, fn_blob])


def update_named(kb: bytes, ab: bytes | None, name: str) -> bytes:
    """An update by the function registered as ``name`` at ``init(..., functions=...)``:
    nothing pickled travels (the only update a cache made with allow_pickle=False takes)."""
    return _packb([Op.UPDATE_NAMED, kb, ab, name])


def delete(kb: bytes, ab: bytes | None) -> bytes:
    return _packb([Op.DELETE, kb, ab])


def get(kb: bytes, ab: bytes | None) -> bytes:
    return _packb([Op.GET, kb, ab])


def invalidate(kb: bytes) -> bytes:
    return _packb([Op.INVALIDATE, kb])


def lease(kbs: Sequence[bytes], owner: bytes, ttl_ms: float) -> bytes:
    return _packb([Op.LEASE, kbs, owner, ttl_ms])


def release(owner: bytes, items: Sequence[Sequence[Any]],
            grants: Sequence[Sequence[Any]]) -> bytes:
    """Apply ``items`` (writes made under the grants they name), then end ``grants``."""
    return _packb([Op.RELEASE, owner, items, grants])


def poll(owner: bytes, ttl_ms: float, wait_ms: float, grants: Sequence[Sequence[Any]]) -> bytes:
    """Renew ``grants``; answer the owner's recalled grants, waiting up to ``wait_ms``."""
    return _packb([Op.POLL, owner, ttl_ms, wait_ms, grants])


INVALIDATE_ALL = _packb([Op.INVALIDATE_ALL])
METRICS = _packb([Op.METRICS])
DEAD_LETTERS = _packb([Op.DEAD_LETTERS])
RETRY_DEAD_LETTERS = _packb([Op.RETRY_DEAD_LETTERS])
DISCARD_DEAD_LETTERS = _packb([Op.DISCARD_DEAD_LETTERS])


def session(sid: bytes, first: int, next_seq: int) -> bytes:
    """Open (or resume) session ``sid`` on a new connection: the frames numbered ``first``
    to ``next_seq - 1`` follow as resends (their answers never came); numbering of new
    requests goes on from ``next_seq``."""
    return _packb([Op.SESSION, sid, first, next_seq])


def mirror_append(seg: int, data: bytes) -> bytes:
    return _packb([Op.MIRROR_APPEND, seg, data])


def mirror_release(upto: int) -> bytes:
    return _packb([Op.MIRROR_RELEASE, upto])


MIRROR_RESET = _packb([Op.MIRROR_RESET])
