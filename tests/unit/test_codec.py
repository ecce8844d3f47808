"""Canonical key encoding, value encoding and stable routing."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistroids_dist import codec
from persistroids_dist.codec import (
    NUM_SLOTS,
    _reference_packb,
    decode_key,
    decode_value,
    encode_key,
    encode_value,
    slot_of,
)

KEYS = ["a", "", "ünïcödé", b"\x00\xff", 0, -1, 2**63, 1.5, True, False, None,
        ("user", 1), ("nested", ("t", b"x"), None)]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_keys_round_trip_with_their_types(key):
    back = decode_key(encode_key(key))
    assert back == key and type(back) is type(key)


def test_equal_python_keys_of_different_types_stay_distinct():
    encoded = {encode_key(k) for k in (1, 1.0, True, "1", b"1", (1,))}
    assert len(encoded) == 6


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, {1}, object(), 2**70, ("ok", [1])],
                         ids=repr)
def test_bad_keys_raise_type_error_naming_the_key(bad):
    with pytest.raises(TypeError, match="key"):
        encode_key(bad)


@pytest.mark.parametrize("value", [None, 0, 3.25, "s", b"b", [1, [2]], {"a": {"b": (1, 2)}},
                                   (1, "x"), {1: "int keys"}, [], {}], ids=repr)
def test_values_round_trip(value):
    assert decode_value(encode_value(value)) == value
    assert type(decode_value(encode_value(value))) is type(value)


@pytest.mark.parametrize("bad", [object(), {1, 2}, [1, object()], 2**70], ids=repr)
def test_unencodable_values_raise_type_error(bad):
    with pytest.raises(TypeError, match="encode"):
        encode_value(bad)


def test_slots_are_stable_across_processes_with_different_hash_seeds():
    keys = ["alpha", ("t", 1), b"raw", 42]
    here = [slot_of(encode_key(k)) for k in keys]
    code = ("from persistroids_dist.codec import encode_key, slot_of;"
            "print([slot_of(encode_key(k)) for k in ['alpha', ('t', 1), b'raw', 42]])")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        assert out.stdout.strip() == str(here)
    assert all(0 <= s < NUM_SLOTS for s in here)


def test_slots_spread_keys_evenly():
    counts = [0] * 4
    for i in range(20000):
        counts[slot_of(encode_key(f"key-{i}")) * 4 // NUM_SLOTS] += 1
    assert min(counts) > 4000


# -- the fast tuple encoder writes the reference bytes ------------------------------------------
# Sizes where msgpack switches header (fixstr/str8/str16/str32, bin8/16/32, fixint/8/16/32/64
# bits, fixarray/array16, fixext/ext8/ext16/ext32) are drawn on purpose, not left to chance.
_INT_EDGES = [b + d for b in (0, 2**5, 2**7, 2**8, 2**15, 2**16, 2**31, 2**32, 2**63)
              for d in (-1, 0, 1)]
_INTS = st.one_of(st.integers(-(2**63), 2**64 - 1),
                  st.sampled_from(_INT_EDGES + [-x for x in _INT_EDGES] + [2**64 - 1, -(2**63)]))
_SIZES = [0, 1, 2, 3, 4, 7, 8, 14, 15, 16, 17, 31, 32, 33, 250, 255, 256, 65535, 65536]
_STRS = st.one_of(st.text(), st.sampled_from(_SIZES).flatmap(
    lambda n: st.sampled_from(["x" * n, "é" * (n // 2), "\ud800" * min(n, 1)])))
_BYTES = st.one_of(st.binary(), st.sampled_from(_SIZES).map(lambda n: b"\xff" * n))
_SCALARS = st.one_of(_STRS, _BYTES, _INTS, st.floats(), st.booleans(), st.none())
_KEYS = st.one_of(
    st.tuples(_SCALARS, _SCALARS),  # pairs have a path of their own
    st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=18).map(tuple), max_leaves=40))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=18), st.lists(inner, max_size=18).map(tuple),
                            st.dictionaries(st.one_of(st.text(), _INTS), inner, max_size=5)),
    max_leaves=40)
_EXAMPLES = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _reference(obj):
    """The reference bytes, or None where the reference encoding raises."""
    try:
        return _reference_packb(obj)
    except Exception:
        return None


@_EXAMPLES
@given(_KEYS)
def test_encode_key_writes_exactly_the_reference_bytes(key):
    want = _reference(key)
    if want is None:
        with pytest.raises((TypeError, ValueError)):
            encode_key(key)
        return
    assert encode_key(key) == want
    back = decode_key(want)
    assert encode_key(back) == want  # same types back (1, 1.0, True and tuple/list differ)


@_EXAMPLES
@given(_VALUES)
def test_encode_value_writes_exactly_the_reference_bytes(value):
    want = _reference(value)
    if want is None:
        with pytest.raises((TypeError, ValueError)):
            encode_value(value)
        return
    assert encode_value(value) == want
    assert encode_value(decode_value(want)) == want


@pytest.mark.parametrize("key", [("user", 42), ("m", 7), (), ((),), ("a", ("b", (b"c", None))),
                                 tuple(range(15)), tuple(range(16)), ("x" * 300, 1),
                                 ("y" * 70000,), ("z" * 300_000, ("n", 1)), (b"z" * 300_000,),
                                 (1, 1.0, True, -1, -(2**63), 2**64 - 1)],
                         ids=lambda k: repr(k)[:40])
def test_tuple_keys_known_shapes(key):
    assert encode_key(key) == encode_value(key) == _reference_packb(key)
    back = decode_key(encode_key(key))
    assert back == key and type(back) is tuple


def test_tuple_encoding_of_a_known_key_is_pinned():
    # Persisted stores and routing hold these bytes: they must never change.
    assert encode_key(("user", 42)) == b"\xc7\x07\x01\x92\xa4user*"
    assert encode_key(("m", 1)) == b"\xd6\x01\x92\xa1m\x01"
    assert slot_of(encode_key(("user", 42))) == slot_of(b"\xc7\x07\x01\x92\xa4user*")


@pytest.mark.parametrize("bad", [("ok", 2**64), ("ok", -(2**63) - 1), ("ok", object()),
                                 (("deep", [1]),), ("ok", {"a": 1})], ids=repr)
def test_bad_tuple_keys_still_raise_type_error(bad):
    with pytest.raises(TypeError, match="key"):
        encode_key(bad)


def test_a_failed_encode_does_not_disturb_the_next():
    for bad in [("ok", 2**64), ("ok", "\ud800"), ("ok", -(2**63) - 1)]:
        with pytest.raises((TypeError, ValueError)):
            encode_key(bad)
        with pytest.raises((TypeError, ValueError)):
            encode_value(bad)
        assert encode_key(("user", 42)) == b"\xc7\x07\x01\x92\xa4user*"
    for bad_value in ([("t", 2**70)], [1, 2**70], {"a": 2**70}, {2**70: 1}, ["\ud800"]):
        with pytest.raises(TypeError, match="encode"):
            encode_value(bad_value)
        for good in ([("t", 1)], [1, "x"], {"a": 1}, "s" * 40, ("u", 2)):
            assert encode_value(good) == _reference_packb(good)
    with pytest.raises(TypeError, match="key"):
        encode_key(2**64)
    assert encode_key(2**64 - 1) == _reference_packb(2**64 - 1)


def test_large_outputs_stay_exact():
    for big in ("s" * 300_000, b"b" * 300_000, ["l" * 300_000], {"d": b"x" * 300_000},
                ("t" * 300_000,), [("n", "t" * 300_000)]):
        assert encode_value(big) == _reference_packb(big)
        assert encode_value([1, "small"]) == _reference_packb([1, "small"])
    assert encode_key("k" * 300_000) == _reference_packb("k" * 300_000)


def test_tuples_encode_exactly_from_many_threads_at_once():
    keys = [("user", i, f"name-{i}" * (i % 7), b"\x00" * (i % 300), i / 7) for i in range(3000)]
    want = [_reference_packb(k) for k in keys]
    start = threading.Barrier(4)

    def work(offset):
        start.wait()
        order = keys[offset:] + keys[:offset]
        return [encode_key(k) for k in order], [encode_value([k]) for k in order]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, [0, 750, 1500, 2250]))
    for offset, (got_keys, got_values) in zip([0, 750, 1500, 2250], results):
        assert got_keys == want[offset:] + want[:offset]
        assert got_values == [_reference_packb([k]) for k in keys[offset:] + keys[:offset]]


def test_values_with_tuples_inside_containers_keep_their_tuples():
    value = {"pairs": [("a", 1), ("b", (2, [3]))], "t": (("x",),)}
    assert encode_value(value) == _reference_packb(value)
    assert decode_value(encode_value(value)) == value
    assert type(decode_value(encode_value(value))["pairs"][1][1]) is tuple


# -- NumPy scalars encode as the Python values they hold ----------------------------------------
_NP_INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
_NP_FLOATS = ["float16", "float32", "float64"]


@pytest.fixture
def np():
    return pytest.importorskip("numpy")


def _contexts(x):
    """``x`` alone and inside a tuple key, nested tuples, a list and a dict value."""
    return [x, ("k", x), ("k", (x, 1)), [x], {"v": x}, {"l": [("t", x)]}]


def _assert_same_bytes(np_value, py_value):
    assert type(py_value) in (int, float, bool, str, bytes)
    assert encode_key(np_value) == encode_key(py_value)
    assert encode_key(("k", np_value)) == encode_key(("k", py_value))
    assert encode_key((("n", np_value), np_value)) == encode_key((("n", py_value), py_value))
    for a, b in zip(_contexts(np_value), _contexts(py_value)):
        assert encode_value(a) == encode_value(b) == _reference_packb(b)
    back = decode_key(encode_key(("k", np_value)))[1]
    assert type(back) is type(py_value)


@pytest.mark.parametrize("name", _NP_INTS)
def test_numpy_integers_encode_as_python_ints(np, name):
    t = getattr(np, name)
    info = np.iinfo(t)
    for v in {info.min, info.max, 0, 1, info.min // 3, info.max // 3, -33, 127, 128, 2**31}:
        if info.min <= v <= info.max:
            _assert_same_bytes(t(v), int(v))


@pytest.mark.parametrize("name", _NP_FLOATS)
def test_numpy_floats_encode_as_the_python_float_they_widen_to(np, name):
    t = getattr(np, name)
    for v in (0.5, 0.1, -0.0, 1e4, float("inf"), float("nan"), -3.25):
        x = t(v)
        _assert_same_bytes(x, float(x))
    assert encode_key(np.float32(0.5)) == encode_key(0.5)
    assert encode_key(np.float32(0.1)) == encode_key(float(np.float32(0.1))) != encode_key(0.1)


def test_numpy_bool_str_bytes_encode_as_python_values(np):
    _assert_same_bytes(np.bool_(True), True)
    _assert_same_bytes(np.bool_(False), False)
    _assert_same_bytes(np.str_("héllo"), "héllo")
    _assert_same_bytes(np.str_("x" * 40), "x" * 40)
    _assert_same_bytes(np.bytes_(b"\x00raw"), b"\x00raw")
    # still distinct keys: bool is not int, str is not bytes
    assert len({encode_key(x) for x in (np.bool_(True), np.int64(1), np.float64(1.0),
                                        np.str_("1"), np.bytes_(b"1"))}) == 5


def test_numpy_scalars_from_an_array_batch(np):
    ids = np.arange(5, dtype=np.int64)
    keys = [("user", i) for i in ids]  # what iterating a Ray Data batch column gives
    assert [encode_key(k) for k in keys] == [encode_key(("user", i)) for i in range(5)]
    assert [decode_key(encode_key(k)) for k in keys] == [("user", i) for i in range(5)]
    row = {"score": np.float32(0.25), "ok": np.bool_(True), "n": np.uint8(7)}
    assert decode_value(encode_value(row)) == {"score": 0.25, "ok": True, "n": 7}


@pytest.mark.parametrize("make", [lambda np: np.zeros(3), lambda np: np.array(5),
                                  lambda np: np.longdouble(1), lambda np: np.complex64(1),
                                  lambda np: np.datetime64("2020-01-01")],
                         ids=["ndarray", "0-d array", "longdouble", "complex64", "datetime64"])
def test_other_numpy_objects_raise_type_error(np, make):
    x = make(np)
    for bad_key in (x, ("k", x)):
        with pytest.raises(TypeError, match="key"):
            encode_key(bad_key)
    for bad_value in (x, ("k", x), [x], {"v": x}):
        with pytest.raises(TypeError, match="encode"):
            encode_value(bad_value)


def test_numpy_scalars_hypothesis(np):
    hnp = pytest.importorskip("hypothesis.extra.numpy")
    dtypes = [np.dtype(n) for n in _NP_INTS + _NP_FLOATS + ["bool", "U", "S"]]

    def scalars(dtype):  # NumPy scalars of ``dtype``, as an array of it hands them out
        return hnp.from_dtype(dtype).map(lambda v: np.array([v], dtype=dtype)[0])

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(dtypes).flatmap(scalars))
    def check(x):
        assert isinstance(x, np.generic)
        py = x.item()
        if isinstance(py, str) and not py.isascii():
            try:
                py.encode()
            except UnicodeEncodeError:  # a lone surrogate: no str holding it encodes either
                with pytest.raises(UnicodeEncodeError):
                    encode_key(x)
                return
        _assert_same_bytes(x, py)

    check()


def test_codec_works_without_numpy_and_never_imports_it():
    code = (
        "import importlib.util, sys\n"
        "sys.modules['numpy'] = None  # any import of numpy now fails\n"
        f"spec = importlib.util.spec_from_file_location('codec', {_CODEC_PATH!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "for k in ('a', 1, 2.5, True, None, b'x', ('user', 42), ('n', ('t', 1.5))):\n"
        "    assert c.decode_key(c.encode_key(k)) == k\n"
        "    assert c.decode_value(c.encode_value([k])) == [k]\n"
        "try:\n"
        "    c.encode_key(object())\n"
        "except TypeError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


_CODEC_PATH = os.path.join(os.path.dirname(os.path.abspath(codec.__file__)), "codec.py")
