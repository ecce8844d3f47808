"""Redis connector (redis-py): one Redis key per cache key, or one field per key in a hash.

``mode="keys"`` stores ``prefix + hex(encode_value(args))`` (or the raw encoded bytes with
``key_format="raw"``) holding ``encode_value(value)``, optionally expiring after ``ttl_s``.
``mode="hash"`` stores fields of one hash ``hash_name`` instead: one Redis key to inspect or
delete, no per-key TTL (Redis 7.0 has no per-field expiry). Reads are GET/HGET, ``read_many``
is MGET/HMGET. A flush is one MULTI/EXEC transaction: other clients never see half a batch and
a connection lost before EXEC applies nothing (Redis does not roll back after a command error
such as WRONGTYPE, which only a misconfigured key layout causes; the flush then raises).
The password in the URL never appears in a repr or in an error raised here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import BaseConnector

__all__ = ["DEFAULT_URL", "ENV_URL", "RedisConnector", "RedisUnavailableError", "mask_url"]

ENV_URL = "PERSISTROIDS_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"

# Printable, no spaces or glob characters (a prefix is used in SCAN patterns by operators);
# braces are allowed for Redis Cluster hash tags.
_PREFIX = re.compile(r"^[A-Za-z0-9_.:/{}@#=+\-]{1,200}$")
_CHUNK = 10000


class RedisUnavailableError(ConnectionError):
    """Redis could not be reached (the message names the server, never the password)."""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


class RedisConnector(BaseConnector):
    """Persists the cache in Redis.

    ``url``: ``redis://``, ``rediss://`` or ``unix://`` URL; default the environment variable
    ``PERSISTROIDS_REDIS_URL``, else ``redis://127.0.0.1:6379/0``.
    ``prefix``: prepended to every key (keys mode) and to the default hash name.
    ``ttl_s``: expiry of each written key in seconds (keys mode only; None: never).
    ``mode``: ``"keys"`` or ``"hash"``; ``hash_name``: the hash (default ``prefix + "kv"``).
    ``key_format``: ``"hex"`` (readable in redis-cli) or ``"raw"`` (shorter binary keys).
    ``socket_timeout_s`` bounds every command; ``retries`` is how often a command is retried
    on a dropped connection (a flush is an idempotent transaction, so retrying is safe).
    """

    flush_process_safe = True  # a server: a child process may flush (flushproc)

    def __init__(self, url: str | None = None, prefix: str = "persistroids:", *,
                 id: str | None = None, ttl_s: float | None = None, mode: str = "keys",
                 hash_name: str | None = None, key_format: str = "hex",
                 socket_timeout_s: float = 5.0, retries: int = 1) -> None:
        url = url if url is not None else os.environ.get(ENV_URL) or DEFAULT_URL
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            shown = mask_url(url) if isinstance(url, str) else type(url).__qualname__
            raise ValueError(f"invalid Redis URL {shown!r}: it must start with redis://, "
                             "rediss:// or unix://")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ValueError(f"invalid Redis key prefix {prefix!r}: use 1 to 200 letters, digits "
                             "or _.:/{}@#=+- (no spaces or glob characters)")
        if mode not in ("keys", "hash"):
            raise ValueError(f"mode must be 'keys' or 'hash', got {mode!r}")
        if key_format not in ("hex", "raw"):
            raise ValueError(f"key_format must be 'hex' or 'raw', got {key_format!r}")
        if ttl_s is not None:
            if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
                raise ValueError(f"ttl_s must be a number > 0 or None, got {ttl_s!r}")
            if mode == "hash":
                raise ValueError("ttl_s needs mode='keys': Redis hash fields cannot expire "
                                 "one by one")
        if mode == "keys" and hash_name is not None:
            raise ValueError("hash_name is only used with mode='hash'")
        if hash_name is not None and (not isinstance(hash_name, str)
                                      or not _PREFIX.match(hash_name)):
            raise ValueError(f"invalid Redis hash name {hash_name!r}")
        if not socket_timeout_s > 0:
            raise ValueError(f"socket_timeout_s must be > 0, got {socket_timeout_s!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self._url = url
        parts = urlsplit(url)
        self._password = parts.password or ""
        self._where = (parts.path if parts.scheme == "unix"
                       else f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}")
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self.mode = mode
        self.hash_name = (hash_name or prefix + "kv") if mode == "hash" else None
        self.key_format = key_format
        self.ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        self.ttl_s = ttl_s  # the cache expires its copies of this store's keys as fast
        self.socket_timeout_s = float(socket_timeout_s)
        self.retries = retries
        self.id = id or f"redis:{self.hash_name or prefix}"
        self._client: redis.Redis | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # sockets stay in the process that opened them
        return state

    def __repr__(self) -> str:
        where = f"hash={self.hash_name!r}" if self.mode == "hash" else f"prefix={self.prefix!r}"
        return f"RedisConnector(server={self._where!r}, {where}, id={self.id!r})"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn connection failures into RedisUnavailableError with a masked message."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            text = mask_url(str(e))
            if self._password:
                text = text.replace(self._password, "***")
            raise RedisUnavailableError(f"Redis at {self._where} is unavailable for {self.id}: "
                                        f"{type(e).__name__}: {text}") from None

    def connect(self) -> None:
        """Create the client and check that the server answers."""
        if self._client is not None:
            return
        client = redis.Redis.from_url(
            self._url, socket_timeout=self.socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), self.retries), decode_responses=False)
        try:
            with self._guard():
                client.ping()
        except BaseException:
            client.close()
            raise
        self._client = client

    def disconnect(self) -> None:
        """Close the client (a later call reconnects)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    def _key(self, args: Any) -> bytes:
        return self._key_of_encoded(encode_value(args))

    def _key_of_encoded(self, encoded: bytes) -> bytes:
        if self.key_format == "hex":
            encoded = encoded.hex().encode()
        return encoded if self.mode == "hash" else self._prefix_bytes + encoded

    def read(self, args: Any) -> Any:
        """The value stored for ``args``, or None."""
        key = self._key(args)
        with self._guard():
            data = (self.client.get(key) if self.hash_name is None
                    else self.client.hget(self.hash_name, key))
        return None if data is None else decode_value(data)

    def read_many(self, args_list: Sequence[Any]) -> list[Any]:
        """The values for each of ``args_list`` (None where absent), by MGET/HMGET."""
        return [None if d is None else decode_value(d)
                for d in self.read_many_encoded([encode_value(a) for a in args_list])]

    def read_many_encoded(self, encoded: Sequence[bytes]) -> list[bytes | None]:
        """The stored msgpack bytes for each encoded key (None where absent)."""
        keys = [self._key_of_encoded(e) for e in encoded]
        out: list[Any] = []
        with self._guard():
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                out.extend(self.client.mget(chunk) if self.hash_name is None
                           else self.client.hmget(self.hash_name, chunk))
        return out

    def write(self, args: Any, value: Any) -> Any:
        return (self._key(args), encode_value(value))

    def write_encoded(self, args_bytes: bytes, value_bytes: bytes) -> Any:
        """The shard's fast path: values are stored as the msgpack bytes it holds."""
        return (self._key_of_encoded(args_bytes), value_bytes)

    def flush(self, payloads: list[Any]) -> None:
        """Store ``payloads`` in one MULTI/EXEC transaction (SET/MSET or HSET)."""
        if not payloads:
            return
        rows = list(dict(payloads).items())  # a later payload for a key wins
        with self._guard():
            pipe = self.client.pipeline(transaction=True)
            for i in range(0, len(rows), _CHUNK):
                chunk = dict(rows[i:i + _CHUNK])
                if self.hash_name is not None:
                    pipe.hset(self.hash_name, mapping=chunk)
                elif self.ttl_ms is None:
                    pipe.mset(chunk)  # one command per chunk: much faster than SETs
                else:
                    for key, value in chunk.items():
                        pipe.set(key, value, px=self.ttl_ms)
            pipe.execute()
