"""Canonical encoding of keys and values, and stable routing.

Keys and values cross process boundaries as msgpack bytes. Keys are encoded canonically (one
byte string per key, the same in every process), so that routing and the shard-side dictionaries
can use the bytes directly: ``hash()`` differs per process, and Python would merge ``1``, ``1.0``
and ``True`` into one dict key, while here they are three distinct keys.

Tuples are a msgpack ext type (code 1) holding the msgpack array of their items. Tuple keys and
values take a fast path that writes the same bytes as msgpack with the ``default`` hook
(``_reference_packb``, kept for the tests) at a small fraction of its cost: a tuple of scalars is
packed by msgpack in C without the hook, a nested tuple by a hand-rolled encoder
(``_tuple_payload``), and any other shape takes the general path.

NumPy scalars (``np.int64``, ``np.float32``, ``np.bool_``, ``np.str_``, ...), as Ray Data hands
them out, are keys and values too: each encodes exactly as the Python value it holds
(``encode_key(np.int64(5)) == encode_key(5)``), so they come back as Python values. NumPy is never
imported here: a NumPy scalar is recognised by its type's module.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
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

#: Scalar key types; tuples of these (nested) are keys too, and so are the NumPy scalars that
#: hold one (see the module docstring).
KEY_TYPES = (str, bytes, int, float, bool, type(None))

_TUPLE_EXT = 1
_NONE_BYTES = msgpack.packb(None)


# -- NumPy scalars --------------------------------------------------------------------------------
_NUMPY: dict[type, Callable[[Any], Any] | None] = {}


def _numpy_scalar(t: type) -> Callable[[Any], Any] | None:
    """For a supported NumPy scalar type, the function that gives its Python value (which
    encodes to the same bytes); None for any other type. Types are looked up once."""
    try:
        return _NUMPY[t]
    except KeyError:
        pass
    if getattr(t, "__module__", None) != "numpy":
        return None  # not cached: only NumPy's own few scalar types are
    np = sys.modules.get("numpy")
    conv: Callable[[Any], Any] | None = None
    if np is not None and isinstance(t, type):
        if issubclass(t, np.bool_):
            conv = bool
        elif issubclass(t, np.integer):  # int8..int64, uint8..uint64: all fit in 64 bits
            conv = int
        elif issubclass(t, np.floating) and np.dtype(t).itemsize <= 8:
            conv = float  # float16/32 widen exactly; longdouble would not fit a float
        elif issubclass(t, np.str_):
            conv = str
        elif issubclass(t, np.bytes_):
            conv = bytes
    _NUMPY[t] = conv
    return conv


# -- the fast tuple encoder ---------------------------------------------------------------------
class _Fallback(Exception):
    """The fast encoder met a shape it does not write; the general path takes over."""


_u8 = struct.Struct(">BB").pack
_u16 = struct.Struct(">BH").pack
_u32 = struct.Struct(">BI").pack
_u64 = struct.Struct(">BQ").pack
_i8 = struct.Struct(">Bb").pack
_i16 = struct.Struct(">Bh").pack
_i32 = struct.Struct(">Bi").pack
_i64 = struct.Struct(">Bq").pack
_f64 = struct.Struct(">Bd").pack
_FIXARRAY = [bytes((0x90 | n,)) for n in range(16)]
_FIXSTR = [bytes((0xA0 | n,)) for n in range(32)]
_FIXINT = {i: bytes((i & 0xFF,)) for i in range(-32, 128)}
_EXT_HEADER = [bytes((0xC7, n, _TUPLE_EXT)) for n in range(256)]  # ext 8
for _n, _code in ((1, 0xD4), (2, 0xD5), (4, 0xD6), (8, 0xD7), (16, 0xD8)):  # fixext
    _EXT_HEADER[_n] = bytes((_code, _TUPLE_EXT))
# Whatever the fast path raises sends the input down the general path, which raises the error the
# caller sees (UnicodeEncodeError is a ValueError; OverflowError: an integer beyond 64 bits).
_FAST_ERRORS = (_Fallback, ValueError, OverflowError, RecursionError)

# A scalar of these exact types (no subclass), and a tuple, list or dict of them, is packed by
# msgpack in C with no hook, by a plain (not strict) Packer: a tuple is packed as an array, which
# is the tuple ext type's payload. The Packer is made per call with a small buffer; that is half
# the cost of ``msgpack.packb`` (a Python wrapper making a Packer with a 256 KiB buffer). A
# shared Packer would be faster still but not safe: a GC pass run by an allocation inside
# ``pack`` (an error's exception object) could let another thread write into its buffer.
# (``use_bin_type`` is msgpack's default since 1.0, as the original ``msgpack.packb`` relied on.)
_FLAT_TYPES = frozenset((str, int, float, bytes, bool, type(None)))
_all_flat = _FLAT_TYPES.issuperset
_Packer = msgpack.Packer
_BUF = 256  # bytes: a key fits; larger outputs grow the buffer


if getattr(sys, "_is_gil_enabled", lambda: True)():
    # One packer for the process: packing built-in types (no ``default`` hook, so no Python
    # code runs mid-pack) holds the GIL throughout, so no two threads interleave in it, and
    # it resets itself after an error. A new Packer per call cost ~0.2 us, a third of
    # encoding a small key or value (and of write_many's per-key client CPU).
    _pack_flat = _Packer(buf_size=_BUF).pack
else:  # a free-threaded build: a packer per call
    def _pack_flat(obj: Any) -> bytes:
        return _Packer(buf_size=_BUF).pack(obj)


def _tuple_payload(t: tuple[Any, ...]) -> bytes:
    """The msgpack array of ``t``'s items, as msgpack writes it (``use_bin_type``, strict types);
    raise one of ``_FAST_ERRORS`` for a shape this encoder leaves to msgpack."""
    n = len(t)
    if n > 15:
        raise _Fallback  # array 16: rare; joining many parts would want another loop
    data = _FIXARRAY[n]
    for x in t:
        tx = type(x)
        if tx is str:
            b = x.encode()  # strict UTF-8, as msgpack: a lone surrogate falls back, msgpack raises
            m = len(b)
            if m < 32:
                data += _FIXSTR[m] + b
            elif m < 0x100:
                data += _u8(0xD9, m) + b
            elif m < 0x10000:
                data += _u16(0xDA, m) + b
            else:
                raise _Fallback
        elif tx is int:
            s = _FIXINT.get(x)
            if s is not None:
                data += s
            elif x > 0:
                if x < 0x100:
                    data += _u8(0xCC, x)
                elif x < 0x10000:
                    data += _u16(0xCD, x)
                elif x < 0x100000000:
                    data += _u32(0xCE, x)
                elif x < 0x10000000000000000:
                    data += _u64(0xCF, x)
                else:
                    raise _Fallback
            elif x >= -0x80:
                data += _i8(0xD0, x)
            elif x >= -0x8000:
                data += _i16(0xD1, x)
            elif x >= -0x80000000:
                data += _i32(0xD2, x)
            elif x >= -0x8000000000000000:
                data += _i64(0xD3, x)
            else:
                raise _Fallback
        elif tx is tuple:
            data += _tuple_bytes(x)
        elif x is None:
            data += b"\xc0"
        elif x is True:
            data += b"\xc3"
        elif x is False:
            data += b"\xc2"
        elif tx is float:
            data += _f64(0xCB, x)
        elif tx is bytes:
            m = len(x)
            if m < 0x100:
                data += _u8(0xC4, m) + x
            elif m < 0x10000:
                data += _u16(0xC5, m) + x
            else:
                raise _Fallback
        else:
            conv = _numpy_scalar(tx)
            if conv is None:
                raise _Fallback
            data += _tuple_payload((conv(x),))[1:]  # the item without its 1-array header
    return data


def _tuple_bytes(t: tuple[Any, ...]) -> bytes:
    """``t`` as the tuple ext type, byte for byte what ``_reference_packb(t)`` returns; raise one
    of ``_FAST_ERRORS`` for a shape left to the general path."""
    data = _pack_flat(t) if _all_flat(map(type, t)) else _tuple_payload(t)
    m = len(data)
    if m < 0x100:
        return _EXT_HEADER[m] + data
    return _long_ext(data)


def _long_ext(data: bytes) -> bytes:
    m = len(data)
    if m < 0x10000:
        return _u16(0xC8, m) + b"\x01" + data
    if m <= 0xFFFFFFFF:
        return _u32(0xC9, m) + b"\x01" + data
    raise _Fallback


# The library's own dict subclasses (``Metrics``, what ``cache.metrics()`` returns) encode as
# the dict they are, so that a value that was a plain dict before still stores. Recognised by
# name, not imported: this module stands alone (it is loaded by path in a test).
_OWN_DICTS = frozenset({("persistroids_dist.metrics_view", "Metrics")})


def _own_dict(t: type) -> bool:
    return (getattr(t, "__module__", None), getattr(t, "__qualname__", None)) in _OWN_DICTS


# -- the general path (msgpack with a default hook) ---------------------------------------------
def _unsupported(obj: Any) -> TypeError:
    if type(obj) is int:
        return TypeError(f"cannot encode integer {obj}: it does not fit in 64 bits")
    return TypeError(
        f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__}; "
        "values must be None, bool, int, float, str, bytes, list, tuple or dict of those "
        "(encode other objects to bytes or a dict yourself)"
    )


def _ext_default(obj: Any) -> Any:
    # Tuples are kept apart from lists so that a tuple key or value comes back as a tuple.
    if type(obj) is tuple:
        try:
            if _all_flat(map(type, obj)):
                payload = _pack_flat(obj)
            else:
                payload = _tuple_payload(obj)
        except _FAST_ERRORS:
            payload = _packer_bytes(list(obj))
        return msgpack.ExtType(_TUPLE_EXT, payload)
    if _own_dict(type(obj)):
        return dict(obj)
    conv = _numpy_scalar(type(obj))
    if conv is not None:
        return conv(obj)
    raise _unsupported(obj)


def _packer_bytes(obj: Any) -> bytes:
    return _Packer(buf_size=_BUF, use_bin_type=True, strict_types=True,
                   default=_ext_default).pack(obj)


def _reference_default(obj: Any) -> Any:
    if type(obj) is tuple:
        return msgpack.ExtType(_TUPLE_EXT, _reference_packb(list(obj)))
    if _own_dict(type(obj)):
        return dict(obj)
    conv = _numpy_scalar(type(obj))
    if conv is not None:
        return conv(obj)
    raise _unsupported(obj)


def _reference_packb(obj: Any) -> bytes:
    """The definition of the encoding, without the fast paths (tests compare against it)."""
    return msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_reference_default)


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
    elif t not in KEY_TYPES and _numpy_scalar(t) is None:
        raise TypeError(
            f"invalid cache key {key!r} of type {t.__qualname__}: keys must be str, bytes, int, "
            "float, bool, None (or a NumPy scalar of those) or tuples of them"
        )


def encode_key(key: Any) -> bytes:
    """Return the canonical bytes of a cache key; raise TypeError for an unsupported key."""
    t = type(key)
    if t in _FLAT_TYPES:  # the common cases, without the recursive type check (same bytes)
        try:
            return _pack_flat(key)
        except OverflowError:
            raise TypeError(f"invalid cache key {key!r}: it does not fit in 64 bits") from None
    if t is tuple:
        try:
            # _tuple_bytes inlined, pairs such as ("user", 42) checked without map (hot path)
            if (type(key[0]) in _FLAT_TYPES and type(key[1]) in _FLAT_TYPES if len(key) == 2
                    else _all_flat(map(type, key))):
                data = _pack_flat(key)
            else:
                data = _tuple_payload(key)
            m = len(data)
            return _EXT_HEADER[m] + data if m < 0x100 else _long_ext(data)
        except _FAST_ERRORS:
            pass
    else:
        conv = _numpy_scalar(t)
        if conv is not None:
            return encode_key(conv(key))
    _check_key(key)
    try:
        return _packer_bytes(key)
    except (OverflowError, TypeError) as e:
        raise TypeError(f"invalid cache key {key!r}: {e}") from None


def decode_key(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def encode_value(value: Any) -> bytes:
    """Encode a value with msgpack (tuples preserved); raise TypeError naming what failed."""
    if value is None:
        return _NONE_BYTES
    t = type(value)
    if t in _FLAT_TYPES:  # the common cases, without the hooks (same bytes)
        try:
            return _pack_flat(value)
        except OverflowError:
            raise TypeError(f"cannot encode integer {value}: it does not fit in 64 bits") from None
    if t is tuple:
        try:
            if (type(value[0]) in _FLAT_TYPES and type(value[1]) in _FLAT_TYPES
                    if len(value) == 2 else _all_flat(map(type, value))):  # as in encode_key
                data = _pack_flat(value)
            else:
                data = _tuple_payload(value)
            m = len(data)
            return _EXT_HEADER[m] + data if m < 0x100 else _long_ext(data)
        except _FAST_ERRORS:
            pass
    elif t is dict:
        try:
            if _all_flat(map(type, value.values())) and _all_flat(map(type, value)):
                return _pack_flat(value)
        except _FAST_ERRORS:
            pass
    elif t is list:
        try:
            if _all_flat(map(type, value)):
                return _pack_flat(value)
        except _FAST_ERRORS:
            pass
    else:
        conv = _numpy_scalar(t)
        if conv is not None:
            return encode_value(conv(value))
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
