"""Per-process connection pools: one connection per shard, shared by every handle of a cache
in the process, plus this process's exclusive-lease bookkeeping and the write linger thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgpack
import ray

from .errors import CacheClosedError, LeaseLostError
from .near import NearCache
from .transport import Connection, Op

if TYPE_CHECKING:
    from .lease import Lease

__all__ = ["LINGER", "Pool", "pool_for"]

_packb = msgpack.packb


class Pool:
    """One process's connections to the shards of one cache."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.addresses: list[dict[str, Any]] = list(spec["addresses"])
        self.conns: list[Connection | None] = [None] * spec["num_shards"]
        self.lock = threading.Lock()
        self.closed = False
        self.near: NearCache | None = None
        # Keys this process owns under an exclusive lease: kb -> [value, vb, dirty, shard, ab].
        self.owned: dict[bytes, list[Any]] = {}
        # Keys inside an active ``with cache.lease(...)``: a recall takes a key out of
        # ``owned``, and the next access here takes it back (as a CPU re-fetches a line).
        self.wanted: dict[bytes, Lease] = {}
        self.owned_lock = threading.Lock()
        # Keys whose RELEASE is on its way to the shard: leasing one again must wait for it,
        # or the new lease could start from a value without the released writes.
        self.releasing: set[bytes] = set()
        self.released = threading.Condition(self.owned_lock)
        self.owner = os.urandom(16)
        self.lease_ttl_ms = 5000.0
        self.lease_errors: list[BaseException] = []
        self.pollers: dict[int, threading.Thread] = {}

    def conn(self, shard: int) -> Connection:
        c = self.conns[shard]
        if c is not None and not c.closed:
            return c
        with self.lock:
            if self.closed:
                raise CacheClosedError(f"cache {self.spec['name']!r} was shut down")
            c = self.conns[shard]
            if c is None or c.closed:
                try:
                    c = Connection(self.addresses[shard], self.spec["secret"])
                except (ConnectionError, FileNotFoundError, OSError):
                    self.addresses[shard] = self._resolve(shard)
                    c = Connection(self.addresses[shard], self.spec["secret"])
                self.conns[shard] = c
            return c

    def _resolve(self, shard: int) -> dict[str, Any]:
        # The shard may have been restarted by Ray with a new socket: ask it where it is.
        try:
            return ray.get(self.spec["shards"][shard].address.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise CacheClosedError(
                f"cache {self.spec['name']!r}: shard {shard} is gone ({type(e).__name__}); "
                "was the cache shut down?") from None

    def drop(self, shard: int) -> None:
        c = self.conns[shard]
        if c is not None:
            c.close()
        self.conns[shard] = None

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for i in range(len(self.conns)):
                self.drop(i)
        with _POOLS_LOCK:
            if _POOLS.get((self.spec["name"], self.spec["secret"])) is self:
                del _POOLS[(self.spec["name"], self.spec["secret"])]

    def take_owned(self, kbs: Iterable[bytes]) -> dict[int, tuple[list[Any], list[bytes]]]:
        """Stop owning ``kbs``; return per shard the dirty writes to push and the keys."""
        out: dict[int, tuple[list[Any], list[bytes]]] = {}
        with self.owned_lock:
            for kb in kbs:
                e = self.owned.pop(kb, None)
                if e is None:
                    continue
                self.releasing.add(kb)  # until done_releasing(): see Lease._grant()
                if self.near is not None:  # keep read-your-writes once the lease is gone
                    self.near.put(kb, e[1])
                items, keys = out.setdefault(e[3], ([], []))
                keys.append(kb)
                if e[2]:
                    items.append([kb, e[4], e[1]])
        return out

    def done_releasing(self, per_shard: dict[int, tuple[list[Any], list[bytes]]]) -> None:
        with self.released:
            for _, keys in per_shard.values():
                self.releasing.difference_update(keys)
            self.released.notify_all()

    def ensure_poller(self, shard: int) -> None:
        with self.lock:  # a poller leaves under this lock too: none can quit unnoticed
            t = self.pollers.get(shard)
            if t is None:
                t = threading.Thread(target=self._poll_loop, args=(shard,), daemon=True,
                                     name=f"persistroids-lease-{shard}")
                self.pollers[shard] = t
                t.start()

    def _poll_loop(self, shard: int) -> None:
        """Renew this process's leases on ``shard`` and answer recalls as soon as they come
        (a long poll on a connection of its own)."""
        conn = None
        try:
            conn = Connection(self.addresses[shard], self.spec["secret"])
            while not self.closed:
                with self.lock, self.owned_lock:
                    if not any(e[3] == shard for e in self.owned.values()):
                        del self.pollers[shard]  # a later lease starts a new poller
                        return
                ttl = self.lease_ttl_ms
                recalled = conn.call(_packb([Op.POLL, self.owner, ttl, ttl / 4]))
                if recalled:
                    # Keys no longer owned here are released too: the shard still has them.
                    taken = self.take_owned(recalled)
                    try:
                        items = taken.get(shard, ([], []))[0]
                        conn.call(_packb([Op.RELEASE, self.owner, items, recalled]))
                    finally:
                        self.done_releasing(taken)
        except LeaseLostError as e:
            self.lease_errors.append(e)
        except (ConnectionError, OSError) as e:
            if not self.closed:
                self.lease_errors.append(e)
        finally:
            if conn is not None:
                conn.close()
            with self.lock:
                if self.pollers.get(shard) is threading.current_thread():
                    del self.pollers[shard]  # left by an error


_POOLS: dict[tuple[str, bytes], Pool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(spec: dict[str, Any]) -> Pool:
    key = (spec["name"], spec["secret"])
    pool = _POOLS.get(key)
    if pool is None or pool.closed:
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is None or pool.closed:
                pool = _POOLS[key] = Pool(spec)
    return pool


class Linger:
    """Sends queued writes that no batch-size limit or later request has sent, a short
    ``delay`` after the first of them was queued (one daemon thread per process)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cond = threading.Condition()
        self.armed: list[Connection] = []
        self.thread: threading.Thread | None = None

    def arm(self, conn: Connection) -> None:
        with self.cond:
            self.armed.append(conn)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="persistroids-linger")
                self.thread.start()
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.armed:
                    self.cond.wait()
            time.sleep(self.delay)
            with self.cond:
                armed, self.armed = self.armed, []
            for conn in armed:
                with conn.lock:
                    if conn.closed:
                        continue
                    try:
                        conn.send_queue()
                    except (ConnectionError, OSError) as e:
                        conn.deferred.append(ConnectionError(f"queued writes were lost: {e}"))
                        conn.close()


LINGER = Linger(0.001)
