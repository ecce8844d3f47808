"""A store that returns garbage: a clear error naming the connector and the key, counted,
and nothing cached (so the next read asks the store again)."""

from __future__ import annotations

import uuid

import pytest

from persistroids_dist import StoreDataError
from persistroids_dist.client import Cache
from persistroids_dist.codec import encode_key, encode_value
from persistroids_dist.connector import BaseConnector
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.shard import ShardCore


class GarbageBytes(MemoryConnector):
    """Serves stored bytes (the encoded fast path), one of them not msgpack."""


    def read_many_encoded(self, encoded):
        return [b"\xc1" if a == encode_value("bad") else None for a in encoded]


class ShortList(BaseConnector):
    id = "short-list"

    def read(self, args):
        return None

    def read_many(self, args_list):
        return [None] * (len(args_list) - 1)

    def flush(self, payloads):
        pass


class WrongType(BaseConnector):
    id = "wrong-type"

    def read(self, args):
        return {1, 2, 3} if args == "bad" else "fine"

    def flush(self, payloads):
        pass


@pytest.mark.parametrize("store, keys, message", [
    (GarbageBytes("garbage-bytes"), ["bad"],
     "'garbage-bytes' returned undecodable stored bytes for key 'bad'"),
    (ShortList(), ["a", "b"], "'short-list': read_many returned 1 result.s. for 2 key.s."),
    (WrongType(), ["bad"], "'wrong-type' returned a value the cache cannot store for key 'bad'"),
])
def test_garbage_from_a_store_is_refused_counted_and_never_cached(store, keys, message):
    core = ShardCore([store])
    kbs = [encode_key(k) for k in keys]
    for _ in range(2):  # the second read asks the store again: nothing was cached
        with pytest.raises(StoreDataError, match=message):
            core.read_many(kbs) if len(kbs) > 1 else core.read(kbs[0])
    m = core.metrics()
    assert m["read_errors"] == 2 and m["entries"] == 0
    assert isinstance(StoreDataError("x"), ValueError)


def test_the_caller_gets_the_store_error_by_its_own_type():
    host = ShardHost(0, [WrongType()], {}, b"g" * 32)
    try:
        cache = Cache({"name": f"g-{uuid.uuid4().hex}", "secret": b"g" * 32, "num_shards": 1,
                       "addresses": [host.address()], "shards": [None], "cache_key": None})
        with pytest.raises(StoreDataError, match="'wrong-type'.*key 'bad'"):
            cache.read("bad")
        assert cache.read("good") == "fine"
        cache._pool.close()
    finally:
        host.close()
