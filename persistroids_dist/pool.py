"""Per-process connection pools: one connection per shard, shared by every handle of a cache
in the process (with the routing table and this process's leases), and the write linger
thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import msgpack

from . import control
from .codec import NUM_SLOTS, slot_of
from .errors import (
    AuthenticationError,
    CacheClosedError,
    MovedError,
    ShardUnavailableError,
    UnacknowledgedWritesError,
)
from .lease import Ownership
from .near import NearCache
from .protocol import Op
from .spec import CacheSpec
from .transport import Connection, LinkError

__all__ = ["LINGER", "Pool", "pool_for", "slot_table"]


def slot_table(num_shards: int) -> list[int]:
    """Contiguous slot ranges per shard (resharding later moves ranges of slots)."""
    return [slot * num_shards // NUM_SLOTS for slot in range(NUM_SLOTS)]


class Pool:
    """One process's connections to the shards of one cache."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec = CacheSpec.of(spec)
        self.addresses: list[dict[str, Any]] = list(spec.addresses)
        self.conns: list[Connection | None] = [None] * spec.num_shards
        self.lock = threading.Lock()
        self.closed = False
        self.near: NearCache | None = None
        self.table = slot_table(spec.num_shards)
        self.epoch = spec.epoch  # the table's: a reshard makes a new one (``refresh``)
        self.refresh_lock = threading.Lock()
        self.leases = Ownership(self)
        # Per shard, writes sent on a connection that broke before answering them; and errors
        # reported for pipelined writes on such a connection. ``sync()`` raises them.
        self.lost: dict[int, int] = {}
        self.lost_errors: list[BaseException] = []

    @property
    def num_shards(self) -> int:
        return len(self.conns)

    def conn(self, shard: int) -> Connection:
        # A refresh may swap the lists for shorter ones (a shrink) at any time: each is read
        # once, and an index past its end means the caller routed by the table it replaced.
        conns = self.conns
        if shard >= len(conns):  # routed by a table a reshard just replaced: again
            raise MovedError(shard, self.epoch, -1)
        c = conns[shard]
        if c is not None and not c.closed:
            return c
        with self.lock:
            if self.closed:
                raise CacheClosedError(f"cache {self.spec.name!r} was shut down")
            if shard >= len(self.conns):
                raise MovedError(shard, self.epoch, -1)
            c = self.conns[shard]
            if c is not None and c.closed:  # closed by the linger thread: a send failed
                self._retire(shard, c)
            if c is None or c.closed:
                c = self.conns[shard] = self._open(shard)
            return c

    def _open(self, shard: int, spec: CacheSpec | None = None) -> Connection:
        """Connect to ``shard``, finding it through Ray if it moved, and waiting up to the
        cache's ``shard_wait_s`` while Ray restarts it (the connection's own retries, see
        ``Connection._recover``). A shard that is gone or refuses the secret raises what
        says so; any other failure is ShardUnavailableError. ``spec``: the cache as of the
        table the connection is for (default: this pool's now)."""
        try:
            return self._connect(shard, self.spec if spec is None else spec)
        except LinkError as e:
            cause = e.__cause__
            if isinstance(cause, (AuthenticationError, CacheClosedError,
                                  ShardUnavailableError)):
                raise cause from None
            raise ShardUnavailableError(
                f"cache {self.spec.name!r}: could not connect to shard {shard}: {e}") from e

    def _connect(self, shard: int, spec: CacheSpec) -> Connection:
        """A connection to ``shard`` that resumes itself if the shard restarts (waiting up to
        the cache's ``shard_wait_s``), resending what it had not had answered."""
        addresses = self.addresses
        if shard >= len(addresses):  # a shrink's refresh is under way: route again
            raise MovedError(shard, self.epoch, -1)
        return Connection(addresses[shard], spec.secret,
                          resolve=lambda: self._resolve(spec, shard), wait_s=spec.shard_wait_s,
                          node_id=control.local_node_id(), tls=spec.tls)

    def _resolve(self, spec: CacheSpec, shard: int) -> dict[str, Any]:
        # The shard may have been restarted by Ray with a new socket: ask it where it is, by
        # the cache as the connection knew it. A shard a shrink retired since is still there
        # (it refuses every key as moved) and answers what it was sent; the pool's newer
        # spec no longer lists it (CI found the IndexError of asking that one).
        address = control.resolve_address(spec, shard)
        addresses = self.addresses
        if shard < len(addresses):  # shard indexes outlive a reshard: the same actor
            addresses[shard] = address
        return address

    def settle(self) -> None:
        """Return once no slot table refresh is under way (one another thread runs)."""
        with self.refresh_lock:
            pass

    def drop(self, shard: int) -> None:
        """Close the connection to ``shard`` (the next use reconnects); writes it had not
        had answered are recorded as lost for ``sync()``."""
        if shard >= len(self.conns):  # a shrink retired it: its refresh closed it, drained
            return
        c = self.conns[shard]
        if c is not None:
            c.close()
            self._retire(shard, c)
        self.conns[shard] = None

    def _retire(self, shard: int, c: Connection) -> None:
        n = c.unaccounted()
        if n:
            self.lost[shard] = self.lost.get(shard, 0) + n
        self.lost_errors.extend(e for e in c.deferred if not isinstance(e, ConnectionError))
        c.queue, c.inflight, c.deferred, c.moved = [], deque(), [], []

    def raise_lost(self) -> None:
        """Raise, once, what ``drop`` recorded: UnacknowledgedWritesError naming every shard
        that broke with writes unanswered, else the first error of a pipelined write."""
        if self.lost:
            lost, self.lost = self.lost, {}
            self.lost_errors.clear()
            (shard, n), *rest = sorted(lost.items())
            raise UnacknowledgedWritesError(
                shard, n, "; ".join(f"shard {s} also lost {k}" for s, k in rest))
        if self.lost_errors:
            first = self.lost_errors[0]
            self.lost_errors.clear()
            raise first

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for i in range(len(self.conns)):
                self.drop(i)
        with _POOLS_LOCK:
            if _POOLS.get((self.spec.name, self.spec.secret)) is self:
                del _POOLS[(self.spec.name, self.spec.secret)]

    # -- the routing interface leases use (lease.Router) -------------------------------------
    def shard_for(self, kb: bytes) -> int:
        return self.table[slot_of(kb)]

    def open_connection(self, shard: int) -> Connection:
        return self._open(shard)

    def scatter(self, frames: dict[int, bytes], errors: bool = False) -> dict[int, Any]:
        """Send one request per shard, then collect the answers: one round trip overall.

        A shard's error is raised (after every answer was read), or with ``errors`` returned
        in place of its answer."""
        conns = [(s, self.conn(s)) for s in sorted(frames)]
        held = []
        try:
            for _, c in conns:  # sorted order: no deadlock with another thread doing the same
                c.lock.acquire()
                held.append(c)
            for s, c in conns:
                c.begin(frames[s])
            out: dict[int, Any] = {}
            for s, c in conns:
                try:
                    out[s] = c.finish()
                except LinkError:
                    raise
                except Exception as e:  # the shard's answer was an error
                    out[s] = e
            if not errors:
                for r in out.values():
                    if isinstance(r, BaseException):
                        raise r
            return out
        except LinkError as e:
            for s, _ in conns:
                self.drop(s)
            raise ShardUnavailableError(f"cache {self.spec.name!r}: lost a shard: {e}") from e
        finally:
            for c in held:
                c.lock.release()

    # -- resharding ------------------------------------------------------------------------
    def catch_up(self) -> None:
        """Take the cache's current slot table if a reshard made a newer one than this
        process's (a call to every shard would otherwise miss the shards it added)."""
        coordinator = self.spec.coordinator
        if coordinator is not None:
            try:
                epoch = control.get(coordinator.epoch.remote())
            except CacheClosedError:
                # Its coordinator is gone for good (a crash of one Ray does not restart): no
                # reshard can happen without it, so this table is current, and the shards,
                # reached over their sockets, still answer.
                return
            if epoch > self.epoch:
                self.refresh(epoch)

    def refresh_if_moved(self) -> None:
        """If a shard refused pipelined requests of this process (the cache was resharded),
        take the new table and resend them (see ``refresh``)."""
        epoch = max((c.moved_epoch for c in self.conns if c is not None and c.moved),
                    default=0)
        if epoch:  # no newer table to wait for if another thread took it already
            self.refresh(epoch, force=True)

    def refresh(self, min_epoch: int, force: bool = False) -> None:
        """Take the cache's slot table of epoch ``min_epoch`` or later from its coordinator
        (waiting while a reshard publishes it), and switch to it without reordering this
        process's writes: every connection's lock is taken (index order, as ``scatter``
        does), every connection drained (pipelined requests refused as moved are collected,
        in order), the table swapped, the refused requests resent by it, then the locks
        released. Write paths check the epoch again under their connection's lock, so none
        sends by the old table after the swap. ``force``: resend refused requests even if
        the table is current already."""
        with self.refresh_lock:
            if self.epoch >= min_epoch and not force:
                return
            spec = self.spec
            if self.epoch < min_epoch:
                spec = control.spec_at(self.spec, min_epoch)
            n = spec.num_shards
            with self.lock:
                old = list(self.conns)
            held = [c for c in old if c is not None]
            for c in held:
                c.lock.acquire()
            fresh: list[Connection] = []
            try:
                moved: list[list[Any]] = []
                for shard, c in enumerate(old):
                    if c is None or c.closed:
                        continue
                    try:
                        c.send_queue()
                        c._drain()
                    except LinkError:
                        self._retire(shard, c)  # counted as unacknowledged, as ever
                        c.close()
                        continue
                    moved.extend(c.moved)
                    c.moved, c.moved_epoch = [], 0
                # What was refused goes again by the new table, before any other thread
                # can send by it: every connection it goes to is opened (with the new
                # addresses) and held before the table is swapped.
                table = slot_table(n)
                resends = list(self._rerouted(moved, table))
                conns = (old + [None] * n)[:n]
                self.addresses = list(spec.addresses)
                for shard in sorted({r[0] for r in resends}):
                    c = conns[shard]
                    if c is None or c.closed:
                        c = conns[shard] = self._open(shard, spec)
                    if c not in held:
                        c.lock.acquire()
                        fresh.append(c)
                with self.lock:
                    self.spec = spec
                    self.conns = conns
                    for c in old[n:]:  # shards a shrink retired: everything is answered
                        if c is not None:
                            c.close()
                    self.table = table
                    self.epoch = spec.epoch
                for shard, frame, writes, resend in resends:
                    conns[shard].send(frame, writes, resend)
            finally:
                for c in held + fresh:
                    c.lock.release()

    @staticmethod
    def _rerouted(entries: list[list[Any]], table: list[int]) -> Any:
        """``(shard, frame, writes, resend)`` per request to resend for refused ``entries``
        (``Connection.inflight`` records), by ``table``: a batch of writes is split by
        shard, in order; any other request goes whole, where its key belongs now."""
        for writes, frame, _, resend in entries:
            req = msgpack.unpackb(frame, raw=False)
            if req[0] == Op.WRITE_MANY:
                by_shard: dict[int, list[Any]] = {}
                for item in req[1]:
                    by_shard.setdefault(table[slot_of(item[0])], []).append(item)
                for shard, items in by_shard.items():  # a checkpoint state goes with each
                    yield shard, msgpack.packb([Op.WRITE_MANY, items, *req[2:]]), len(items), \
                        None
            else:  # an update's function goes with it: the new shard may not know it
                yield table[slot_of(req[1])], resend() if resend else frame, writes, None

    def sync(self) -> None:
        """Wait until every write this process pipelined was answered; raise
        UnacknowledgedWritesError if a shard was lost before answering some of them. Writes
        a shard refused because the cache was resharded are resent where they belong."""
        for _ in range(100):
            self._sync_once()
            if not any(c is not None and c.moved for c in self.conns):
                return
            self.refresh_if_moved()
        raise ShardUnavailableError(f"cache {self.spec.name!r}: writes kept being refused as "
                                    "moved after 100 refreshes of the slot table")

    def _sync_once(self) -> None:
        first: BaseException | None = None
        for shard, conn in enumerate(self.conns):
            if conn is None:
                continue
            with conn.lock:
                if conn.closed:
                    self.drop(shard)
                    continue
                try:
                    conn.sync()
                except LinkError:
                    self.drop(shard)
                except Exception as e:  # a shard refused a pipelined write: sync the rest
                    first = first or e
        self.raise_lost()
        if first is not None:
            raise first

    # Kept for callers that look at the process's owned keys directly.
    @property
    def owned(self) -> dict[bytes, Any]:
        return self.leases.owned

    @property
    def wanted(self) -> dict[bytes, Any]:
        return self.leases.wanted


_POOLS: dict[tuple[str, bytes], Pool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(spec: CacheSpec) -> Pool:
    key = (spec.name, spec.secret)
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
                    except LinkError as e:
                        conn.deferred.append(ConnectionError(f"queued writes were lost: {e}"))
                        conn.close()


LINGER = Linger(0.001)
