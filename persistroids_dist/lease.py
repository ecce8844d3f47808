"""Exclusive leases: this process owns keys and works on them in-process until recalled.

Everything a process knows about its leases on one cache lives in one ``Ownership``: which keys
it owns (``Owned`` records), which keys an active ``with cache.lease(...)`` wants back after a
recall, which releases are on their way, and the pollers that renew leases and answer recalls.
It reaches the shards through a narrow ``Router`` (the connection pool), never through a
``Cache``'s internals.

The shard side (the lease table, recalls, RELEASE) is ``ShardHost`` in ``actors.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol
from .codec import decode_value, encode_value
from .errors import LeaseLostError, MovedError, ShardUnavailableError
from .near import NO_VALUE, NearCache, local_value
from .transport import Connection

__all__ = ["Lease", "Owned", "Ownership", "Router"]


#: How long a lease poller outlives the last lease of its shard, in seconds.
POLLER_IDLE_S = 2.0


class Router(Protocol):
    """What leases need from the connection pool."""

    near: NearCache | None
    closed: bool

    def shard_for(self, kb: bytes) -> int:
        """The shard that owns key bytes ``kb``."""
        ...

    def scatter(self, frames: dict[int, bytes], errors: bool = False) -> dict[int, Any]:
        """Send one request per shard and collect the answers (one round trip); with
        ``errors``, a shard's error is returned in place of its answer, else raised."""
        ...

    def sync(self) -> None:
        """Wait until this process's pipelined writes were applied."""
        ...

    def refresh(self, min_epoch: int, force: bool = False) -> None:
        """Take the slot table of epoch ``min_epoch`` or later (after a reshard)."""
        ...

    def open_connection(self, shard: int) -> Connection:
        """A new connection of its own to ``shard`` (for a long poll)."""
        ...


@dataclass(slots=True)
class Owned:
    """A key this process owns: the only up-to-date copy of its value lives here."""

    value: Any  # the decoded value when immutable, else NO_VALUE (decode ``vb`` per read)
    vb: bytes  # the encoded value
    dirty: bool  # written here since the last push to the shard
    shard: int
    ab: bytes | None  # encoded read args (None: the key itself)
    gen: int  # the shard's generation of this grant: every RELEASE and renewal names it

    def get(self) -> Any:
        return decode_value(self.vb) if self.value is NO_VALUE else self.value

    def set(self, value: Any, vb: bytes) -> None:
        self.value, self.vb, self.dirty = local_value(value), vb, True


# per shard: (dirty writes to push as [kb, ab, vb, gen], grants given back as [kb, gen])
Pushes = dict[int, tuple[list[list[Any]], list[list[Any]]]]


