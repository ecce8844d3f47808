"""Exclusive leases: a process owns keys and works on them in-process until recalled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from .codec import decode_value, slot_of
from .near import local_value
from .transport import Op

if TYPE_CHECKING:
    from .client import Cache

__all__ = ["Lease"]

_packb = msgpack.packb


class Lease:
    """An exclusive lease on some keys; see ``Cache.lease``."""

    def __init__(self, cache: Cache, args_list: list[Any], ttl_ms: float) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms!r}")
        if not args_list:
            raise ValueError("lease() needs at least one key")
        self.cache = cache
        self.ttl_ms = ttl_ms
        self.keys = [cache._encode(a) for a in args_list]
        self.held = False

    def acquire(self) -> Lease:
        pool = self.cache._pool
        kbs = [kb for kb, _ in self.keys]
        with pool.owned_lock:
            if any(kb in pool.wanted for kb in kbs):
                raise ValueError("a key of this lease is already leased by this process")
            for kb in kbs:
                pool.wanted[kb] = self
        try:
            self._grant(self.keys)
        except BaseException:
            with pool.owned_lock:
                for kb in kbs:
                    pool.wanted.pop(kb, None)
            raise
        self.held = True
        return self

    def regrant(self, kb: bytes) -> list[Any] | None:
        """Take back a key a recall took away while this lease is held; its owned entry."""
        self._grant([k for k in self.keys if k[0] == kb])
        return self.cache._pool.owned.get(kb)

    def _grant(self, keys: list[tuple[bytes, bytes | None]]) -> None:
        cache, pool = self.cache, self.cache._pool
        pool.lease_ttl_ms = self.ttl_ms
        kbs = [kb for kb, _ in keys]
        with pool.released:
            pool.released.wait_for(lambda: pool.releasing.isdisjoint(kbs), timeout=60)
        groups: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for kb, ab in keys:
            groups.setdefault(cache._table[slot_of(kb)], []).append((kb, ab))
        cache.sync()  # our pipelined writes to these keys land before the lease is taken
        values = cache._scatter({s: _packb([Op.LEASE, [kb for kb, _ in g], pool.owner,
                                            self.ttl_ms]) for s, g in groups.items()})
        with pool.owned_lock:
            for s, g in groups.items():
                for (kb, ab), vb in zip(g, values[s]):
                    pool.owned[kb] = [local_value(decode_value(vb)), vb, False, s, ab]
        for s in groups:
            pool.ensure_poller(s)

    def flush(self) -> None:
        """Send the writes made under this lease to the shards, keeping the lease."""
        pool = self.cache._pool
        per_shard: dict[int, tuple[list[Any], list[bytes]]] = {}
        with pool.owned_lock:
            for kb, ab in self.keys:
                e = pool.owned.get(kb)
                if e is not None and e[2]:
                    per_shard.setdefault(e[3], ([], []))[0].append([kb, ab, e[1]])
                    e[2] = False
        self.cache._push_owned(per_shard, release=False)

    def release(self) -> None:
        """Send the writes made under this lease to the shards and give the keys back."""
        if not self.held:
            return
        self.held = False
        pool = self.cache._pool
        with pool.owned_lock:
            for kb, _ in self.keys:
                if pool.wanted.get(kb) is self:
                    del pool.wanted[kb]
        self.cache._push_owned(pool.take_owned([kb for kb, _ in self.keys]))
        errors = pool.lease_errors
        if errors:
            first = errors[0]
            del errors[:]
            raise first

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
