"""Redis connector: the contract (keys and hash modes) against a real server, plus specifics."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from persistroids_dist.codec import encode_value
from persistroids_dist.connectors.redis import (
    DEFAULT_URL,
    ENV_URL,
    RedisConnector,
    RedisUnavailableError,
    mask_url,
)
from persistroids_dist.connectors.testing import (
    ConnectorContract,
    Outage,
    TcpProxy,
    require_service,
)

URL = os.environ.get(ENV_URL) or DEFAULT_URL
_parts = urlsplit(URL)
HOST, PORT = _parts.hostname or "127.0.0.1", _parts.port or 6379
SECRET = "s3cret-redis-4410"


def _delete_prefix(prefix: str) -> None:
    try:
        r = redis.Redis.from_url(URL)
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    except redis.RedisError:
        pass


@pytest.fixture(autouse=True)
def _need_redis() -> None:
    require_service("Redis", HOST, PORT)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"persistroids-test:{uuid.uuid4().hex[:12]}:"
    yield p
    _delete_prefix(p)


class TestRedisKeysContract(ConnectorContract):
    duplicate_keys_in_batch = True
    mode_options: dict[str, str] = {}

    def make_connector(self) -> RedisConnector:
        return RedisConnector(URL, prefix=f"persistroids-test:{self.name}:",
                              **self.mode_options)

    def make_down_connector(self) -> RedisConnector:
        return RedisConnector(f"redis://:{SECRET}@127.0.0.1:1/0", prefix=f"pt:{self.name}:",
                              socket_timeout_s=1, **self.mode_options)

    def make_outage(self) -> Outage:
        proxy = TcpProxy(HOST, PORT).start()
        self.on_teardown(proxy.stop)
        url = f"redis://127.0.0.1:{proxy.port}{_parts.path or '/0'}"
        conn = RedisConnector(url, prefix=f"persistroids-test:{self.name}:", socket_timeout_s=1,
                              **self.mode_options)
        return Outage(conn, proxy.down)

    def secret_strings(self) -> list[str]:
        return [SECRET]

    def cleanup(self) -> None:
        _delete_prefix(f"persistroids-test:{self.name}:")


class TestRedisHashContract(TestRedisKeysContract):
    """The same contract, outages included, with every key in one hash and raw key bytes."""

    mode_options = {"mode": "hash", "key_format": "raw"}


def test_ttl(prefix: str) -> None:
    conn = RedisConnector(URL, prefix=prefix, ttl_s=0.3)
    conn.connect()
    conn.flush([conn.write("k", 1), conn.write("j", 2)])
    raw = redis.Redis.from_url(URL)
    ttl = raw.pttl(prefix + encode_value("k").hex())
    assert 0 < ttl <= 300
    assert conn.read_many(["k", "j"]) == [1, 2]
    time.sleep(0.45)
    assert conn.read_many(["k", "j"]) == [None, None]
    raw.close()
    conn.disconnect()


def test_key_layout(prefix: str) -> None:
    raw = redis.Redis.from_url(URL)
    hexed = RedisConnector(URL, prefix=prefix)
    rawkeys = RedisConnector(URL, prefix=prefix + "raw:", key_format="raw")
    hashed = RedisConnector(URL, prefix=prefix, mode="hash")
    for c in (hexed, rawkeys, hashed):
        c.connect()
        c.flush([c.write(("t", 1), "v")])
    k = encode_value(("t", 1))
    assert raw.get(prefix + k.hex()) == encode_value("v")
    assert raw.get(prefix.encode() + b"raw:" + k) == encode_value("v")
    assert raw.hget(prefix + "kv", k.hex()) == encode_value("v")
    assert hashed.get_id() == f"redis:{prefix}kv"
    raw.close()


def test_flush_error_is_raised(prefix: str) -> None:
    raw = redis.Redis.from_url(URL)
    raw.set(prefix + "not-a-hash", b"x")
    bad = RedisConnector(URL, prefix=prefix, mode="hash", hash_name=prefix + "not-a-hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        bad.flush([bad.write("a", 1)])
    raw.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix": ""}, "invalid Redis key prefix"),
    ({"prefix": "has space:"}, "invalid Redis key prefix"),
    ({"prefix": "glob*:"}, "invalid Redis key prefix"),
    ({"mode": "list"}, "mode must be"),
    ({"key_format": "b64"}, "key_format"),
    ({"ttl_s": 0}, "ttl_s must be"),
    ({"ttl_s": 5, "mode": "hash"}, "ttl_s needs mode='keys'"),
    ({"hash_name": "h"}, "hash_name is only used"),
    ({"retries": -1}, "retries"),
])
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisConnector(URL, **kwargs)


def test_credentials_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://user:{SECRET}@127.0.0.1:1/2"
    assert SECRET not in mask_url(url)
    conn = RedisConnector(url, socket_timeout_s=0.5)
    assert SECRET not in repr(conn) and "127.0.0.1:1/2" in repr(conn)
    with pytest.raises(RedisUnavailableError) as info:
        conn.connect()
    assert SECRET not in str(info.value) and "127.0.0.1:1/2" in str(info.value)
    with pytest.raises(ValueError, match="invalid Redis URL") as bad:
        RedisConnector(f"http://u:{SECRET}@x")
    assert SECRET not in str(bad.value)
    monkeypatch.setenv(ENV_URL, f"redis://:{SECRET}@10.9.8.7:7000/3")
    assert "10.9.8.7:7000/3" in repr(RedisConnector())
