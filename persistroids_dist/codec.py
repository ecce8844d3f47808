"""Canonical encoding of keys and values, and stable routing.

Keys and values cross process boundaries as msgpack bytes. Keys are encoded canonically (one
byte string per key, the same in every process), so that routing and the shard-side dictionaries
can use the bytes directly: ``hash()`` differs per process, and Python would merge ``1``, ``1.0``
and ``True`` into one dict key, while here they are three distinct keys.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

__all__ = [
    "KEY_TYPES",
    "NUM_SLOTS",
    "decode_key",
    "decode_value",
    "encode_key",
    "encode_value",
    "slot_of",
]

#: Number of hash slots; shards own slots, so resharding moves slots, not single keys.
NUM_SLOTS = 16384

#: Scalar key types; tuples of these (nested) are keys too.
KEY_TYPES = (str, bytes, int, float, bool, type(None))

_TUPLE_EXT = 1
_NONE_BYTES = msgpack.packb(None)


def _ext_default(obj: Any) -> Any:
    # Tuples are kept apart from lists so that a tuple key or value comes back as a tuple.
    if type(obj) is tuple:
        return msgpack.ExtType(_TUPLE_EXT, _packer_bytes(list(obj)))
    if type(obj) is int:
        raise TypeError(f"cannot encode integer {obj}: it does not fit in 64 bits")
    raise TypeError(
        f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__}; "
        "values must be None, bool, int, float, str, bytes, list, tuple or dict of those "
        "(encode other objects to bytes or a dict yourself)"
    )


def _packer_bytes(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_ext_default)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE_EXT:
        return tuple(
            msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
        )
    return msgpack.ExtType(code, data)


def _check_key(key: Any) -> None:
    t = type(key)
    if t is tuple:
        for part in key:
            _check_key(part)
    elif t not in KEY_TYPES:
        raise TypeError(
            f"invalid cache key {key!r} of type {t.__qualname__}: keys must be str, bytes, int, "
            "float, bool, None or tuples of them"
        )


def encode_key(key: Any) -> bytes:
    """Return the canonical bytes of a cache key; raise TypeError for an unsupported key."""
    if type(key) is str:  # the common case, without the recursive type check
        return msgpack.packb(key)
    _check_key(key)
    try:
        return _packer_bytes(key)
    except (OverflowError, TypeError) as e:
        raise TypeError(f"invalid cache key {key!r}: {e}") from None


def decode_key(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


_SCALARS = frozenset((str, int, float, bytes, bool))
_plain_packb = msgpack.packb


def encode_value(value: Any) -> bytes:
    """Encode a value with msgpack (tuples preserved); raise TypeError naming what failed."""
    if value is None:
        return _NONE_BYTES
    if type(value) in _SCALARS:  # the common case, without the hooks (same bytes)
        try:
            return _plain_packb(value)
        except OverflowError:
            raise TypeError(f"cannot encode integer {value}: it does not fit in 64 bits") from None
    try:
        return _packer_bytes(value)
    except TypeError as e:
        raise TypeError(str(e)) from None
    except (OverflowError, ValueError) as e:
        raise TypeError(f"cannot encode value: {e}") from None


def decode_value(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def slot_of(key_bytes: bytes) -> int:
    """Stable hash slot of an encoded key (CRC-32, identical in every process and release)."""
    return zlib.crc32(key_bytes) % NUM_SLOTS
