"""The trust model: update functions registered by name, and ``allow_pickle=False``, under
which no shard (nor the coordinator) unpickles anything a peer sends."""

from __future__ import annotations

import os
import uuid

import msgpack
import pytest
import ray
from ray import cloudpickle

import persistroids_dist as pd
from persistroids_dist import control, protocol
from persistroids_dist.codec import encode_key, encode_value
from persistroids_dist.protocol import Op
from persistroids_dist.transport import Connection


def incr(v):
    return v + 1


def double(v):
    return v * 2


class Marker:
    """Unpickling this creates the directory ``path``: proof that someone unpickled it."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@ray.remote
def bump(cache, n):
    for i in range(n):
        cache.update("counter", "incr", wait=i % 5 != 0)  # some pipelined
    cache.sync()


def test_named_functions_from_ray_tasks_count_exactly(make_cache):
    name = f"trust-{uuid.uuid4().hex[:8]}"
    cache = make_cache(init_fn=lambda a: 0, functions={"incr": incr, "double": double},
                       allow_pickle=False, name=name)
    ray.get([bump.remote(cache, 25) for _ in range(4)])
    assert cache.read("counter") == 100
    assert cache.update("counter", "double") == 200
    # A handle from connect() knows the cache's settings and functions (from the spec).
    other = pd.connect(name)
    assert other._spec.allow_pickle is False and set(other._spec.functions) == {"incr",
                                                                               "double"}
    assert other.update("counter", "incr") == 201
    # On a key leased here, a named update runs in-process and still counts.
    with cache.lease("counter"):
        assert cache.update("counter", "incr") == 202
        assert cache.read("counter") == 202
    assert other.read("counter") == 202


def test_callables_still_work_by_default_beside_names(make_cache):
    cache = make_cache(init_fn=lambda a: 0, functions={"incr": incr}, num_shards=1)
    assert cache._spec.allow_pickle is True
    assert cache.update("k", "incr") == 1
    assert cache.update("k", lambda v: v + 10) == 11
    cache.flush_now(checkpoint={"at": 1})  # a checkpoint state is a pickle: allowed here


def test_a_callable_is_refused_before_it_is_sent(make_cache, monkeypatch):
    cache = make_cache(init_fn=lambda a: 0, functions={"incr": incr}, allow_pickle=False,
                       num_shards=1)
    cache.update("k", "incr")

    def not_sent(*args):
        raise AssertionError("an update frame with a pickled function was built")

    monkeypatch.setattr(protocol, "update", not_sent)
    with pytest.raises(pd.PicklingRefusedError, match="allow_pickle=False") as info:
        cache.update("k", lambda v: v + 100)
    assert isinstance(info.value, PermissionError)
    assert "functions={name: fn}" in str(info.value) and "nothing was sent" in str(info.value)
    with pytest.raises(pd.PicklingRefusedError):
        cache.update("k", incr, wait=False)
    cache.sync()
    assert cache.read("k") == 1
    assert cache.metrics()["total"]["updates"] == 1


def _raw(cache) -> Connection:
    return Connection(cache._spec.addresses[0], cache._spec.secret)


def test_the_shard_itself_refuses_pickles(make_cache, tmp_path):
    cache = make_cache(init_fn=lambda a: 0, allow_pickle=False, num_shards=1)
    marker = tmp_path / "unpickled"
    blob = cloudpickle.dumps(Marker(marker))
    kb, vb = encode_key("k"), encode_value(5)
    conn = _raw(cache)
    try:
        frames = [
            protocol.update(kb, None, b"d" * 16, blob),  # a function
            protocol.update(kb, None, b"d" * 16, None),  # a digest sent before
            protocol.read(kb, None, blob),  # checkpoint states
            protocol.write(kb, None, vb, blob),
            msgpack.packb([Op.WRITE_MANY, [[kb, None, vb]], blob]),
        ]
        for frame in frames:
            with pytest.raises(pd.PicklingRefusedError, match="allow_pickle=False"):
                conn.call(frame)
        # The coordinator refuses a checkpoint state too, before flushing anything.
        with pytest.raises(pd.PicklingRefusedError):
            control.flush_all(cache._spec, blob)
        # Nothing was unpickled, nothing written; the connection still serves.
        assert not marker.exists()
        assert conn.call(protocol.get(kb, None)) is None
        with pytest.raises(LookupError, match="'incr'.*registered: none"):
            conn.call(protocol.update_named(kb, None, "incr"))
    finally:
        conn.close()
    assert cache.read("k") == 0


def test_the_marker_is_unpickled_where_pickles_are_allowed(make_cache, tmp_path):
    # The control for the test above: the same frame does reach cloudpickle by default.
    cache = make_cache(init_fn=lambda a: 0, num_shards=1)
    marker = tmp_path / "unpickled"
    conn = _raw(cache)
    try:
        with pytest.raises(TypeError):  # what os.mkdir returned (None) is no function
            conn.call(protocol.update(encode_key("k"), None, b"d" * 16,
                                      cloudpickle.dumps(Marker(marker))))
    finally:
        conn.close()
    assert marker.exists()


def test_checkpoints_are_refused_without_pickles(make_cache):
    handled = []
    cache = make_cache(init_fn=lambda a: 0, allow_pickle=False, num_shards=1,
                       checkpoint_handler=handled.append, millis_threshold=60_000)
    with pytest.raises(pd.PicklingRefusedError, match="checkpoint="):
        cache.write("k", 1, checkpoint={"offset": 1})
    with pytest.raises(pd.PicklingRefusedError, match="checkpoint="):
        cache.read("k", checkpoint={"offset": 1})
    cache.write("j", 1)
    with pytest.raises(pd.PicklingRefusedError, match="checkpoint="):
        cache.flush_now(checkpoint={"offset": 2})
    assert cache.get("k") is None  # the refused write was not applied
    assert cache.flush_now() == 1  # only "j" was pending: the refused flush_now sent nothing
    assert cache.metrics()["total"]["checkpoints"] == 0


def test_an_unknown_name_lists_the_registered_ones(make_cache):
    cache = make_cache(init_fn=lambda a: 0, functions={"incr": incr, "double": double},
                       num_shards=1)
    with pytest.raises(LookupError, match=r"'nope'.*registered: 'double', 'incr'"):
        cache.update("k", "nope")
    with pytest.raises(LookupError, match="'nope'"):  # pipelined: raised by sync()
        cache.update("k", "nope", wait=False)
        cache.sync()
    with pytest.raises(TypeError, match="callable or the name"):
        cache.update("k", 3)
    assert cache.read("k") == 0


@pytest.mark.parametrize("functions, error, match", [
    ([("incr", incr)], TypeError, "functions must be a dict"),
    ({1: incr}, TypeError, "every name must be a str, got 1"),
    ({"": incr}, ValueError, "must not be empty"),
    ({"incr": 3}, TypeError, r"functions\['incr'\] must be callable, got int"),
])
def test_bad_functions_arguments(functions, error, match):
    with pytest.raises(error, match=match):  # checked before Ray is touched
        pd.init(functions=functions)


def test_allow_pickle_must_be_a_bool():
    with pytest.raises(TypeError, match="allow_pickle must be True or False"):
        pd.init(allow_pickle="no")
