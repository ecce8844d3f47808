"""Canonical key encoding, value encoding and stable routing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from persistroids_dist.codec import (
    NUM_SLOTS,
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
