"""The ``Cache`` handle: routes reads and writes to shards over their sockets.

A handle is cheap and picklable: passing it to a Ray task or actor ships its spec (names,
addresses, actor handles, the secret), and the receiving process opens its own connections on
first use. All handles of one cache in one process share one connection per shard, so the
process sees its own writes in order (read-your-writes).
"""

from __future__ import annotations

import functools
import hashlib
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import IO, Any

from ray import cloudpickle  # the serializer only: no Ray calls on the data path

from . import control, protocol
from . import progress as progress_bars
from .checkpoints import CheckpointInfo, encode_state
from .codec import NUM_SLOTS, decode_value, encode_key, encode_value, slot_of
from .errors import (
    CacheClosedError,
    MovedError,
    PicklingRefusedError,
    ShardUnavailableError,
    WriteError,
)
from .lease import Lease
from .metrics_view import Metrics
from .near import NO_VALUE, NearCache
from .pool import LINGER, pool_for
from .spec import CacheSpec
from .transport import Connection, LinkError

__all__ = ["Cache", "NAMESPACE"]

NAMESPACE = control.NAMESPACE  # the Ray namespace of every cache's actors

_NO_CHECKPOINT = object()
_monotonic = time.monotonic


def _rebuild(spec: CacheSpec, near: tuple[float, int] | None = None) -> Cache:
    return Cache(spec, near)



_MAX_REROUTES = 100