class Ownership:
    """One process's exclusive leases on one cache."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.owner = os.urandom(16)
        self.owned: dict[bytes, Owned] = {}
        # Keys inside an active ``with cache.lease(...)``: a recall takes a key out of
        # ``owned``, and the next access here takes it back (as a CPU re-fetches a line).
        self.wanted: dict[bytes, Lease] = {}
        self.lock = threading.Lock()
        # Keys whose RELEASE is on its way to the shard: leasing one again must wait for it,
        # or the new lease could start from a value without the released writes.
        self.releasing: set[bytes] = set()
        self.released = threading.Condition(self.lock)
        self.ttl_ms = 5000.0
        self.errors: list[BaseException] = []
        self.pollers: dict[int, threading.Thread] = {}
        self._pollers_lock = threading.Lock()

    # -- in-process fast paths (called by Cache) --------------------------------------------
    def local(self, kb: bytes) -> Owned | None:
        """The owned record of ``kb``, taking it back first if a held lease lost it to a
        recall; None when this process does not lease ``kb``."""
        e = self.owned.get(kb)
        if e is None and kb in self.wanted:
            e = self.wanted[kb].regrant(kb)
        return e

    def write_local(self, kb: bytes, value: Any, vb: bytes) -> bool:
        """Apply a write in-process if ``kb`` is leased here; False if it is not."""
        while self.wanted:
            with self.lock:
                e = self.owned.get(kb)
                if e is not None:  # owned: stays here until release or recall
                    e.set(value, vb)
                    return True
            if kb not in self.wanted:
                return False
            self.wanted[kb].regrant(kb)  # recalled meanwhile: take it back, then retry
        return False

    def update_local(self, kb: bytes, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        """Apply ``fn`` in-process if ``kb`` is leased here: ``(True, new value)``."""
        while self.wanted:
            with self.lock:
                e = self.owned.get(kb)
                if e is not None:
                    value = fn(e.get())
                    e.set(value, encode_value(value))
                    return True, value
            if kb not in self.wanted:
                return False, None
            self.wanted[kb].regrant(kb)
        return False, None

    def raise_errors(self) -> None:
        """Raise (once) the first error a lease poller met."""
        if self.errors:
            first = self.errors[0]
            del self.errors[:]
            raise first

    # -- giving keys back -------------------------------------------------------------------
    def take(self, kbs: Iterable[bytes]) -> Pushes:
        """Stop owning ``kbs``; return per shard the dirty writes to push and the keys."""
        out: Pushes = {}
        near = self.router.near
        with self.lock:
            for kb in kbs:
                e = self.owned.pop(kb, None)
                if e is None:
                    continue
                self.releasing.add(kb)  # until done_releasing(): see Lease._grant()
                if near is not None:  # keep read-your-writes once the lease is gone
                    near.put(kb, e.vb)
                items, grants = out.setdefault(e.shard, ([], []))
                grants.append([kb, e.gen])
                if e.dirty:
                    items.append([kb, e.ab, e.vb, e.gen])
        return out

    def done_releasing(self, pushes: Pushes) -> None:
        with self.released:
            for _, grants in pushes.values():
                self.releasing.difference_update(kb for kb, _ in grants)
            self.released.notify_all()

    def regroup(self, pushes: Pushes) -> Pushes:
        """``pushes`` grouped by the shards that own their keys now (after a reshard)."""
        out: Pushes = {}
        shard_for = self.router.shard_for
        for items, grants in pushes.values():
            for item in items:
                out.setdefault(shard_for(item[0]), ([], []))[0].append(item)
            for grant in grants:
                out.setdefault(shard_for(grant[0]), ([], []))[1].append(grant)
        return out

    def push(self, pushes: Pushes, release: bool = True) -> None:
        """Send owned writes to their shards; with ``release``, give the keys back too.

        A shard that refuses its part as moved applied none of it (a reshard took those
        slots, and their grants, elsewhere): that part goes again, by the new table."""
        try:
            todo, failed = pushes, []
            for _ in range(100):
                frames = {s: protocol.release(self.owner, items, grants if release else [])
                          for s, (items, grants) in todo.items()}
                if not frames:
                    break
                out = self.router.scatter(frames, errors=True)
                moved = {s: r for s, r in out.items() if isinstance(r, MovedError)}
                failed += [r for r in out.values()
                           if isinstance(r, BaseException) and not isinstance(r, MovedError)]
                if not moved:
                    break
                self.router.refresh(max(e.epoch for e in moved.values()), force=True)
                todo = self.regroup({s: todo[s] for s in moved})
            else:
                raise ShardUnavailableError("lease: a push still refused as moved after 100 "
                                            "refreshes")
            if failed:
                raise failed[0]
        finally:
            if release:
                self.done_releasing(pushes)

    def release_all(self) -> None:
        """Give every owned key back (flush_now, shutdown)."""
        self.push(self.take(list(self.owned)))

    def _release_moved(self, pushes: Pushes, epoch: int) -> None:
        """Give back recalled grants that moved with their slots: by the new table, each on
        a connection of its own (a shared one may be waiting on this very recall)."""
        todo = pushes
        for _ in range(100):
            self.router.refresh(epoch)
            left: Pushes = {}
            for s, (items, grants) in self.regroup(todo).items():
                conn = self.router.open_connection(s)
                try:
                    conn.call(protocol.release(self.owner, items, grants))
                except MovedError as e:  # all or nothing per shard: nothing applied there
                    left[s] = (items, grants)
                    epoch = max(epoch, e.epoch)
                finally:
                    conn.close()
            if not left:
                return
            todo = left
        raise ShardUnavailableError("lease: a release still refused as moved after 100 "
                                    "refreshes")

    # -- renewals and recalls ---------------------------------------------------------------
    def ensure_poller(self, shard: int) -> None:
        with self._pollers_lock:  # a poller leaves under this lock too: none quits unnoticed
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
        idle_since = None
        try:
            conn = self.router.open_connection(shard)
            while not self.router.closed:
                with self._pollers_lock, self.lock:
                    grants = [[kb, e.gen] for kb, e in self.owned.items() if e.shard == shard]
                    if grants:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > POLLER_IDLE_S:
                        del self.pollers[shard]  # a later lease starts a new poller
                        return
                # Between leases the poller stays a while, so a process that leases in a
                # loop does not open a connection (and a thread) per lease.
                ttl = self.ttl_ms
                wait = ttl / 4 if grants else min(ttl / 4, POLLER_IDLE_S * 500)
                try:
                    recalled = conn.call(protocol.poll(self.owner, ttl, wait, grants))
                except MovedError as e:
                    self._rehome(shard, e.epoch)
                    continue
                if recalled:
                    self._answer(conn, shard, recalled)
        except LeaseLostError as e:
            self.errors.append(e)
        except OSError as e:  # the link broke (LinkError), or could not be opened
            if not self.router.closed:
                self.errors.append(e)
        finally:
            if conn is not None:
                conn.close()
            with self._pollers_lock:
                if self.pollers.get(shard) is threading.current_thread():
                    del self.pollers[shard]  # left by an error

    def _rehome(self, shard: int, epoch: int) -> None:
        """A reshard moved grants of ``shard`` with their slots (the shard refused to renew
        them): take the new table, point those leases at their new shards and poll there."""
        self.router.refresh(epoch)
        moved: set[int] = set()
        with self.lock:
            for kb, e in self.owned.items():
                if e.shard == shard and (now := self.router.shard_for(kb)) != shard:
                    e.shard = now
                    moved.add(now)
        for s in moved:
            self.ensure_poller(s)
        if not moved:
            time.sleep(0.01)  # refused before the table changed hands: ask again soon

    def _answer(self, conn: Connection, shard: int, recalled: list[list[Any]]) -> None:
        """Give back the recalled grants this process holds, with their writes.

        Only grants held here are released, each by its generation. A recalled key that is
        not held is either on its way back already (a lease's exit RELEASE, which carries
        the writes: releasing it here first would let a waiting client read the old value
        and get the writes refused) or its grant's answer is still on its way to this
        process; either way the next poll sees it again, so wait a little for that first.
        """
        with self.lock:
            mine = [kb for kb, gen in recalled
                    if (e := self.owned.get(kb)) is not None and e.gen == gen]
        taken = self.take(mine)
        try:
            if taken:
                items, grants = taken[shard]
                try:
                    conn.call(protocol.release(self.owner, items, grants))
                except MovedError as e:
                    self._release_moved(taken, e.epoch)
        finally:
            self.done_releasing(taken)
        if len(mine) < len(recalled):
            others = {kb for kb, _ in recalled} - set(mine)
            with self.released:
                if self.releasing.isdisjoint(others):
                    self.released.wait(0.001)  # a grant's answer in flight: poll again soon
                else:
                    self.released.wait_for(lambda: self.releasing.isdisjoint(others), 0.05)


class Lease:
    """An exclusive lease on some keys; see ``Cache.lease``."""

    def __init__(self, ownership: Ownership, keys: list[tuple[bytes, bytes | None]],
                 ttl_ms: float) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms!r}")
        if not keys:
            raise ValueError("lease() needs at least one key")
        self.ownership = ownership
        self.ttl_ms = ttl_ms
        self.keys = keys
        self.held = False

    def acquire(self) -> Lease:
        own = self.ownership
        kbs = [kb for kb, _ in self.keys]
        with own.lock:
            if any(kb in own.wanted for kb in kbs):
                raise ValueError("a key of this lease is already leased by this process")
            for kb in kbs:
                own.wanted[kb] = self
        try:
            self._grant(self.keys)
        except BaseException:
            with own.lock:
                for kb in kbs:
                    own.wanted.pop(kb, None)
            raise
        self.held = True
        return self

    def regrant(self, kb: bytes) -> Owned | None:
        """Take back a key a recall took away while this lease is held; its owned record."""
        self._grant([k for k in self.keys if k[0] == kb])
        return self.ownership.owned.get(kb)

    def _grant(self, keys: list[tuple[bytes, bytes | None]]) -> None:
        own = self.ownership
        router = own.router
        own.ttl_ms = self.ttl_ms
        kbs = [kb for kb, _ in keys]
        with own.released:
            own.released.wait_for(lambda: own.releasing.isdisjoint(kbs), timeout=60)
        router.sync()  # our pipelined writes to these keys land before the lease is taken
        for _ in range(100):
            groups: dict[int, list[tuple[bytes, bytes | None]]] = {}
            for kb, ab in keys:
                groups.setdefault(router.shard_for(kb), []).append((kb, ab))
            try:
                answers = router.scatter({s: protocol.lease([kb for kb, _ in g], own.owner,
                                                            self.ttl_ms)
                                          for s, g in groups.items()})
                break
            except MovedError as e:
                # A reshard moves (or moved) a slot of these keys: wait for its table and
                # ask again (a grant made meanwhile on another shard is simply renewed).
                if e.slot >= 0:
                    router.refresh(e.epoch, force=True)
        else:
            raise ShardUnavailableError("lease: still refused as moved after 100 refreshes")
        with own.lock:
            for s, g in groups.items():
                gen, values = answers[s]
                for (kb, ab), vb in zip(g, values):
                    own.owned[kb] = Owned(local_value(decode_value(vb)), vb, False, s, ab, gen)
        for s in groups:
            own.ensure_poller(s)

    def flush(self) -> None:
        """Send the writes made under this lease to the shards, keeping the lease."""
        own = self.ownership
        pushes: Pushes = {}
        with own.lock:
            for kb, ab in self.keys:
                e = own.owned.get(kb)
                if e is not None and e.dirty:
                    pushes.setdefault(e.shard, ([], []))[0].append([kb, ab, e.vb, e.gen])
                    e.dirty = False
        own.push(pushes, release=False)

    def release(self) -> None:
        """Send the writes made under this lease to the shards and give the keys back."""
        if not self.held:
            return
        self.held = False
        own = self.ownership
        with own.lock:
            for kb, _ in self.keys:
                if own.wanted.get(kb) is self:
                    del own.wanted[kb]
        own.push(own.take([kb for kb, _ in self.keys]))
        own.raise_errors()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
