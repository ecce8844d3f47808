"""One shard's logic: a cache partition, a write buffer and the connectors. No Ray in here.

The shard speaks encoded bytes: keys arrive as canonical key bytes (see ``codec``), values as
msgpack bytes, and reads return bytes. Storing values encoded keeps byte accounting exact, lets
the transport pass them through without re-encoding, and means nobody can mutate a cached value
in place. Connectors see decoded Python values.

Thread safety: every public method takes the shard's lock, so all operations on one key are
linearizable. With ``background=True`` (how a shard host runs it) connectors are called on a
store thread of their own, never under that lock: a flush runs on a flusher thread, and a
read that misses waits for the store with the lock released (up to ``store_timeout_s``), so
cached keys, writes and metrics are served while a store is slow or down. Without it (the
embedded, single-threaded use), connector calls run in the caller's thread, under the lock,
and a write that passes a threshold flushes before it returns, as in the seed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from .codec import decode_value, encode_key, encode_value
from .connector import (
    BaseConnector,
    Connector,
    as_connector,
    deleter,
    encoded_reader,
    reader,
    writer,
)
from .errors import FlushError, StoreDataError, StoreUnavailableError, WriteError
from .flushproc import FlushProcess
from .journal import (
    APPLIED,
    COMMITTED,
    DEAD,
    DELETE,
    ROLLBACK,
    SEAL,
    UNDEAD,
    UNSEAL,
    WRITE,
    Journal,
)
from .slots import ADOPT
from .storeio import StoreThread, StoreTimeout

__all__ = ["ShardCore", "default_merge"]

log = logging.getLogger("persistroids_dist.shard")

_UNSET = object()
_NONE = encode_value(None)


def default_merge(*values: Any) -> Any:
    """The seed's ``merge``: one store, its value; several, a shallow dict merge (later wins).

    None results are skipped; if the non-None results are not all dicts, the last one wins.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    if all(isinstance(v, dict) for v in present):
        merged: dict[Any, Any] = {}
        for v in present:
            merged.update(v)
        return merged
    return present[-1]


@dataclass(slots=True)
class DeadLetter:
    """A payload a store kept refusing on its own (see ``ShardCore.dead_letters``)."""

    kb: bytes
    cid: str
    error: str
    attempts: int
    payload: Any


@dataclass
class _Sealed:
    """One closed epoch of a checkpointed shard: its payloads per connector (as a flush
    takes them), its keys' sizes, their values then (``(vb, deleted)``, what a read answers
    if a restore drops the newer writes) and the journal segment its SEAL record is in."""

    payloads: dict[str, dict[bytes, Any]]
    sizes: dict[bytes, int]
    values: dict[bytes, tuple[bytes | None, bool]]
    segment: int | None