def _rerouted(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` again after a shard refused it as moved (the cache was resharded):
    the refusal applied nothing, the pool takes the new slot table (resending this
    process's refused pipelined writes first, in order), and the call is routed again."""
    @functools.wraps(method)
    def call(self: Cache, *args: Any, **kwargs: Any) -> Any:
        for _ in range(_MAX_REROUTES):
            try:
                return method(self, *args, **kwargs)
            except MovedError as e:
                if e.slot >= 0:
                    self._pool.refresh(e.epoch, force=True)
                else:  # routed by a table this process is replacing: again, by the new one
                    self._pool.settle()
        raise ShardUnavailableError(f"cache {self.name!r}: still routed to the wrong shard "
                                    f"after {_MAX_REROUTES} refreshes of the slot table")
    return call

class Cache:
    """A handle on a sharded cache. Create one with ``persistroids_dist.init`` or ``connect``.

    Consistency: every operation on a key runs in the shard that owns it, one at a time, so
    each key is linearizable. ``write`` is pipelined: it returns once the request is on the
    socket, and this process's later reads (any thread, any handle) see it; other processes
    see it once the shard applied it, which ``sync()`` waits for (``write(..., wait=True)``
    waits for that one write). ``update`` and every read wait for the shard's answer.
    """

    def __init__(self, spec: CacheSpec | Mapping[str, Any],
                 near: tuple[float, int] | None = None) -> None:
        self._spec = spec = CacheSpec.of(spec)
        self.name: str = spec.name
        self._cache_key: Callable[[Any], Any] | None = spec.cache_key
        self._pool = pool_for(spec)
        self._fns: dict[int, tuple[Any, bytes, bytes]] = {}
        self._near_opts = near
        self._near: NearCache | None = None
        self._near_ttl = 0.0
        if near is not None:
            lease_ms, max_entries = near
            if lease_ms <= 0 or max_entries < 1:
                raise ValueError(f"near() needs lease_ms > 0 and max_entries >= 1, got "
                                 f"lease_ms={lease_ms!r}, max_entries={max_entries!r}")
            pool = self._pool  # one near cache per process and cache, shared by all handles
            if pool.near is None:
                pool.near = NearCache(max_entries)
            else:
                pool.near.max_entries = max(pool.near.max_entries, max_entries)
            self._near = pool.near
            self._near_ttl = lease_ms / 1000

    def __reduce__(self) -> tuple[Any, ...]:
        # The pool's spec: the newest slot table this process knows (after a reshard).
        return (_rebuild, (self._pool.spec, self._near_opts))

    @property
    def num_shards(self) -> int:
        """How many shards serve the cache now (as this process last learnt)."""
        return self._pool.num_shards

    @property
    def _table(self) -> list[int]:
        return self._pool.table

    def near(self, lease_ms: float = 50.0, max_entries: int = 100_000) -> Cache:
        """A handle whose reads are served from a near cache in this process.

        A value read (or written) here is reused for ``lease_ms`` without asking its shard:
        this process reads its own writes, and sees another process's write at most
        ``lease_ms`` late (bounded staleness). Use ``lease()`` when no staleness is allowed.
        """
        return Cache(self._spec, near=(float(lease_ms), int(max_entries)))

    def __repr__(self) -> str:
        return f"Cache(name={self.name!r}, num_shards={self.num_shards})"

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- routing ----------------------------------------------------------------------------
    def _encode(self, args: Any) -> tuple[bytes, bytes | None]:
        if self._cache_key is None:
            return encode_key(args), None
        return encode_key(self._cache_key(args)), encode_value(args)

    def shard_of(self, args: Any) -> int:
        """The index of the shard that owns ``args``' key."""
        return self._table[slot_of(self._encode(args)[0])]

    def _lost(self, shard: int, error: BaseException) -> ShardUnavailableError:
        """Forget the broken connection to ``shard`` (the next call reconnects, finding a
        restarted shard through Ray) and describe the loss."""
        self._pool.drop(shard)
        return ShardUnavailableError(f"cache {self.name!r}: lost shard {shard}: {error}")

    def _call(self, shard: int, frame: bytes) -> Any:
        # The connection resumes itself through a shard restart (waiting up to
        # shard_wait_s); a LinkError means the shard did not come back.
        conn = self._pool.conn(shard)
        try:
            with conn.lock:
                return conn.call(frame)
        except LinkError as e:
            raise self._lost(shard, e) from e

    # -- reads ------------------------------------------------------------------------------
    @_rerouted
    def read(self, args: Any, *, checkpoint: Any = _NO_CHECKPOINT) -> Any:
        """Return the value for ``args``: from the cache, else the stores (merged), else
        ``init_fn(args)``. A cached None is a hit."""
        if checkpoint is not _NO_CHECKPOINT and not self._spec.allow_pickle:
            raise self._refused("checkpoint=")
        kb, ab = self._encode(args)
        leases = self._pool.leases
        if leases.wanted:
            e = leases.local(kb)
            if e is not None:  # an exclusive lease: this process holds the only copy
                return e.get()
        near = self._near
        if near is not None and checkpoint is _NO_CHECKPOINT:
            hit = near.get(kb, self._near_ttl)
            if hit is not None:
                return decode_value(hit[0]) if hit[2] is NO_VALUE else hit[2]
        shard = self._table[slot_of(kb)]
        if checkpoint is _NO_CHECKPOINT:
            frame = protocol.read(kb, ab)
        else:
            frame = protocol.read(kb, ab, cloudpickle.dumps(checkpoint))
        sent = _monotonic()
        vb = self._call(shard, frame)
        value = decode_value(vb)
        if near is not None:
            near.put(kb, vb, value, sent)
        return value

    @_rerouted
    def read_many(self, args_list: Iterable[Any]) -> list[Any]:
        """Read many keys with one round trip per shard (all shards in parallel)."""
        if self._cache_key is None and self._near is None and not self._pool.leases.owned:
            return self._read_many_plain(args_list)
        groups: dict[int, tuple[list[int], list[bytes], list[bytes | None]]] = {}
        n = 0
        near = self._near
        owned = self._pool.leases.owned
        out: list[Any] = []
        for i, args in enumerate(args_list):
            kb, ab = self._encode(args)
            n = i + 1
            out.append(None)
            e = owned.get(kb) if owned else None
            if e is not None:
                out[i] = e.get()
                continue
            if near is not None:
                hit = near.get(kb, self._near_ttl)
                if hit is not None:
                    out[i] = decode_value(hit[0]) if hit[2] is NO_VALUE else hit[2]
                    continue
            g = groups.get(s := self._table[slot_of(kb)])
            if g is None:
                g = groups[s] = ([], [], [])
            g[0].append(i)
            g[1].append(kb)
            g[2].append(ab)
        del out[n:]
        if not groups:
            return out
        sent = _monotonic()
        results = self._scatter({s: protocol.read_many(g[1], g[2] if self._cache_key else None)
                                 for s, g in groups.items()})
        for s, res in results.items():
            kbs = groups[s][1]
            for j, (i, vb) in enumerate(zip(groups[s][0], res)):
                out[i] = value = decode_value(vb)
                if near is not None:
                    near.put(kbs[j], vb, value, sent)
        return out

    def _read_many_plain(self, args_list: Iterable[Any]) -> list[Any]:
        """``read_many``'s common case, kept lean (it runs once per key): the keys are the
        args, no near cache, no key leased here (a lease taken meanwhile is recalled by its
        shard, so the answer is still current)."""
        table, crc32 = self._table, zlib.crc32
        n = table[-1] + 1  # this table's shard count (a reshard may swap both meanwhile)
        idxs: list[list[int]] = [[] for _ in range(n)]
        kbss: list[list[bytes]] = [[] for _ in range(n)]
        count = 0
        for i, args in enumerate(args_list):
            kb = encode_key(args)
            s = table[crc32(kb) % NUM_SLOTS]  # codec.slot_of, inlined
            idxs[s].append(i)
            kbss[s].append(kb)
            count = i + 1
        out: list[Any] = [None] * count
        frames = {s: protocol.read_many_values(kbs) for s, kbs in enumerate(kbss) if kbs}
        if frames:
            for s, values in self._scatter(frames).items():  # decoded with the frame
                for i, value in zip(idxs[s], values):
                    out[i] = value
        return out

    def _everywhere(self, frame: bytes) -> dict[int, Any]:
        """Send ``frame`` to every shard serving the cache now: first catch up with a
        reshard this process has not met yet (one question to the coordinator)."""
        self._pool.catch_up()
        return self._scatter(dict.fromkeys(range(self.num_shards), frame))

    def _scatter(self, frames: dict[int, bytes]) -> dict[int, Any]:
        """Send one request per shard, then collect the answers: one round trip overall."""
        return self._pool.scatter(frames)

    # -- writes -----------------------------------------------------------------------------
    @_rerouted
    def write(self, args: Any, value: Any, *, wait: bool = False,
              checkpoint: Any = _NO_CHECKPOINT, ttl_s: float | None = None) -> Any:
        """Cache ``value`` for ``args`` and buffer it for every store; return ``value``.

        ``ttl_s``: this entry's time to live in the cache (default: the cache's ``ttl_s``);
        once expired, a read asks the stores again. Raises TypeError at once, sending
        nothing, if the key or value cannot be encoded.
        """
        if checkpoint is not _NO_CHECKPOINT and not self._spec.allow_pickle:
            raise self._refused("checkpoint=")
        kb, ab = self._encode(args)
        vb = encode_value(value)
        pool = self._pool
        if ttl_s is not None:
            _check_ttl(ttl_s)
        elif pool.leases.wanted and pool.leases.write_local(kb, value, vb):
            return value
        if pool.near is not None:
            pool.near.put(kb, vb, value)
        shard = self._table[slot_of(kb)]
        if checkpoint is not _NO_CHECKPOINT:
            self._call(shard, protocol.write(kb, ab, vb, cloudpickle.dumps(checkpoint), ttl_s))
            return value
        if wait:
            self._call(shard, protocol.write(kb, ab, vb, None, ttl_s))
            return value
        item = [kb, ab, vb] if ttl_s is None else [kb, ab, vb, ttl_s]
        conn, first = self._pipelined(kb, lambda c: c.queue_write(item))
        if first:
            LINGER.arm(conn)
        return value

    def _pipelined(self, kb: bytes, send: Callable[[Connection], Any]) -> tuple[Any, Any]:
        """``send(conn)`` on the connection to ``kb``'s shard, under its lock, routed by the
        table current under that lock: a reshard's refresh swaps the table holding every
        connection's lock, so a request routed by the old table never goes out after it
        (it would overtake nothing, but could land after this process's newer writes of
        the same key). Afterwards, requests a shard refused as moved are resent."""
        pool = self._pool
        while True:
            epoch = pool.epoch
            shard = pool.table[slot_of(kb)]
            try:
                conn = pool.conn(shard)
                with conn.lock:
                    if pool.epoch != epoch:
                        continue
                    out = send(conn)
                break
            except LinkError as e:
                raise self._lost(shard, e) from e
            except MovedError as e:
                if e.slot >= 0:  # refused by the shard: the caller refreshes (_rerouted)
                    raise
                pool.settle()  # the shard index goes with a shrink: route by the new table
                continue
        if conn.moved:
            pool.refresh_if_moved()
        return conn, out

    def write_many(self, items: Iterable[tuple[Any, Any]], *, ttl_s: float | None = None) -> int:
        """Write many ``(args, value)`` pairs, one round trip per shard; return the count.

        Every key and value is encoded first, so a bad item raises TypeError and nothing is
        sent. Returns once every shard has applied its part; if a store refused some items,
        raises WriteError after the others were applied. ``ttl_s`` as for ``write``.
        """
        if ttl_s is not None:
            _check_ttl(ttl_s)
        todo: list[tuple[list[Any], Any]] = []
        for args, value in items:
            kb, ab = self._encode(args)
            entry = [kb, ab, encode_value(value)]
            if ttl_s is not None:
                entry.append(ttl_s)
            todo.append((entry, value))
        applied, first_error = 0, None
        for _ in range(_MAX_REROUTES):
            done, error, moved = self._write_many_once(todo)
            applied += done
            first_error = first_error or error
            if not moved:
                break
            # Those shards refused their part whole (the cache was resharded): only that
            # part goes again, by the new table; the rest was applied once.
            todo = [pair for _, pairs in moved for pair in pairs]
            self._pool.refresh(max(e.epoch for e, _ in moved), force=True)
        else:
            raise ShardUnavailableError(f"cache {self.name!r}: writes kept being refused as "
                                        "moved")
        if first_error is not None:
            raise first_error
        return applied

    def _write_many_once(self, todo: list[tuple[list[Any], Any]]
                         ) -> tuple[int, BaseException | None, list[Any]]:
        """Send ``todo`` (``(entry, value)`` pairs), one frame per shard; return what was
        applied, the first error, and per shard that refused as moved its error and pairs."""
        pool = self._pool
        while True:
            groups: dict[int, list[tuple[list[Any], Any]]] = {}
            for pair in todo:
                groups.setdefault(pool.table[slot_of(pair[0][0])], []).append(pair)
            sent = _monotonic()
            try:
                results = pool.scatter({s: protocol.write_many([e for e, _ in g])
                                        for s, g in groups.items()}, errors=True)
                break
            except MovedError:  # a shard index a shrink took: route again
                continue
        near = pool.near
        applied, first_error, moved = 0, None, []
        for s, res in results.items():
            refused: set[int] = set()
            if isinstance(res, MovedError):
                moved.append((res, groups[s]))
                continue
            if isinstance(res, BaseException):
                first_error = first_error or res
                if not isinstance(res, WriteError):  # nothing of this shard's part is known
                    if near is not None:
                        near.forget(e[0] for e, _ in groups[s])
                    continue
                refused = {i for i, _ in res.errors}
                applied += res.applied
            else:
                applied += res
            if near is not None:  # only what the shard applied: never a refused value
                for i, (entry, value) in enumerate(groups[s]):
                    if i not in refused:
                        near.put(entry[0], entry[2], value, sent)
        return applied, first_error, moved

    @_rerouted
    def delete(self, args: Any, *, wait: bool = True) -> None:
        """Delete ``args``' key: from the cache at once (later reads answer as for a key no
        store has, never a store's old value) and, write-behind, from every store.

        Deletes and writes of one key are applied in order (the later wins). ``wait=False``
        pipelines it like ``write``; ``sync()`` waits for it.
        """
        kb, ab = self._encode(args)
        if self._pool.near is not None:
            self._pool.near.forget((kb,))
        frame = protocol.delete(kb, ab)
        if wait:
            self._call(self._table[slot_of(kb)], frame)
            return
        self._pipelined(kb, lambda c: c.send(frame))

    @_rerouted
    def get(self, args: Any, default: Any = None) -> Any:
        """The value of ``args`` from the cache or the stores, else ``default`` (where
        ``read`` would answer ``init_fn(args)``, or None when no store has the key)."""
        kb, ab = self._encode(args)
        vb = self._call(self._table[slot_of(kb)], protocol.get(kb, ab))
        return default if vb is None else decode_value(vb)

    @_rerouted
    def contains(self, args: Any) -> bool:
        """Whether ``args`` has a value in the cache or a store (``init_fn`` not applied)."""
        kb, ab = self._encode(args)
        return self._call(self._table[slot_of(kb)], protocol.get(kb, ab)) is not None

    def __contains__(self, args: Any) -> bool:
        return self.contains(args)

    @_rerouted
    def invalidate(self, args: Any) -> bool:
        """Drop ``args`` from the cache only (a pending write of it is flushed first, never
        dropped); the next read asks the stores. Returns whether it was cached. Raises
        FlushError, dropping nothing, if that flush fails."""
        kb, _ = self._encode(args)
        if self._pool.near is not None:
            self._pool.near.forget((kb,))
        return bool(self._call(self._table[slot_of(kb)], protocol.invalidate(kb)))

    def invalidate_all(self) -> int:
        """Flush every pending write, then drop every cached entry of every shard (the stores
        keep everything); return how many entries were dropped."""
        self.sync()
        self._pool.leases.release_all()
        if self._pool.near is not None:
            self._pool.near.forget()
        return sum(self._everywhere(protocol.INVALIDATE_ALL).values())

    @_rerouted
    def update(self, args: Any, fn: Callable[[Any], Any] | str, *, wait: bool = True) -> Any:
        """Atomically set the value of ``args`` to ``fn(value)`` inside the owning shard and
        return the new value. ``fn`` is shipped (pickled) once per process and shard, then
        reused; or it is the name of a function registered with ``init(..., functions=...)``
        (nothing pickled is sent: the only kind a cache made with ``allow_pickle=False``
        takes). A name the shards do not know raises LookupError listing those they know.

        ``wait=False`` pipelines the update like ``write`` and returns None: no round trip per
        call; ``sync()`` waits for it and raises an error ``fn`` raised.
        """
        kb, ab = self._encode(args)
        pool = self._pool
        name = None
        if isinstance(fn, str):  # a registered function; run here only on a leased key
            name, fn = fn, self._spec.functions.get(fn)
        elif not callable(fn):
            raise TypeError("update needs a callable or the name of a function registered "
                            f"with init(..., functions=...), got {type(fn).__qualname__}")
        elif not self._spec.allow_pickle:
            raise self._refused("update with a function")
        if pool.leases.wanted and fn is not None:
            done, value = pool.leases.update_local(kb, fn)
            if done:
                return value if wait else None
        if name is None:
            digest, blob = self._function(fn)
        sent = _monotonic()

        def send(conn: Connection) -> Any:
            resend = None
            if name is not None:
                frame = protocol.update_named(kb, ab, name)
            elif digest in conn.known_functions:
                frame = protocol.update(kb, ab, digest, None)
                # Resent to a restarted shard, it goes with its function.
                resend = partial(protocol.update, kb, ab, digest, blob)
            else:
                frame = protocol.update(kb, ab, digest, blob)
            vb = None
            if wait:
                vb = conn.call(frame, resend)
            else:
                # Later frames on this connection find fn registered.
                conn.send(frame, 1, resend)
            if name is None:
                conn.known_functions.add(digest)
            return vb

        _, vb = self._pipelined(kb, send)
        if not wait:
            if pool.near is not None:
                pool.near.entries.pop(kb, None)
            return None
        value = decode_value(vb)
        if pool.near is not None:
            pool.near.put(kb, vb, value, sent)
        return value

    # -- exclusive leases -------------------------------------------------------------------
    @_rerouted
    def lease(self, *args_list: Any, ttl_ms: float = 5000.0) -> Lease:
        """Own ``args_list``'s keys exclusively, as a CPU core owns a cache line.

        Use as a context manager. While held, this process's ``read``/``write``/``update`` of
        those keys run in-process (no round trip); any other process touching them makes the
        shard recall the lease: the owner's buffered writes go to the shard first, so nobody
        reads a stale value. Writes also go back on exit and at ``shutdown``. The lease is
        renewed in the background; if this process stalls past ``ttl_ms``, it expires and its
        unreleased writes are refused with LeaseLostError (raised at release or ``sync``).
        """
        return Lease(self._pool.leases, [self._encode(a) for a in args_list], ttl_ms)

    def _refused(self, what: str) -> PicklingRefusedError:
        """The error for ``what``, which would travel as a pickle, on a cache made with
        allow_pickle=False (raised before anything is sent)."""
        hint = ("; register the function with init(..., functions={name: fn}) and call "
                "update(args, name)" if what.startswith("update") else "")
        return PicklingRefusedError(
            f"cache {self.name!r} was made with allow_pickle=False: {what} would send a "
            f"pickle, so it is refused and nothing was sent{hint}")

    def _function(self, fn: Callable[[Any], Any]) -> tuple[bytes, bytes]:
        hit = self._fns.get(id(fn))
        if hit is not None and hit[0] is fn:
            return hit[1], hit[2]
        blob = cloudpickle.dumps(fn)
        digest = hashlib.blake2b(blob, digest_size=16).digest()
        if len(self._fns) > 1024:
            self._fns.clear()
        self._fns[id(fn)] = (fn, digest, blob)  # holding fn keeps its id from being reused
        return digest, blob

    # -- control ----------------------------------------------------------------------------
    def reshard(self, num_shards: int) -> dict[str, Any]:
        """Grow or shrink the cache to ``num_shards`` shards while it runs, by moving slot
        ranges (keys never rehash). Each moving key goes with everything pending on it
        (unwritten payloads, delete markers, TTLs, dead letters) and the leases held on it,
        journaled at each step, so a reshard works while a store is down. Clients keep
        working: a request routed by the old table is refused unapplied, and the client
        takes the new table and sends it again (this process's pipelined writes keep their
        order). Needs the journal and a shared store; refused for a checkpointed cache. If a
        shard cannot hand its slots over (it is gone), nothing moves and this raises.
        Returns ``{"epoch", "num_shards", "moved_slots", "handed_keys"}``."""
        out = control.reshard(self._pool.spec, num_shards)
        self._pool.refresh(out["epoch"], force=True)
        return out

    def sync(self) -> None:
        """Wait until every write this process pipelined has been applied by its shard;
        raise the first error a shard reported for one of them."""
        self._pool.sync()
        self._pool.leases.raise_errors()

    def flush_now(self, *, checkpoint: Any = _NO_CHECKPOINT, progress: bool | None = None,
                  _progress_file: IO[str] | None = None) -> Any:
        """Write every buffered write of every shard to the stores, then return.

        With ``checkpoint``, the checkpoint handler runs on that state after all shards
        flushed and its result is returned. Returns None when nothing was pending. Raises
        FlushError if a store failed (its payloads stay buffered).

        ``progress``: a progress bar of the keys stored (tqdm). None: only on a terminal or
        in a notebook, with tqdm installed, once the flush has taken 0.5 s; True: always
        (ImportError without tqdm); False: never. See ``persistroids_dist.progress``.
        """
        if checkpoint is not _NO_CHECKPOINT and not self._spec.allow_pickle:
            raise self._refused("checkpoint=")
        if self._pool.spec.checkpointed:
            raise ValueError("this cache is checkpointed: writes reach the stores with "
                             "checkpoints; call cache.checkpoint(state)")
        bar = progress_bars.Tracker(self._pool, "flush", progress_bars.unwritten, progress,
                                    _progress_file)
        self.sync()
        blob = None if checkpoint is _NO_CHECKPOINT else cloudpickle.dumps(checkpoint)
        self._pool.leases.release_all()
        with bar:
            return control.flush_all(self._spec, blob)

    # -- checkpoints (a cache made with checkpoints=True) -----------------------------------
    def checkpoint(self, state: Any = None, *, wait_stored: bool | float = False,
                   progress: bool | None = None,
                   _progress_file: IO[str] | None = None) -> CheckpointInfo:
        """Take a checkpoint: a consistent cut across every shard, recorded with ``state``
        (anything msgpack encodes, such as the input offset a job would resume from).

        Every write acknowledged to any client before this call is in it, and none issued
        after it returns; a write racing with it lands wholly on one side, and a write
        acknowledged before another was issued is in it whenever the other is. This
        process's pipelined writes are synced first. Leases are recalled: their owners'
        writes go in. Writes to a shard wait while it cuts (``pause_s`` says how long, at
        most). Complete once its manifest is recorded; the stores then get its writes in
        the background, oldest checkpoint first. Raises TypeError for a state msgpack
        cannot encode, and RuntimeError if it failed (nothing recorded; its writes go with
        the next one).

        ``wait_stored``: once the checkpoint is complete, also wait until every shard has
        stored its writes (and any older checkpoint's), True without a time limit, or at most
        that many seconds (then TimeoutError; the checkpoint stays complete and the stores
        still get its writes). The checkpoint itself is the same either way; a store that
        refuses is retried by the shards meanwhile.

        ``progress``: a bar of that storing (tqdm), as for ``flush_now``; so it needs
        ``wait_stored`` (True without it is a ValueError). The cut itself takes milliseconds
        and has no bar."""
        if isinstance(wait_stored, bool):
            timeout_s = None
        elif isinstance(wait_stored, (int, float)) and wait_stored >= 0:
            timeout_s = float(wait_stored)
        else:
            raise ValueError(f"wait_stored must be True, False or a number of seconds >= 0, "
                             f"got {wait_stored!r}")
        if progress and wait_stored is False:
            raise ValueError("progress=True draws the storing of the checkpoint's writes: "
                             "pass wait_stored=True as well (taking the checkpoint itself "
                             "takes milliseconds)")
        show = progress_bars.wanted(progress, _progress_file)  # ImportError before the cut
        blob = encode_state(state)
        self._checkpointed()
        self.sync()
        info = CheckpointInfo.from_manifest(control.checkpoint(self._pool.spec, blob))
        if wait_stored is not False:
            progress_bars.wait_stored(self._pool, info.id, info.keys, timeout_s=timeout_s,
                                      progress=progress if show else False,
                                      file=_progress_file)
        return info

    def last_checkpoint(self) -> CheckpointInfo | None:
        """The last complete checkpoint (its ``id`` and ``state``), or None."""
        self._checkpointed()
        m = control.checkpoint_call(self._pool.spec, "last_checkpoint")
        return None if m is None else CheckpointInfo.from_manifest(m)

    def checkpoints(self) -> list[CheckpointInfo]:
        """The complete checkpoints, oldest first (the newest 100)."""
        self._checkpointed()
        return [CheckpointInfo.from_manifest(m)
                for m in control.checkpoint_call(self._pool.spec, "list_checkpoints")]

    def restore(self) -> CheckpointInfo | None:
        """Go back to the last complete checkpoint: every write made after it is dropped, on
        every shard (their keys read as of the checkpoint). For a job that restarts from it
        and replays its input from the offset it recorded. Returns it, or None (then every
        write not yet in a checkpoint is dropped)."""
        self._checkpointed()
        m = control.checkpoint_call(self._pool.spec, "checkpoint_recover", True)
        if self._pool.near is not None:  # its entries may be newer than the checkpoint
            self._pool.near.forget()
        return None if m is None else CheckpointInfo.from_manifest(m)

    def _checkpointed(self) -> None:
        if not self._pool.spec.checkpointed:
            raise ValueError("this cache is not checkpointed: make it with "
                             "init(..., checkpoints=True)")

    def dead_letters(self) -> list[dict[str, Any]]:
        """Writes a store kept refusing on their own while it stored the others (after
        ``max_attempts`` tries): ``{"key", "connector", "error", "attempts", "shard"}`` each.
        They are out of the write buffer (the rest keeps flowing) and wait for
        ``retry_dead_letters`` or ``discard_dead_letters``; a newer write of the key
        replaces its dead letter."""
        answers = self._everywhere(protocol.DEAD_LETTERS)
        out = []
        for s in sorted(answers):
            for d in answers[s]:
                d["key"] = decode_value(d.pop("kb"))  # tuples stay tuples
                out.append(d)
        return out

    def retry_dead_letters(self) -> int:
        """Put every dead letter back in its shard's write buffer; how many went back."""
        return sum(self._everywhere(protocol.RETRY_DEAD_LETTERS).values())

    def discard_dead_letters(self) -> int:
        """Drop every dead letter (its store never gets it); how many were dropped."""
        return sum(self._everywhere(protocol.DISCARD_DEAD_LETTERS).values())

    def replicas(self, detail: bool = False) -> list[dict[str, Any]]:
        """Per shard, where its primary and its backup run (Ray node ids; ``backup_node``
        None: none now, e.g. no other node is alive) and how many failovers the cache has
        had; with ``detail``, each one's actor id and process id too. A cache made without
        ``replicas`` lists its shards' nodes with no backups."""
        if self._spec.coordinator is None:
            raise CacheClosedError("this handle has no coordinator (a shard host in-process)")
        return control.get(self._spec.coordinator.replicas.remote(detail))

    def metrics(self) -> Metrics:
        """``{"total": {...}, "shards": [...]}``: lookup (read calls), read (store read
        rounds), write (write calls), flush (distinct keys flushed), and more per shard."""
        self.sync()
        shards = list(self._everywhere(protocol.METRICS)
                      .values())
        out = aggregate(shards)
        if self._pool.spec.checkpointed:  # taken, failed, the last one's figures
            out["checkpoints"] = control.checkpoint_call(self._pool.spec,
                                                         "checkpoint_metrics")
        return out

    def shutdown(self, disconnect: bool = False, *, timeout_s: float | None = None,
                 progress: bool | None = None, _progress_file: IO[str] | None = None
                 ) -> Metrics:
        """Flush everything, close the shards (and connectors if ``disconnect``), remove the
        actors (their names are free once it returns: an ``init`` of the same name may
        follow at once) and return the final metrics. If a store fails, raise ShutdownError (a
        FlushError) and keep everything running so no write is lost; call again once the
        store is back.

        ``timeout_s``: keep retrying failing stores this long (checked between attempts),
        then stop anyway: each shard that still holds unwritten keys keeps them in its
        journal, where the next ``init`` with this cache's name (and journal) replays them;
        the result's ``unwritten`` (total and per shard) says how many. A shard without a
        journal never stops with unwritten keys: ShutdownError, as above.

        ``progress``: a bar of the keys the final flush stores, as for ``flush_now``."""
        if self._pool.closed:
            raise CacheClosedError(f"cache {self.name!r} was already shut down")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
                timeout_s, (int, float)) or timeout_s < 0):
            raise ValueError(f"timeout_s must be a number of seconds >= 0 or None, got "
                             f"{timeout_s!r}")
        bar = progress_bars.Tracker(self._pool, "shutdown", progress_bars.unwritten, progress,
                                    _progress_file)
        self._pool.leases.wanted.clear()
        self._pool.leases.release_all()
        self.sync()
        with bar:
            out = aggregate(control.shutdown_cache(self._spec, disconnect, timeout_s))
            bar.finish(out["total"].get("unwritten", 0))  # kept in journals, not stored
        self._pool.close()
        return out


def _check_ttl(ttl_s: Any, who: str = "") -> None:
    """ValueError unless ``ttl_s`` is a number of seconds > 0 (``who``: a prefix naming the
    caller, for the message). None is the caller's to allow."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise ValueError(f"{who}ttl_s must be a number of seconds > 0 or None, got {ttl_s!r}")


_TOTAL_SKIP = {"shard", "pid", "oldest_pending_ms", "last_errors", "journal_path"}


def aggregate(shards: Sequence[dict[str, Any]]) -> Metrics:
    """Sum the shards' counters into ``total``; keep the per-shard records."""
    total: dict[str, Any] = {}
    for m in shards:
        for k, v in m.items():
            if k not in _TOTAL_SKIP and isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    total["oldest_pending_ms"] = max((m.get("oldest_pending_ms", 0.0) for m in shards),
                                     default=0.0)
    return Metrics(total=total, shards=list(shards))  # a dict that Jupyter shows as tables