class _Load:
    """A read of missed keys from the stores, in flight: ``stale`` gets each of its keys
    the cache's state of which changed meanwhile (its result for those is not cached).
    Compared by identity: ``_loading`` lists hold one per read."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale: set[bytes] = set()


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _show_key(kb: bytes) -> Any:
    try:
        return decode_value(kb)
    except Exception:
        return kb


#: A flush starts a new journal segment once the current one holds this much (so small,
#: frequent flushes do not each pay a file rotation).
_JOURNAL_SEGMENT_BYTES = 1 << 20

#: A flush hands a connector at most this many payloads per call, in buffer order. A
#: connector's work on one batch runs in C calls that hold the GIL throughout (PostgreSQL's
#: ``dict(payloads)`` of 100k rows took 15-25 ms, and freeing them ~8 ms), and while the GIL
#: is held the shard answers no read, cached keys included. 10k keeps each such call around
#: 2 ms; the calls of one flush are still made one after the other, in order.
_FLUSH_CHUNK = 10_000

_last_warning: dict[Any, float] = {}


def _warn_limited(logger: logging.Logger, what: Any, msg: str, *args: Any,
                  every_s: float = 10.0) -> None:
    """``logger.warning``, at most once per ``every_s`` for the same ``what`` (a store that
    is down fails every retry; one line says so)."""
    now = time.monotonic()
    if now - _last_warning.get(what, -every_s) >= every_s:
        _last_warning[what] = now
        logger.warning(msg, *args)


def _no_guard() -> None:
    """A ``read_many`` guard that checks nothing (the values are still taken in one hold)."""


def _encodable(value: Any) -> bool:
    try:
        encode_value(value)
    except TypeError:
        return False
    return True



def _empty_piecewise(*containers: Any) -> None:
    """Empty sets and dicts one item at a time: each item is freed by its own bytecode, so
    other threads get the interpreter between items (a container freed whole holds it for
    as long as freeing all of them takes)."""
    for c in containers:
        pop = c.popitem if isinstance(c, dict) else c.pop
        for _ in range(len(c)):
            pop()

class ShardCore:
    """A cache partition with write-behind buffering in front of ``connectors``.

    ``writes_threshold``: flush when more than this many distinct keys are pending.
    ``millis_threshold``: flush when the oldest pending write is older than this (checked by
    ``tick()``, which the shard's host calls periodically, and on read misses).
    ``max_entries`` / ``max_bytes``: LRU bounds of the partition (keys plus encoded values).
    Entries with pending writes are never dropped: evicting one flushes the buffer first.
    ``background``: connectors on a store thread, flushes on a flusher thread (see the
    module's docstring); ``store_timeout_s``: how long a read that misses waits for the
    stores then (StoreUnavailableError after it). ``close()`` ends both threads.
    ``flush_process`` (with ``background``): each connector that is ``flush_process_safe``
    has its batches of ``flush_process_min`` payloads or more stored by a child process
    (``flushproc``), started at the first such batch.
    """

    def __init__(
        self,
        connectors: Sequence[Connector],
        *,
        index: int = 0,
        init_fn: Callable[[Any], Any] | None = None,
        merge_query_fn: Callable[..., Any] | None = None,
        writes_threshold: int = 99,
        millis_threshold: float = 1000,
        max_entries: int = 1_000_000,
        max_bytes: int | None = None,
        checkpoint_handler: Callable[[Any], Any] | None = None,
        ttl_s: float | None = None,
        max_attempts: int = 10,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        journal: Journal | None = None,
        background: bool = False,
        store_timeout_s: float = 10.0,
        staged: bool = False,
        flush_process: bool = True,
        flush_process_min: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ids = [c.get_id() for c in connectors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"connector ids must be unique, got {ids}")
        if writes_threshold < 0 or millis_threshold <= 0 or max_entries < 1:
            raise ValueError("writes_threshold >= 0, millis_threshold > 0 and max_entries >= 1")
        self.index = index
        # Every connector as a BaseConnector: its optional methods exist (delegating
        # defaults), so the shard always calls the batched, encoded paths.
        self.connectors = [as_connector(c) for c in connectors]
        self._ids = ids
        self.init_fn = init_fn
        self.merge_query_fn = merge_query_fn or default_merge
        self.writes_threshold = writes_threshold
        self.millis_threshold = millis_threshold
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.checkpoint_handler = checkpoint_handler
        self._clock = clock
        self.last_errors: dict[str, str] = {}
        self.max_attempts = max_attempts
        # The bound of the write buffer (``full()``; the host makes writers wait on it).
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._pending_sizes: dict[bytes, int] = {}  # per dirty key: key + value bytes
        self._pending_bytes = 0
        # Payloads a store kept refusing on their own while it stored others: (connector id,
        # key) -> DeadLetter. Out of the buffer, kept for retry_dead_letters().
        self._dead: dict[tuple[str, bytes], DeadLetter] = {}
        # Payloads singled out so far: (connector id, key) -> (refusals, the error's text).
        self._attempts: dict[tuple[str, bytes], tuple[int, str]] = {}
        self._dead_journaled_upto = -1  # the journal segment dead letters were last said in
        self._lock = threading.RLock()
        # Waiting on it releases the lock: callers waiting for the store thread or for a
        # running flush, and the host's writers waiting for room in the buffer.
        self._cond = threading.Condition(self._lock)
        self.store_timeout_s = store_timeout_s
        self._flushing = False  # a flush is between its snapshot and its merge
        self._held = False  # flushes held while a reshard hands keys away (hold_flushes)
        # Checkpointed (``staged``): writes reach the stores only as part of a committed
        # checkpoint. ``seal`` closes the open epoch (what is pending now); a sealed epoch
        # is stored once ``commit`` says its manifest is written, oldest first.
        self.staged = staged
        self._sealed: dict[int, _Sealed] = {}  # epoch -> its writes, oldest first
        self._sealed_keys: dict[bytes, int] = {}  # key -> sealed epochs holding a write of it
        self._committed = -1  # the newest epoch whose checkpoint is committed
        # Misses being read from the stores: key -> the reads of it in flight. A key written
        # (or handed away) meanwhile is marked in each of them, and such a read's result is
        # not cached: the write may have been flushed and evicted before the read returns.
        # Marked per read, not per key: of two reads in flight, the first to return was
        # overtaken by the write as surely as the last (see _outdate).
        self._loading: dict[bytes, list[_Load]] = {}
        self._loops = threading.local()  # one asyncio loop per thread, for async connectors
        # Every buffered write and delete is appended here before it is acknowledged (the
        # host commits it before answering); a flush that stored everything trims it.
        self.journal = journal

        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        # Cached keys whose value is stored nowhere: an init_fn value, a cached None for a
        # key no store has, or a delete. ``get`` answers its default for them.
        self._absent: set[bytes] = set()
        # Expiry (clock seconds) of entries with a time to live. An entry with a pending
        # write does not expire before it is flushed: it is newer than any store.
        self._expires: dict[bytes, float] = {}
        self._bytes = 0
        self._pending: dict[str, dict[bytes, Any]] = {cid: {} for cid in ids}
        self._dirty: set[bytes] = set()
        self._inflight: set[bytes] = set()  # keys whose payloads a running flush holds
        self._inflight_bytes = 0  # and their bytes, as counted in _pending_bytes
        # The running flush's payloads (over all connectors) and how many of them a store
        # took so far, a chunk at a time: what a client's progress bar reads from metrics()
        # (``flushing_unstored``). Two integers updated under the lock, once per chunk.
        self._flush_payloads = 0
        self._flush_stored = 0
        self._oldest_pending: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._checkpoint: Any = _UNSET
        self._ran_checkpoint = False
        self.last_checkpoint_result: Any = None
        self._functions: dict[bytes, Callable[[Any], Any]] = {}
        self.c: dict[str, int] = dict.fromkeys(
            ("lookup", "read", "write", "flush", "hits", "misses", "evictions", "updates",
             "flush_calls", "flush_errors", "read_errors", "write_errors", "checkpoints",
             "checkpoint_errors", "over_capacity", "deletes", "expired", "replayed",
             "replay_errors", "retries", "dead_letters", "backpressure_waits",
             "backpressure_refusals", "store_timeouts"), 0)
        # A store that is down must not keep the shard from starting: Ray would then give
        # up restarting it, and its journal would never be replayed. Connect it again before
        # its next use (the flush timer retries with backoff; a read miss raises).
        self._unconnected: list[BaseConnector] = []
        # With background=True every connector call, connect included, runs on the store
        # thread (an async connector's connections belong to that thread's loop).
        self._store: StoreThread | None = (
            StoreThread(self._cond, f"persistroids-store-{index}") if background else None)
        # Per connector (by id()), its flush process, if it has one: see flushproc.
        self._flushers: dict[int, FlushProcess] = {}
        self.flush_process_min = flush_process_min
        if flush_process and background:
            for given, conn in zip(connectors, self.connectors):
                if self._flush_process_ok(conn):
                    try:
                        blob = pickle.dumps(given)
                    except Exception as e:
                        log.warning("shard %d: %s flushes in this process: it cannot be "
                                    "pickled for a flush process (%r)", index,
                                    conn.get_id(), e)
                        continue
                    self._flushers[id(conn)] = FlushProcess(
                        blob, f"shard {index} {conn.get_id()}", conn.flush)
        for conn in self.connectors:
            try:
                with self._lock:
                    self._io(self._call, conn.connect)
            except Exception as e:
                self._unconnected.append(conn)
                self.last_errors[conn.get_id()] = f"{type(e).__name__}: {e}"
                log.warning("shard %d: %s is unreachable at start (%r); the shard serves "
                            "from memory and connects it when it is back", index,
                            conn.get_id(), e)
        # Per connector, the callable a write goes through, resolved once so that the
        # per-write path does no attribute lookups or awaitable checks.
        self._writers = [self._writer(conn) for conn in self.connectors]
        # Reads as stored bytes, never decoded here: when one connector serves them itself
        # and the default merge applies.
        # The default time to live: the cache's, or a store's own if shorter (a store that
        # expires keys must not have them served from here after it dropped them).
        ttls = [t for t in [ttl_s, *(getattr(c, "ttl_s", None) for c in self.connectors)]
                if t is not None]
        self.ttl_s: float | None = min(ttls) if ttls else None
        self._deleters = [deleter(conn) for conn in self.connectors]
        self._encoded_reader = (
            encoded_reader(self.connectors[0])
            if len(self.connectors) == 1 and self.merge_query_fn is default_merge else None)
        self._readers = [reader(conn) for conn in self.connectors]
        self._wake = threading.Event()  # a threshold passed: the flusher flushes now
        self._stop = threading.Event()
        if background:
            # Ticks often enough that no write waits much longer than millis_threshold.
            period = max(0.002, min(0.1, millis_threshold / 1000 / 10))
            threading.Thread(target=self._flush_loop, args=(period,), daemon=True,
                             name=f"persistroids-flusher-{index}").start()

    def _writer(self, conn: BaseConnector) -> Callable[[bytes, bytes], Any]:
        fn = writer(conn)
        if inspect.iscoroutinefunction(conn.write_encoded) or \
                inspect.iscoroutinefunction(conn.write):
            return lambda *a: self._call(fn, *a)
        return fn

    # -- helpers --------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):  # async connectors run on a loop of this thread's
            loop = getattr(self._loops, "loop", None)
            if loop is None:
                loop = self._loops.loop = asyncio.new_event_loop()
            result = loop.run_until_complete(result)
        return result

    def _io(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)``, a connector call: on the store thread when there is one (waiting
        releases the lock), else right here. Call with the lock held."""
        if self._store is None:
            return fn(*args)
        return self._store.run(fn, *args, timeout=timeout)

    def _put(self, kb: bytes, vb: bytes) -> None:
        entries = self._entries
        old = entries.get(kb)
        if old is not None:
            self._bytes -= len(old)
            entries.move_to_end(kb)
        else:
            self._bytes += len(kb)
        entries[kb] = vb
        self._bytes += len(vb)
        if len(entries) > self.max_entries or self.max_bytes is not None:
            if self._over_capacity():
                self._evict()

    def _drop(self, kb: bytes) -> None:
        """Forget the cached entry of ``kb`` (never one with a pending write)."""
        vb = self._entries.pop(kb, None)
        if vb is not None:
            self._bytes -= len(kb) + len(vb)
        self._absent.discard(kb)
        self._expires.pop(kb, None)

    def _live(self, kb: bytes) -> bytes | None:
        """The cached value of ``kb``, or None if it is not cached or has expired."""
        vb = self._entries.get(kb)
        if vb is not None and self._expires:
            at = self._expires.get(kb)
            if at is not None and at <= self._clock() and not self._unstored(kb):
                self._drop(kb)
                self.c["expired"] += 1
                return None
        return vb

    def _unstored(self, kb: bytes) -> bool:
        """Whether ``kb`` has a write no store has yet (its cached value must stay)."""
        return kb in self._dirty or kb in self._inflight or kb in self._sealed_keys

    def _over_capacity(self) -> bool:
        return len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self._bytes > self.max_bytes)

    def _evict(self) -> None:
        entries = self._entries
        flushed = False
        while len(entries) > 1 and self._over_capacity():
            kb = next(iter(entries))
            if self._unstored(kb):
                if flushed or self._inflight or self._store is not None:
                    # The flush failed, or one is running, or the flusher does it: stay over
                    # capacity rather than drop data that is not yet persisted.
                    self.c["over_capacity"] += 1
                    if self._store is not None and self._dirty:
                        self._wake.set()
                    return
                self._flush(explicit=False)
                flushed = True
                continue
            self._drop(kb)
            self.c["evictions"] += 1

    # -- reads ----------------------------------------------------------------------------
    def read(self, kb: bytes, ab: bytes | None = None, checkpoint: Any = _UNSET) -> bytes:
        """Return the encoded value of key ``kb`` (``ab``: encoded read args, None = the key)."""
        with self._lock:
            if checkpoint is not _UNSET:
                self._checkpoint = checkpoint
            self.c["lookup"] += 1
            vb = self._live(kb)
            if vb is not None:
                self.c["hits"] += 1
                self._entries.move_to_end(kb)
                return vb
            return self._load(kb, ab)

    def read_stored(self, kb: bytes, ab: bytes | None = None) -> bytes | None:
        """Like ``read``, but None where ``read`` would answer a value stored nowhere (an
        ``init_fn`` value, or None for a key no store has)."""
        with self._lock:
            vb = self.read(kb, ab)
            return None if kb in self._absent else vb

    def read_many(self, kbs: Sequence[bytes], abs_: Sequence[bytes | None] | None = None,
                  guard: Callable[[], Any] | None = None) -> list[bytes]:
        """The encoded values of ``kbs``. ``guard``: called with the lock held before the
        values are taken, and the values are then taken without releasing the lock in
        between (a read that missed is done first, and the guard called again): the host's
        lease check, kept atomic with the read it guards."""
        with self._lock:
            entries = self._entries
            first = True
            while True:
                if guard is not None:
                    guard()
                out: list[Any] = []
                missing: list[int] = []
                live = self._live if self._expires else entries.get
                for i, kb in enumerate(kbs):
                    vb = live(kb)
                    if vb is None:
                        missing.append(i)
                    else:
                        entries.move_to_end(kb)
                    out.append(vb)
                if first:  # a lookup counts once, however often a guard makes it look again
                    first = False
                    self.c["lookup"] += len(kbs)
                    self.c["hits"] += len(kbs) - len(missing)
                if not missing:
                    return out
                self._load_many(kbs, abs_, missing, out)  # may release the lock
                if guard is None:
                    return out

    def _load(self, kb: bytes, ab: bytes | None) -> bytes:
        out: list[Any] = [None]
        self._load_many((kb,), None if ab is None else (ab,), [0], out)
        return out[0]

    def _load_many(self, kbs: Sequence[bytes], abs_: Sequence[bytes | None] | None,
                   missing: list[int], out: list[Any]) -> None:
        """Fill ``out[i]`` for every missed ``i`` from the stores (merged, else ``init_fn``),
        caching each result; an entry written meanwhile wins (get-or-create)."""
        first: dict[bytes, int] = {}
        for i in missing:  # a key asked twice is read once
            first.setdefault(kbs[i], i)
        keys = list(first)
        encoded = [kb if abs_ is None or abs_[first[kb]] is None else abs_[first[kb]]
                   for kb in keys]
        if self._dirty.intersection(keys):
            self._flush(explicit=True)  # a store is never read while a newer write is buffered
        elif self._store is None and self._time_to_flush():
            self._flush(explicit=False)  # the seed's check, kept on misses
        self.c["misses"] += len(keys)
        self.c["read"] += len(keys)
        loading = self._loading
        load = _Load()
        for kb in keys:
            reads = loading.get(kb)
            if reads is None:
                loading[kb] = [load]
            else:
                reads.append(load)
        stale = load.stale  # filled by _outdate while the stores are read
        try:
            found = self._io(self._read_stores, encoded, timeout=self.store_timeout_s)
        except StoreTimeout:
            self.c["read_errors"] += 1
            self.c["store_timeouts"] += 1
            raise StoreUnavailableError(
                f"shard {self.index}: no store answered a read of {len(keys)} key(s) (first "
                f"{_show_key(keys[0])!r}) within store_timeout_s={self.store_timeout_s:g} "
                f"({self.last_errors or 'no store error yet: slow, or behind a long flush'}); "
                "cached keys are still served") from None
        except OSError as e:  # connectors raise ConnectionError/TimeoutError when down
            self.c["read_errors"] += 1
            raise StoreUnavailableError(
                f"shard {self.index}: a store is unreachable for a read of {len(keys)} "
                f"key(s) (first {_show_key(keys[0])!r}): {type(e).__name__}: {e}; cached "
                "keys are still served") from e
        except Exception:
            self.c["read_errors"] += 1
            raise
        finally:
            for kb in keys:
                reads = loading[kb]
                if len(reads) == 1:
                    del loading[kb]
                else:
                    reads.remove(load)  # by identity: _Load has no __eq__
        loaded: dict[bytes, bytes] = {}
        for kb, ab, vb in zip(keys, encoded, found):
            absent = vb is None
            if absent and self.init_fn is not None:
                vb = encode_value(self.init_fn(decode_value(ab)))  # cached, never persisted
            existing = self._entries.get(kb)
            if existing is None:
                existing = _NONE if vb is None else vb
                if kb in stale:  # written while read: answer what was read, cache nothing
                    loaded[kb] = existing
                    continue
                self._put(kb, existing)
                if absent:
                    self._absent.add(kb)
                if self.ttl_s is not None:
                    self._expires[kb] = self._clock() + self.ttl_s
            loaded[kb] = existing
        for i in missing:
            out[i] = loaded[kbs[i]]

    def _outdate(self, kb: bytes) -> None:
        """Mark every store read of ``kb`` in flight as older than the cache's state of it
        (a write, a delete, a rollback, or its slot handed away): none of them caches what
        it read."""
        for load in self._loading.get(kb, ()):
            load.stale.add(kb)

    def _read_stores(self, encoded: list[bytes]) -> list[bytes | None]:
        """The merged stored values of ``encoded`` args, encoded; None where none is stored.

        One batched call per connector that has ``read_many``; with a single connector that
        reads encoded bytes and the default merge, values are never decoded here at all.
        """
        for conn in self._unconnected[:]:
            self._connected(conn)
        if self._encoded_reader is not None:
            conn = self.connectors[0]
            rows = self._rows(conn, self._call(self._encoded_reader, encoded), encoded,
                              "read_many_encoded")
            for ab, vb in zip(encoded, rows):
                if vb is None:
                    continue
                try:
                    if type(vb) is not bytes:
                        raise TypeError(f"got {type(vb).__qualname__}, not bytes")
                    decode_value(vb)
                except Exception as e:
                    raise self._garbage(conn, ab, "undecodable stored bytes", e) from None
            return [None if vb is None or vb == _NONE else vb for vb in rows]
        args = [decode_value(ab) for ab in encoded]
        columns = []
        for conn, read_many in zip(self.connectors, self._readers):
            columns.append(self._rows(conn, self._call(read_many, args), encoded, "read_many"))
        values = [self.merge_query_fn(*row) for row in zip(*columns)] if columns else \
            [None] * len(args)
        out = []
        for i, (ab, v) in enumerate(zip(encoded, values)):
            try:
                out.append(None if v is None else encode_value(v))
            except TypeError as e:
                # Name the store that returned it (else the merge made it).
                culprit = next((c for c, col in zip(self.connectors, columns)
                                if not _encodable(col[i])), None)
                if culprit is None:
                    raise StoreDataError(f"shard {self.index}: merge_query_fn returned a value "
                                         f"the cache cannot store for key "
                                         f"{decode_value(ab)!r}: {e}") from None
                raise self._garbage(culprit, ab, "a value the cache cannot store", e) from None
        return out

    def _rows(self, conn: Connector, rows: Any, encoded: list[bytes], method: str) -> Any:
        """``rows`` if it is one result per key asked; else StoreDataError."""
        if not isinstance(rows, (list, tuple)) or len(rows) != len(encoded):
            got = (f"{len(rows)} result(s)" if isinstance(rows, (list, tuple))
                   else f"a {type(rows).__qualname__}")
            raise StoreDataError(
                f"shard {self.index}: connector {conn.get_id()!r}: {method} returned {got} for "
                f"{len(encoded)} key(s) (first key {decode_value(encoded[0])!r}); it must "
                "return a list with one value (or None) per key") from None
        return rows

    def _garbage(self, conn: Connector, ab: bytes, what: str, e: Exception) -> StoreDataError:
        return StoreDataError(f"shard {self.index}: connector {conn.get_id()!r} returned {what} "
                              f"for key {decode_value(ab)!r} ({type(e).__name__}: {e}); "
                              "nothing was cached")

    # -- writes ---------------------------------------------------------------------------
    def _write1(self, kb: bytes, ab: bytes | None, vb: bytes, ttl_s: float | None = None) -> None:
        payloads = []
        if self.connectors:
            ab = kb if ab is None else ab
            try:
                for write in self._writers:
                    payloads.append(write(ab, vb))
            except Exception:
                self.c["write_errors"] += 1
                raise  # nothing of this write was cached or buffered
        self.c["write"] += 1
        if self._buffer(kb, payloads, len(kb) + len(vb)) and self.journal is not None:
            self.journal.append([WRITE, kb, ab, vb, ttl_s])
        self._put(kb, vb)
        # The per-write path: only touch what is in use.
        if self._absent:
            self._absent.discard(kb)
        if ttl_s is not None or self.ttl_s is not None or self._expires:
            self._set_ttl(kb, ttl_s)

    def _buffer(self, kb: bytes, payloads: list[Any], size: int) -> bool:
        """Buffer one payload per connector for ``kb``, replacing an older one (a later
        write or delete of a key wins over an earlier one); whether any was buffered.
        ``size``: the bytes it counts for in ``max_pending_bytes``."""
        dirty = False
        pending = self._pending
        for cid, payload in zip(self._ids, payloads):
            if payload is not None:
                pending[cid][kb] = payload
                dirty = True
        if dirty:
            if self._oldest_pending is None:
                self._oldest_pending = self._clock()
            self._dirty.add(kb)
            sizes = self._pending_sizes
            self._pending_bytes += size - sizes.get(kb, 0)
            sizes[kb] = size
        if self._loading and kb in self._loading:
            self._outdate(kb)  # a read of it from the stores is in flight: now outdated
        if self._dead or self._attempts:  # a newer write or delete supersedes a refused one
            for cid in self._ids:
                self._dead.pop((cid, kb), None)
                self._attempts.pop((cid, kb), None)
        return dirty

    def _set_ttl(self, kb: bytes, ttl_s: float | None) -> None:
        ttl_s = self.ttl_s if ttl_s is None else ttl_s
        if ttl_s is not None:
            self._expires[kb] = self._clock() + ttl_s
        elif self._expires:
            self._expires.pop(kb, None)

    def write(self, kb: bytes, ab: bytes | None, vb: bytes, checkpoint: Any = _UNSET,
              ttl_s: float | None = None) -> None:
        with self._lock:
            self._write1(kb, ab, vb, ttl_s)
            if checkpoint is not _UNSET:
                self._checkpoint = checkpoint
            self._check_thresholds()

    def write_many(self, items: Iterable[Sequence[Any]], checkpoint: Any = _UNSET) -> int:
        """Apply ``(kb, ab, vb)`` writes (``(kb, ab, vb, ttl_s)`` for a time to live of its
        own) in order and return how many were applied.

        Every item is applied on its own: one that a connector refuses does not stop the
        others. The first refusal is raised after the batch, as a WriteError that counts them.
        """
        n = 0
        errors: list[tuple[int, BaseException]] = []
        with self._lock:
            if not isinstance(items, (list, tuple)):
                items = list(items)
            done = self._write_plain(items, errors) if self._plain_batch(len(items)) else 0
            n = done - len(errors)
            write1 = self._write1
            for i in range(done, len(items)):
                item = items[i]
                try:
                    if len(item) == 3:
                        write1(item[0], item[1], item[2])
                    else:
                        write1(*item)  # with a time to live
                    n += 1
                except Exception as e:
                    errors.append((i, e))
            if checkpoint is not _UNSET and n:
                self._checkpoint = checkpoint
            self._check_thresholds()
        if errors:
            raise WriteError(self.index, n, errors)
        return n

    def _plain_batch(self, size: int) -> bool:
        """Whether ``size`` writes can skip what ``_write1`` checks per write: nothing in the
        shard has a time to live, no store read or refused payload is about any key, and the
        partition has room for all of them (no eviction)."""
        return (self.ttl_s is None and not self._expires and not self._loading
                and not self._dead and not self._attempts and self.max_bytes is None
                and len(self._entries) + size <= self.max_entries)

    def _write_plain(self, items: Sequence[Sequence[Any]],
                     errors: list[tuple[int, BaseException]]) -> int:
        """``_write1`` for each of ``items`` while they have no time to live, under the
        conditions of ``_plain_batch``: the same records, buffer and cache entries, without
        its per-write calls and checks (~35% of a ``write_many``'s CPU per key here).
        Returns how many items it went through (refused ones, added to ``errors``,
        included); the caller applies the rest with ``_write1``."""
        pending, dirty, sizes = self._pending, self._dirty, self._pending_sizes
        absent, journal, put = self._absent, self.journal, self._put
        writers = self._writers
        one, write0 = len(writers) == 1, writers[0] if writers else None
        buffers = [pending[cid] for cid in self._ids]
        added = 0  # bytes
        written = 0
        i = -1
        for i, item in enumerate(items):
            if len(item) != 3:
                i -= 1  # a time to live: _write1 from here on
                break
            kb, ab, vb = item
            if ab is None:
                ab = kb
            try:  # every connector's payload first: one that raises leaves nothing buffered
                payloads = [write0(ab, vb)] if one else [write(ab, vb) for write in writers]
            except Exception as e:
                self.c["write_errors"] += 1
                errors.append((i, e))
                continue
            written += 1
            buffered = False
            for buffer, payload in zip(buffers, payloads):
                if payload is not None:
                    buffer[kb] = payload
                    buffered = True
            if buffered:
                if self._oldest_pending is None:
                    self._oldest_pending = self._clock()
                dirty.add(kb)
                size = len(kb) + len(vb)
                added += size - sizes.get(kb, 0)
                sizes[kb] = size
                if journal is not None:
                    journal.append([WRITE, kb, ab, vb, None])
            put(kb, vb)  # no eviction: _plain_batch saw room for every item
            if absent:
                absent.discard(kb)
        self._pending_bytes += added
        self.c["write"] += written
        return i + 1

    def update(self, kb: bytes, ab: bytes | None, fn: Callable[[Any], Any],
               guard: Callable[[], Any] | None = None) -> bytes:
        """Atomically replace the value of ``kb`` by ``fn(value)``; return the new encoded
        value. ``guard``: as for ``read_many``, atomic with the update."""
        with self._lock:
            (old,) = self.read_many((kb,), None if ab is None else (ab,),
                                    guard=guard or _no_guard)
            vb = encode_value(fn(decode_value(old)))
            self.c["updates"] += 1
            self._write1(kb, ab, vb)
            self._check_thresholds()
            return vb

    def delete(self, kb: bytes, ab: bytes | None = None) -> None:
        """Delete ``kb``: at once from the cache (a read then answers as for a key no store
        has, never a store's old value), and at the next flush from every store."""
        with self._lock:
            args = decode_value(kb if ab is None else ab)
            try:
                payloads = [self._call(delete, args) for delete in self._deleters]
            except Exception:
                self.c["write_errors"] += 1
                raise  # nothing of this delete was cached or buffered
            self.c["deletes"] += 1
            if self._buffer(kb, payloads, len(kb)) and self.journal is not None:
                self.journal.append([DELETE, kb, ab])
            vb = _NONE if self.init_fn is None else encode_value(self.init_fn(args))
            self._put(kb, vb)
            self._absent.add(kb)
            self._expires.pop(kb, None)
            self._check_thresholds()

    def invalidate(self, kb: bytes) -> bool:
        """Drop ``kb`` from the cache only (flushing its pending write first, so nothing is
        lost); the next read asks the stores. Returns whether it was cached."""
        with self._lock:
            if (kb in self._dirty or kb in self._inflight) and not self.staged:
                self._flush(explicit=True)  # raises FlushError, dropping nothing
            cached = kb in self._entries
            if not self._unstored(kb):  # else newer than this call, or not stored yet
                self._drop(kb)
            return cached

    def forget(self, which: Callable[[bytes], bool]) -> int:
        """Drop every cached key ``which`` selects that has no pending write (a reshard
        gives its slot away, flushed), and keep a store read of one in progress from
        caching it; return how many entries went."""
        with self._lock:
            gone = [kb for kb in self._entries if which(kb) and not self._unstored(kb)]
            gone += [kb for kb in self._absent if which(kb) and kb not in self._entries
                     and not self._unstored(kb)]
            for kb in gone:
                self._drop(kb)
            for kb in [kb for kb in self._loading if which(kb)]:
                self._outdate(kb)
            return len(gone)

    # -- handing keys to another shard (resharding) -----------------------------------------
    def hold_flushes(self, held: bool) -> None:
        """Hold (True) or let go (False) every flush: while a reshard hands keys away, a
        flush here must not store what the new owner may already have overwritten. A timed
        flush skips meanwhile; an explicit one waits. Call with the lock held."""
        self._held = held
        if held:
            while self._flushing:  # the running flush ends first (its keys come back, or go)
                self._cond.wait()
        else:
            self._cond.notify_all()
            if self._dirty:
                self._wake.set()

    def export_keys(self, which: Callable[[bytes], bool]) -> list[list[Any]]:
        """The whole state of the keys ``which`` selects that a store does not have yet,
        one ``[kb, vb, absent, ttl left, {connector id: payload}, size, [[cid, error,
        attempts, payload], ...] (dead letters), {cid: [refusals, error]}]`` each: their
        pending payloads (exactly what this shard would flush), cached value and time to
        live, dead letters and attempt counts. Call with the lock held and flushes held."""
        assert not self._flushing, "export_keys needs flushes held"
        keys = {kb for kb in self._dirty if which(kb)}
        keys.update(kb for _, kb in self._dead if which(kb))
        keys.update(kb for _, kb in self._attempts if which(kb))
        now = self._clock()
        out = []
        for kb in keys:
            at = self._expires.get(kb)
            out.append([
                kb, self._entries.get(kb), kb in self._absent,
                None if at is None else max(0.0, at - now),
                {cid: self._pending[cid][kb] for cid in self._ids if kb in self._pending[cid]},
                self._pending_sizes.get(kb),
                [[d.cid, d.error, d.attempts, d.payload] for cid in self._ids
                 if (d := self._dead.get((cid, kb))) is not None],
                {cid: list(a) for cid in self._ids
                 if (a := self._attempts.get((cid, kb))) is not None},
            ])
        return out

    def adopt(self, states: Iterable[Sequence[Any]]) -> int:
        """Take over keys another shard exported (``export_keys``): their payloads pend here
        as they did there, replacing whatever this shard had of them. Not journaled here
        (the host journals the handoff). Call with the lock held; returns how many."""
        n = 0
        for kb, vb, absent, ttl, payloads, size, dead, attempts in states:
            for cid in self._ids:
                self._pending[cid].pop(kb, None)
                self._dead.pop((cid, kb), None)
                self._attempts.pop((cid, kb), None)
            self._dirty.discard(kb)
            self._pending_bytes -= self._pending_sizes.pop(kb, 0)
            self._drop(kb)
            unknown = set(payloads) - set(self._ids)
            if unknown:
                raise ValueError(f"shard {self.index}: handed payloads for connector(s) "
                                 f"{sorted(unknown)} it does not have")
            for cid, payload in payloads.items():
                self._pending[cid][kb] = payload
            if payloads:
                self._dirty.add(kb)
                self._pending_sizes[kb] = size if size is not None else len(kb)
                self._pending_bytes += self._pending_sizes[kb]
                if self._oldest_pending is None:
                    self._oldest_pending = self._clock()
            for cid, error, count, payload in dead:
                self._dead[(cid, kb)] = DeadLetter(kb, cid, error, count, payload)
            for cid, (count, error) in attempts.items():
                self._attempts[(cid, kb)] = (count, error)
            if vb is not None:
                self._put(kb, vb)
                if absent:
                    self._absent.add(kb)
                if ttl is not None:
                    self._expires[kb] = self._clock() + ttl
            if self._loading and kb in self._loading:
                self._outdate(kb)  # a store read of it in flight is older than this
            n += 1
        if self._dead:
            self._dead_journaled_upto = -1  # said again at the next segment
        return n

    def drop_keys(self, which: Callable[[bytes], bool]) -> int:
        """Forget everything of the keys ``which`` selects, pending writes and dead letters
        included (a reshard handed them to another shard, which flushes them now). Call with
        the lock held and flushes held; returns how many keys had pending state."""
        assert not self._flushing, "drop_keys needs flushes held"
        pending = [kb for kb in self._dirty if which(kb)]
        for kb in pending:
            for cid in self._ids:
                self._pending[cid].pop(kb, None)
            self._dirty.discard(kb)
            self._pending_bytes -= self._pending_sizes.pop(kb, 0)
        for key in [k for k in self._dead if which(k[1])]:
            del self._dead[key]
        for key in [k for k in self._attempts if which(k[1])]:
            del self._attempts[key]
        if not self._dirty:
            self._oldest_pending = None
        self.forget(which)
        return len(pending)

    # -- checkpoints (staged) -------------------------------------------------------------
    def seal(self, epoch: int, segment: int | None = None) -> dict[str, int]:
        """Close the open epoch as ``epoch``: what is pending now is that checkpoint's, and
        writes from now on are the next one's. Journaled (a SEAL record, then a new segment,
        so the epoch's records end in segments of its own). Call with the lock held.
        ``segment``: replay's (the record says it). Returns the epoch's counts."""
        if not self.staged:
            raise ValueError(f"shard {self.index} is not checkpointed")
        keys, self._dirty = self._dirty, set()
        if not keys:
            return {"keys": 0, "bytes": 0}
        payloads, self._pending = self._pending, {cid: {} for cid in self._ids}
        sizes, self._pending_sizes, size = self._pending_sizes, {}, self._pending_bytes
        self._pending_bytes = 0
        self._oldest_pending = None
        entries, absent = self._entries, self._absent
        values = {kb: (entries.get(kb), kb in absent) for kb in keys}
        if self.journal is not None:
            segment = self.journal.segment
            self.journal.append([SEAL, epoch, segment])
            self.journal.rotate()
        self._sealed[epoch] = _Sealed(payloads, sizes, values, segment)
        counts = self._sealed_keys
        for kb in keys:
            counts[kb] = counts.get(kb, 0) + 1
        return {"keys": len(keys), "bytes": size}

    def _unseal_keys(self, sealed: _Sealed) -> None:
        counts = self._sealed_keys
        for kb in sealed.sizes:
            n = counts.get(kb, 0) - 1
            if n > 0:
                counts[kb] = n
            else:
                counts.pop(kb, None)

    def unseal(self, epoch: int) -> bool:
        """The checkpoint of ``epoch`` failed: its writes are the open epoch's again (older
        than the open epoch's own, which win). Call with the lock held."""
        sealed = self._sealed.pop(epoch, None)
        if sealed is None:
            return False
        self._unseal_keys(sealed)
        for cid in self._ids:
            merged = sealed.payloads[cid]
            merged.update(self._pending[cid])
            self._pending[cid] = merged
        self._dirty.update(sealed.sizes)
        for kb, size in sealed.sizes.items():
            self._pending_sizes.setdefault(kb, size)
        self._pending_bytes = sum(self._pending_sizes.values())
        if self._oldest_pending is None and self._dirty:
            self._oldest_pending = self._clock()
        if self.journal is not None:
            self.journal.append([UNSEAL, epoch])
        return True

    def commit(self, epoch: int) -> None:
        """The checkpoint of ``epoch`` is committed: the stores may now have it, and every
        older sealed epoch (stored oldest first, by the flusher). Call with the lock held."""
        if epoch > self._committed:
            self._committed = epoch
            if self.journal is not None:
                self.journal.append([COMMITTED, epoch])
        if self._time_to_flush():
            self._wake.set()

    def rollback(self, epoch: int) -> int:
        """Restore the checkpoint of ``epoch`` (committed): drop every write made after it
        (the open epoch's, and sealed epochs after it); their keys read as of ``epoch`` (a
        committed epoch not stored yet) or from the stores. Returns how many keys went back.
        Call with the lock held."""
        while self._flushing:
            self._cond.wait()
        touched = set(self._dirty)
        self._pending = {cid: {} for cid in self._ids}
        self._dirty = set()
        self._pending_sizes, self._pending_bytes, self._oldest_pending = {}, 0, None
        for e in [e for e in self._sealed if e > epoch]:
            sealed = self._sealed.pop(e)
            self._unseal_keys(sealed)
            touched.update(sealed.sizes)
        if epoch > self._committed:
            self._committed = epoch
        for kb in touched:
            for sealed in reversed(self._sealed.values()):
                if kb in sealed.values:
                    vb, deleted = sealed.values[kb]
                    if vb is not None:
                        self._put(kb, vb)
                        if deleted:
                            self._absent.add(kb)
                        else:
                            self._absent.discard(kb)
                        self._expires.pop(kb, None)
                    break
            else:
                self._drop(kb)  # the stores have it as of the checkpoint
            if self._loading and kb in self._loading:
                self._outdate(kb)
        if self.journal is not None:
            self.journal.append([ROLLBACK, epoch])
        return len(touched)

    def _apply_committed(self, explicit: bool) -> int:
        """Store the committed sealed epochs, oldest first (the staged ``_flush``). An epoch
        the stores refuse stays sealed (and the newer ones wait): retried with backoff."""
        applied = 0
        while self._flushing:
            if self._store is None or not explicit:
                return 0
            self._cond.wait()
        while self._sealed:
            epoch = next(iter(self._sealed))
            if epoch > self._committed:
                break
            sealed = self._sealed[epoch]
            failed: dict[str, BaseException] = {}
            failed_keys: set[bytes] = set()
            self._inflight = set(sealed.sizes)
            self._flushing = True
            self._count_flush(sealed.payloads)
            self.c["flush_calls"] += 1
            try:
                for conn, cid in zip(self.connectors, self._ids):
                    if sealed.payloads[cid]:
                        self._flush_one(conn, cid, sealed.payloads[cid], failed, failed_keys,
                                        target=sealed.payloads)
            finally:
                self._inflight = set()
                self._flushing = False
                self._cond.notify_all()
            if failed:
                self._back_off()
                if explicit:
                    raise FlushError(self.index, failed)
                return applied
            self._backoff = self._retry_at = 0.0
            del self._sealed[epoch]
            self._unseal_keys(sealed)
            self.c["flush"] += len(sealed.sizes)
            applied += len(sealed.sizes)
            if self.journal is not None:
                if self._dead:  # said again in the open segment: the released ones held them
                    for d in self._dead.values():
                        self._journal_dead(d)
                self.journal.append([APPLIED, epoch])
                self.journal.commit()
                if sealed.segment is not None:
                    self._io(self.journal.release, sealed.segment)
            if self._over_capacity():
                self._evict()
        return applied

    def staged_state(self) -> dict[str, Any]:
        """What a checkpointed shard holds that no store has: the open epoch's keys, the
        sealed epochs (and which are committed)."""
        with self._lock:
            return {"open": len(self._dirty), "sealed": {e: len(s.sizes)
                                                         for e, s in self._sealed.items()},
                    "committed": self._committed}

    def invalidate_all(self) -> int:
        """Flush every pending write, then drop every entry; return how many were dropped."""
        with self._lock:
            self._flush(explicit=True)
            # Writes that came in while the flush ran are newer than this call: they stay
            # (and, checkpointed, so do writes of epochs the stores do not have yet).
            keep = self._dirty | self._inflight | self._sealed_keys.keys()
            if not keep:
                n = len(self._entries)
                self._entries.clear()
                self._absent.clear()
                self._expires.clear()
                self._bytes = 0
                return n
            gone = [kb for kb in self._entries if kb not in keep]
            for kb in gone:
                self._drop(kb)
            return len(gone)

    def full(self) -> bool:
        """Whether the write buffer reached ``max_pending`` keys or ``max_pending_bytes``.
        What a running flush holds counts too: if that flush fails, it comes back."""
        return bool((self.max_pending is not None
                     and len(self._dirty) + len(self._inflight) + len(self._sealed_keys)
                     >= self.max_pending)
                    or (self.max_pending_bytes is not None
                        and self._pending_bytes + self._inflight_bytes
                        >= self.max_pending_bytes))

    def replay(self, records: Iterable[Sequence[Any]]) -> int:
        """Apply journal records a previous run of this shard left (its acknowledged writes
        and deletes that no flush stored), without journaling them again; they are pending
        afterwards, as they were. Returns how many were applied."""
        n = 0
        journal, self.journal = self.journal, None
        try:
            with self._lock:
                for record in records:
                    try:
                        if record[0] == WRITE:
                            self._write1(*record[1:])
                        elif record[0] == DELETE:
                            self.delete(*record[1:])
                        elif record[0] == DEAD:
                            _, cid, kb, blob, error, attempts = record
                            self._dead[(cid, kb)] = DeadLetter(kb, cid, error, attempts,
                                                               pickle.loads(blob))
                            # Out of the buffer when it was buried: a WRITE of it replayed
                            # from an unreleased segment must not make it pending again.
                            self._unbuffer(cid, kb)
                            continue
                        elif record[0] == UNDEAD:
                            self._undead(*record[1:])
                            continue
                        elif record[0] == ADOPT:  # one key a reshard handed to this shard
                            self.adopt([record[2]])
                        elif record[0] == SEAL:
                            self.seal(record[1], record[2])
                            continue
                        elif record[0] == COMMITTED:
                            self._committed = max(self._committed, record[1])
                            continue
                        elif record[0] == APPLIED:  # stored: the sealed copy goes
                            applied = self._sealed.pop(record[1], None)
                            if applied is not None:
                                self._unseal_keys(applied)
                            continue
                        elif record[0] == UNSEAL:
                            self.unseal(record[1])
                            continue
                        elif record[0] == ROLLBACK:
                            self.rollback(record[1])
                            continue
                        n += 1
                    except Exception as e:  # a connector refusing it now: say so, go on
                        log.error("shard %d: journal record not replayed: %r", self.index, e)
                        self.c["replay_errors"] += 1
        finally:
            self.journal = journal
        self.c["replayed"] += n
        return n

    def _undead(self, cid: str, kb: bytes, blob: bytes | None) -> None:
        """Replay a dead letter's fate: retried (its payload pending again) or discarded."""
        d = self._dead.pop((cid, kb), None)
        if blob is not None and cid in self._pending:
            self._requeue(cid, kb, pickle.loads(blob), "" if d is None else d.error)

    def _unbuffer(self, cid: str, kb: bytes) -> None:
        if self._pending[cid].pop(kb, None) is not None and \
                not any(kb in p for p in self._pending.values()):
            self._dirty.discard(kb)
            self._pending_bytes -= self._pending_sizes.pop(kb, 0)

    def _requeue(self, cid: str, kb: bytes, payload: Any, error: str) -> None:
        """Put a dead letter's payload back in the buffer. Its attempts start again; the
        error is remembered, so a lone retried payload refused the same way again is still
        told from a store that is down."""
        self._attempts[(cid, kb)] = (0, error)
        self._pending[cid].setdefault(kb, payload)
        self._dirty.add(kb)
        if kb not in self._pending_sizes:  # a key pending already keeps its own size
            self._pending_sizes[kb] = len(kb)
            self._pending_bytes += len(kb)
        if self._oldest_pending is None:
            self._oldest_pending = self._clock()

    def register_function(self, digest: bytes, fn: Callable[[Any], Any]) -> None:
        self._functions[digest] = fn

    def function(self, digest: bytes) -> Callable[[Any], Any] | None:
        return self._functions.get(digest)

    # -- flushing -------------------------------------------------------------------------
    def _time_to_flush(self) -> bool:
        if self.staged:  # only committed epochs are stored, whatever the thresholds say
            return bool(self._sealed) and min(self._sealed) <= self._committed
        if not self._dirty:
            return False
        if len(self._dirty) > self.writes_threshold:
            return True
        assert self._oldest_pending is not None
        return (self._clock() - self._oldest_pending) * 1000 >= self.millis_threshold

    def _check_thresholds(self) -> None:
        if self._time_to_flush() and self._clock() >= self._retry_at:
            if self._store is None:
                self._flush(explicit=False)
            elif not self._wake.is_set():
                self._wake.set()  # the flusher thread flushes; this write returns now

    def tick(self) -> None:
        """Flush if a threshold has passed (the flusher thread calls this periodically; an
        embedded shard's owner may)."""
        with self._lock:
            # Over capacity with pending entries at the LRU end: a flush lets them go.
            due = self._time_to_flush() or (
                self._dirty and self._over_capacity() and not self.staged)
            if due and self._clock() >= self._retry_at:
                self._flush(explicit=False)

    def _flush_loop(self, period: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(period)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # counted in the metrics; keep flushing
                log.exception("shard %d: timed flush failed", self.index)

    def flush_count(self) -> int:
        """Flush every pending write now and return the number of distinct keys flushed
        (a recorded checkpoint still runs); raise FlushError if a connector failed."""
        with self._lock:
            return self._flush(explicit=True)

    def flush(self, checkpoint: Any = _UNSET) -> Any:
        """Flush every pending write now; raise FlushError if a connector failed.

        Returns the checkpoint handler's result when a checkpoint state was recorded and
        something was flushed, else the number of distinct keys flushed.
        """
        with self._lock:
            if checkpoint is not _UNSET:
                self._checkpoint = checkpoint
            flushed = self._flush(explicit=True)
            return self.last_checkpoint_result if self._ran_checkpoint else flushed

    def _flush(self, explicit: bool) -> Any:
        self._ran_checkpoint = False
        if self.staged:
            return self._apply_committed(explicit)
        while self._held:
            if not explicit:
                return 0
            self._cond.wait()  # a reshard hands keys away: short, or it gives up
        while self._flushing:
            if self._store is None or not explicit:
                # Re-entered from a connector (embedded), or a timed flush while another
                # runs: that one takes care of it.
                return 0
            self._cond.wait()  # an explicit flush covers what is buffered now: wait, then go
        # Take the buffer first, so a write arriving during the connector calls lands in a
        # fresh buffer and is never lost (the seed read, flushed, then reset).
        snapshot, self._pending = self._pending, {cid: {} for cid in self._ids}
        dirty, self._dirty = self._dirty, set()
        taken_bytes = self._pending_bytes
        sizes, self._pending_sizes, self._pending_bytes = self._pending_sizes, {}, 0
        oldest, self._oldest_pending = self._oldest_pending, None
        if not dirty:
            return 0
        # Every journal record so far is in this snapshot (appends happen under this lock).
        segment = (self.journal.rotate(_JOURNAL_SEGMENT_BYTES) if self.journal is not None
                   else None)
        if segment is not None and self._dead and segment != self._dead_journaled_upto:
            # A new segment began: the ones this flush releases may hold the DEAD records.
            self._dead_journaled_upto = segment
            for d in self._dead.values():
                self._journal_dead(d)
        self.c["flush_calls"] += 1
        failed: dict[str, BaseException] = {}
        failed_keys: set[bytes] = set()
        self._inflight = dirty
        self._inflight_bytes = taken_bytes
        self._flushing = True
        self._count_flush(snapshot)
        dead_before = self.c["dead_letters"]
        try:
            for conn, cid in zip(self.connectors, self._ids):
                self._flush_one(conn, cid, snapshot[cid], failed, failed_keys)
        finally:
            self._inflight = set()
            self._inflight_bytes = 0
            self._flushing = False
            self._cond.notify_all()  # explicit flushes and writers waiting for room
        buried = self.c["dead_letters"] - dead_before
        self.c["flush"] += len(dirty) - len(failed_keys) - buried
        if not failed and self._over_capacity():  # a write during the flush went over
            self._evict()
        if failed:
            self._dirty |= failed_keys
            for kb in failed_keys:  # a newer write since the snapshot keeps its own size
                self._pending_sizes.setdefault(kb, sizes.get(kb, len(kb)))
            self._pending_bytes = sum(self._pending_sizes.values())
            self._oldest_pending = oldest
            self._back_off()
            if segment is not None:
                self.journal.keep(segment)
            if explicit:
                raise FlushError(self.index, failed)
            return 0
        if self._backoff:
            log.warning("shard %d: the stores take writes again; flushed %d key(s)",
                        self.index, len(dirty))
        self._backoff = 0.0
        self._retry_at = 0.0
        if segment is not None:
            self.journal.commit()  # DEAD records of this flush reach the file first
            # All of it is stored (or a dead letter) now. Unlinking megabytes of segment
            # files took 3-5 ms, so it runs as store I/O does, with the lock released (the
            # store thread runs calls in order: a later flush's store calls come after it).
            self._io(self.journal.release, segment)
        flushed = len(dirty)
        if self._store is not None and flushed > _FLUSH_CHUNK:
            # The flush's key set and size map hold every key it took (100k): freed at
            # once, on return, under the lock, they held the GIL for 5-7 ms in one C call,
            # and every read waited. Emptied piecewise on the store thread (the lock
            # released), the interpreter can switch threads between items.
            self._io(_empty_piecewise, dirty, sizes)
        if self.checkpoint_handler is not None and self._checkpoint is not _UNSET:
            try:
                self.last_checkpoint_result = self.checkpoint_handler(self._checkpoint)
                self._checkpoint = _UNSET  # consumed: a later flush needs a newer state
                self._ran_checkpoint = True
                self.c["checkpoints"] += 1
            except Exception:
                self.c["checkpoint_errors"] += 1
                if explicit:
                    raise
                log.exception("shard %d: checkpoint handler failed", self.index)
        return flushed

    def _count_flush(self, payloads: dict[str, dict[bytes, Any]]) -> None:
        """A flush starts with ``payloads`` (per connector): reset its progress counters."""
        self._flush_payloads = sum(len(p) for p in payloads.values())
        self._flush_stored = 0

    def _back_off(self) -> None:
        """A flush failed: wait longer before the next timed one (doubling, 50 ms to 5 s).
        Jitter: shards that failed together do not retry in lockstep."""
        self._backoff = min(max(self._backoff * 2, 0.05), 5.0)
        self._retry_at = self._clock() + self._backoff * random.uniform(0.5, 1.0)
        self.c["retries"] += 1

    def _store_flush(self, conn: BaseConnector, payloads: list[Any]) -> None:
        self._connected(conn)
        self._call(self._flush_fn(conn, len(payloads)), payloads)

    def _flush_fn(self, conn: BaseConnector, n: int) -> Callable[[list[Any]], Any]:
        """What stores a batch of ``n`` payloads for ``conn``: its flush process, or its own
        ``flush`` (no process, or a small batch: a few ms of CPU that stalls no read, and a
        cache that only ever flushes a little never starts a child). The two take turns on
        the store thread, so batches still reach the store one at a time, in order."""
        proc = self._flushers.get(id(conn)) if self._flushers else None
        return conn.flush if proc is None or n < self.flush_process_min else proc.flush

    @staticmethod
    def _flush_process_ok(conn: BaseConnector) -> bool:
        return bool(getattr(conn, "flush_process_safe", False)) and not getattr(
            conn, "process_local", False)

    def _store_chunk(self, conn: BaseConnector, payloads: dict[bytes, Any], part: list[bytes],
                     chunk: list[Any]) -> None:
        """On the store thread: move the next _FLUSH_CHUNK payloads of a flush's snapshot
        ``payloads`` (its own dict: nothing else touches it) into ``part`` (their keys) and
        ``chunk``, in order, and store them. Popped, the payloads' last reference is the
        chunk's, so this thread frees them, a chunk at a time, with the lock released (all
        100k at once held the GIL for ~8 ms). No list of every key is made: a new 100k-item
        container costs each young-generation GC pass that meets it ~10 ms."""
        part.extend(islice(payloads, _FLUSH_CHUNK))
        chunk.extend([payloads.pop(kb) for kb in part])
        self._store_flush(conn, chunk)

    def _connected(self, conn: BaseConnector) -> None:
        """Connect ``conn`` if it could not be connected at start; raise if it still can't."""
        if self._unconnected and conn in self._unconnected:
            self._call(conn.connect)
            self._unconnected.remove(conn)
            log.warning("shard %d: %s is connected now", self.index, conn.get_id())

    def _flush_one(self, conn: Connector, cid: str, payloads: dict[bytes, Any],
                   failed: dict[str, BaseException], failed_keys: set[bytes],
                   target: dict[str, dict[bytes, Any]] | None = None) -> None:
        # In chunks of _FLUSH_CHUNK payloads, in buffer order: see _FLUSH_CHUNK. The store
        # thread takes each chunk out of the snapshot itself (_store_chunk), so neither
        # that nor freeing the chunk afterwards happens under the lock.
        lone = len(payloads) == 1
        kept: list[Any] = []
        error: BaseException | None = None
        while payloads:
            part: list[bytes] = []  # the chunk's keys and payloads, as _store_chunk took them
            chunk: list[Any] = []
            try:
                self._io(self._store_chunk, conn, payloads, part, chunk)
                self._flush_stored += len(chunk)
                continue
            except Exception as e:
                err = e
            if error is None:  # counted once per connector and flush, as one batch was
                error = err
                self.c["flush_errors"] += 1
                self.last_errors[cid] = f"{type(err).__name__}: {err}"
            if not self._flush_failed(conn, cid, list(zip(part, chunk)), err, kept, lone):
                # The store is down or takes nothing: the chunks after this one are kept
                # untried, as a failed batch keeps all of its payloads.
                kept.extend((kb, p, err) for kb, p in payloads.items())
                break
        if kept:  # keep these payloads for the next attempt; newer writes since win
            failed[cid] = kept[0][2]
            merged = {kb: payload for kb, payload, _ in kept}
            failed_keys.update(merged)
            target = self._pending if target is None else target  # or a sealed epoch's
            merged.update(target[cid])
            target[cid] = merged

    def _flush_failed(self, conn: Connector, cid: str, items: list[tuple[bytes, Any]],
                      error: Exception, kept: list[Any], lone: bool) -> bool:
        """One chunk of a flush failed with ``error``: single out the payloads the store
        refuses while it stores the others, add what stays pending to ``kept``, and say
        whether the store took anything (then the next chunks are tried)."""
        if isinstance(error, OSError):
            # The store is unreachable (connectors raise ConnectionError/TimeoutError for
            # that): bisecting would only wait on it again, up to 6 more times.
            held, refused, stored = [(kb, p, error) for kb, p in items], [], False
        else:
            held, refused, stored = self._isolate(conn, items, error)
        if lone and not refused:
            # A lone payload cannot be told from a store that is down, unless it was singled
            # out before and the store refuses it with the very same error again.
            (kb, payload, e), = held
            seen = self._attempts.get((cid, kb))
            if seen is not None and seen[1] == _error_text(e):
                held, refused = [], held
        for kb, payload, e in refused:  # refused on its own while the store took others
            n = self._attempts.get((cid, kb), (0, ""))[0] + 1
            self._attempts[(cid, kb)] = (n, _error_text(e))
            if self.max_attempts and n >= self.max_attempts:
                self._bury(cid, kb, payload, e, n)
            else:
                held.append((kb, payload, e))
        if refused:
            log.warning("shard %d: %s refused %d payload(s) of %d and stored the rest: %r",
                        self.index, cid, len(refused), len(items), refused[0][2])
        elif stored:  # it came back while the batch was being split: all of it stored
            pass
        else:
            _warn_limited(log, ("flush", self.index, cid),
                          "shard %d: flush of %d payloads to %s failed: %r",
                          self.index, len(items), cid, error)
        kept.extend(held)
        return stored

    def _isolate(self, conn: Connector, items: list[tuple[bytes, Any]], error: Exception
                 ) -> tuple[list[Any], list[Any], bool]:
        """After a failed batch: find the payloads the store refuses while it stores others.

        Halve the failing parts level by level, flushing each half, down to single
        payloads. If two levels go by without the store taking anything, stop: it is down
        (or refuses everything), and nothing is singled out. Costs about 2 log2(n) calls
        per poison payload among n, and 6 for a store that is down. Returns (payloads kept
        as they are, payloads refused on their own, whether anything was stored), each
        payload as (key, payload, error)."""
        refused: list[Any] = []
        stored = False
        level = [(items, error)]
        depth = 0
        while level:
            below = []
            for part, err in level:
                if len(part) == 1:
                    refused.append((part[0][0], part[0][1], err))
                    continue
                for half in (part[:len(part) // 2], part[len(part) // 2:]):
                    try:
                        self._io(self._call, self._flush_fn(conn, len(half)),
                                 [p for _, p in half])
                        stored = True
                    except Exception as e:
                        below.append((half, e))
            depth += 1
            if not stored and depth >= 2:  # the store takes nothing: do not bisect on
                return [(kb, p, e) for part, e in below for kb, p in part] + refused, [], False
            level = below
        if not stored:  # nothing singled out: a refusal of everything is not a poison write
            return refused, [], False
        return [], refused, True

    def _pickled(self, d: DeadLetter) -> bytes | None:
        """``d``'s payload as the journal keeps it; None (said once per key) if it cannot
        be pickled: it is then kept in memory only."""
        try:
            return pickle.dumps(d.payload)
        except Exception as e:
            _warn_limited(log, ("dead-pickle", self.index, d.kb),
                          "shard %d: a dead letter's payload cannot be journaled (%r); a "
                          "crash of this shard would lose it", self.index, e)
            return None

    def _journal_dead(self, d: DeadLetter) -> None:
        if self.journal is not None and (blob := self._pickled(d)) is not None:
            self.journal.append([DEAD, d.cid, d.kb, blob, d.error, d.attempts])

    def _bury(self, cid: str, kb: bytes, payload: Any, error: BaseException, n: int) -> None:
        d = self._dead[(cid, kb)] = DeadLetter(kb, cid, f"{type(error).__name__}: {error}",
                                               n, payload)
        self._journal_dead(d)
        self._attempts.pop((cid, kb), None)
        self.c["dead_letters"] += 1
        log.error("shard %d: %s refused the write of key %r %d times; it is a dead letter "
                  "now (cache.dead_letters())", self.index, cid, _show_key(kb), n)

    # -- dead letters ---------------------------------------------------------------------
    def dead_letters(self) -> list[dict[str, Any]]:
        """What stores kept refusing: key, connector id, the store's error, attempts."""
        with self._lock:
            return [{"key": _show_key(d.kb), "kb": d.kb, "connector": d.cid, "error": d.error,
                     "attempts": d.attempts, "shard": self.index}
                    for d in self._dead.values()]

    def retry_dead_letters(self) -> int:
        """Put every dead letter back in the buffer (attempts start again); how many."""
        with self._lock:
            dead, self._dead = self._dead, {}
            for d in dead.values():
                # Pending again: a crash must not lose it.
                if self.journal is not None and (blob := self._pickled(d)) is not None:
                    self.journal.append([UNDEAD, d.cid, d.kb, blob])
                self._requeue(d.cid, d.kb, d.payload, d.error)
            self._retry_at = 0.0
            if self._store is not None:
                self._wake.set()
            return len(dead)

    def discard_dead_letters(self) -> int:
        """Forget every dead letter (the stores never get them); how many."""
        with self._lock:
            n = len(self._dead)
            if self.journal is not None:
                for d in self._dead.values():
                    self.journal.append([UNDEAD, d.cid, d.kb, None])
            self._dead.clear()
            return n

    # -- introspection and shutdown -------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        with self._lock:
            m: dict[str, Any] = dict(self.c)
            m["entries"] = len(self._entries)
            m["bytes"] = self._bytes
            m["pending"] = len(self._dirty)
            m["pending_bytes"] = self._pending_bytes
            m["oldest_pending_ms"] = (
                0.0 if self._oldest_pending is None
                else (self._clock() - self._oldest_pending) * 1000)
            m["last_errors"] = dict(self.last_errors)
            m["dead_letters_held"] = len(self._dead)
            m["flushing"] = self._flushing
            # Per connector flushed through a child process: its pid (None until the first
            # large flush starts it, or after it ended; a later one starts another).
            m["flush_pids"] = {conn.get_id(): self._flushers[id(conn)].pid
                               for conn in self.connectors if id(conn) in self._flushers}
            m["flushing_keys"] = len(self._inflight)
            # Keys of the running flush no store has taken yet, estimated from its payloads
            # (exact with one connector; a key goes to every connector): progress bars.
            m["flushing_unstored"] = (
                -(-len(self._inflight) * (self._flush_payloads - self._flush_stored)
                  // self._flush_payloads)
                if self._flushing and self._flush_payloads else 0)
            return m

    def contains(self, kb: bytes) -> bool:
        with self._lock:
            return kb in self._entries

    def close(self, disconnect: bool = False) -> dict[str, Any]:
        """Flush (raising FlushError if a store fails), optionally disconnect; return metrics."""
        with self._lock:
            self._flush(explicit=True)
            if disconnect:
                for conn in self.connectors:
                    self._io(self._call, conn.disconnect)
            if self._store is not None:
                self._io(self._close_loop)
                self._io(self._close_flushers)
                self._store.stop()
                # Closed: anything called later (a second close) runs its I/O right here.
                self._store = None
                self._stop.set()
                self._wake.set()
            self._close_loop()
            return self.metrics()

    def stop(self) -> None:
        """End the store and flusher threads without flushing (a shutdown that gave up on
        its stores; the journal keeps what is pending)."""
        with self._lock:
            if self._store is not None:
                self._store.stop()
                self._store = None
            self._stop.set()
            self._wake.set()

    def _close_flushers(self) -> None:
        for proc in self._flushers.values():
            proc.close()

    def _close_loop(self) -> None:
        loop = getattr(self._loops, "loop", None)
        if loop is not None:
            loop.close()
            self._loops.loop = None

    # -- plain-value conveniences (tests, embedding without Ray) ---------------------------
    def get(self, key: Any) -> Any:
        return decode_value(self.read(encode_key(key)))

    def put(self, key: Any, value: Any) -> Any:
        self.write(encode_key(key), None, encode_value(value))
        return value
