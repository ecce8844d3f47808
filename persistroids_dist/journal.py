"""A shard's write-ahead journal: every buffered write and delete is appended before the
shard acknowledges it, and a restarted shard replays it before it serves anything.

Records are msgpack arrays appended to numbered segment files. A flush starts a new segment
(``rotate``); once a flush wrote everything it took to every store, the segments before it
hold nothing that is not stored, and go (``release``). So the journal holds at most what is
pending, plus what arrived during the flush.

Appends go to a buffer under the shard's lock; ``commit`` writes the buffer to the file
before the shard sends the answers it covers (so a SIGKILL of the shard process loses no
acknowledged write: the kernel has it). When it reaches the disk depends on ``fsync``:
``"always"`` (before every answer), ``"interval"`` (every ``interval_s``, as Redis's
``appendfsync everysec``), or ``"off"`` (when the OS decides).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from . import protocol

__all__ = ["FSYNC_MODES", "Journal"]

log = logging.getLogger("persistroids_dist.journal")

FSYNC_MODES = ("always", "interval", "off")
_SEGMENT = re.compile(r"^(\d{8})\.journal$")

# Record kinds.
WRITE = 0  # [WRITE, kb, ab, vb, ttl_s]
DELETE = 1  # [DELETE, kb, ab]
# Dead letters: a payload a store kept refusing, out of the buffer (its WRITE may be in a
# released segment), and what became of it. Payloads are the connector's own objects,
# pickled: the journal is this shard's own file, never data from the network.
DEAD = 2  # [DEAD, connector id, kb, pickled payload, error text, attempts]
UNDEAD = 3  # [UNDEAD, connector id, kb, pickled payload (retried) | None (discarded)]
# Sessions (see ``session``): a numbered request, whole (its records and the answer it got
# are one record, so a crash keeps all of it or none: a request must never be replayed and
# then resent), and the session table, said again at the start of every new segment.
REQUEST = 4  # [REQUEST, session id, seq, answer frame, [record, ...]]
SESSIONS = 5  # [SESSIONS, [[session id, last seq, answer frame, [[seq, error frame]...]]...]]
# (6-9: resharding, in ``slots``.) Checkpoints (a cache made with ``checkpoints=``): the
# records since the previous SEAL are one epoch; the stores get an epoch only once it is
# committed (its manifest is written), in epoch order.
SEAL = 10  # [SEAL, epoch, segment]: the epoch's records end here (``segment``: this one)
COMMITTED = 11  # [COMMITTED, epoch]: its manifest is written; the stores may have it
APPLIED = 12  # [APPLIED, epoch]: the stores have it
UNSEAL = 13  # [UNSEAL, epoch]: its checkpoint failed; its records belong to the next one
ROLLBACK = 14  # [ROLLBACK, epoch]: everything after that epoch is dropped (a restore)



class Journal:
    """The journal of one shard, in ``directory`` (created if needed; one per shard)."""

    def __init__(self, directory: str, fsync: str = "interval", interval_s: float = 0.1) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.fsync = fsync
        self._lock = threading.Lock()
        self._buf = bytearray()
        # One packer for every record: msgpack.packb would build one (with a 256 KiB
        # buffer) per write. Records hold only bytes, ints, floats and None: packing never
        # fails half-way or runs Python code.
        self._packer = msgpack.Packer(autoreset=True)
        self._unsynced = False
        self._unsynced_segments: set[int] = set()  # closed by rotate() before an fsync
        self._closed = False
        existing = self._segments()
        self._first_new = (existing[-1] + 1) if existing else 0
        self._seg = self._first_new
        self._fd = self._open(self._seg)
        self._seg_bytes = 0  # written to the current segment
        self._released = -1  # segments up to this one are gone
        self.appended = 0
        # A request's records are staged per thread (``begin_request``) and appended whole.
        self._local = threading.local()
        # The records to start each new segment with (the session table, the slots owned),
        # called under the shard's lock like every append.
        self.on_rotate: Callable[[], list[list[Any]]] | None = None
        self._stop = threading.Event()
        if fsync == "interval":
            threading.Thread(target=self._sync_loop, args=(interval_s,), daemon=True,
                             name="persistroids-journal-fsync").start()
        # A backup on another node (``replica.MirrorLink``): every byte written to a segment
        # is sent to it, and ``commit`` waits for its acknowledgement. ``on_mirror_lost`` is
        # told when it stops answering: it returns to go on without one, or raises (this
        # shard was deposed) and the commit raises with it.
        self.mirror: Any = None
        self._ticket = 0  # the mirror's ticket of the last frame sent
        self.on_mirror_lost: Callable[[BaseException], None] | None = None
        self._mirror_lock = threading.Lock()
        self._deposed: BaseException | None = None

    # -- files ----------------------------------------------------------------------------
    def _path(self, seg: int) -> str:
        return os.path.join(self.directory, f"{seg:08d}.journal")

    def _segments(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:  # removed by close(remove=True)
            return []
        return sorted(int(m.group(1)) for name in names if (m := _SEGMENT.match(name)))

    def _open(self, seg: int) -> int:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # if someone removed it
        return os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @property
    def bytes(self) -> int:
        """Bytes of journal on disk (plus what is buffered)."""
        total = len(self._buf)
        for seg in self._segments():
            try:
                total += os.path.getsize(self._path(seg))
            except OSError:
                pass
        return total

    # -- recovery -------------------------------------------------------------------------
    def recovered(self) -> Iterator[list[Any]]:
        """The records of the segments a previous run left, oldest first. A record cut off
        by a crash in the middle of a write ends its segment (it was never acknowledged)."""
        for seg in self._segments():
            if seg >= self._first_new:
                break
            with open(self._path(seg), "rb") as f:
                data = f.read()
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(data)
            good = 0
            try:
                for record in unpacker:
                    good = unpacker.tell()
                    yield record
            except (ValueError, msgpack.UnpackException) as e:
                log.warning("journal %s: segment %d ends in a damaged record after %d of %d "
                            "bytes (%s); the rest is skipped", self.directory, seg, good,
                            len(data), e)

    # -- appending ------------------------------------------------------------------------
    def append(self, record: list[Any]) -> None:
        """Buffer ``record``; ``commit`` writes it (before its write is acknowledged). Inside
        ``begin_request`` on this thread, stage it for that request's record instead."""
        staged = self._local.__dict__.get("staged")
        if staged is not None:
            staged.append(record)
            return
        with self._lock:  # the lock also keeps the packer to one thread at a time
            self._buf += self._packer.pack(record)
            self.appended += 1

    def begin_request(self) -> None:
        """Stage this thread's appends until ``end_request``."""
        self._local.staged = []

    def end_request(self, head: list[Any]) -> None:
        """Append ``head + [staged records]`` as one record (a REQUEST): replayed whole, or,
        cut off by a crash, not at all."""
        staged, self._local.staged = self._local.staged, None
        head.append(staged)
        with self._lock:
            self._buf += self._packer.pack(head)
            self.appended += len(staged)

    def commit(self) -> None:
        """Hand the buffered records to the kernel (and the disk, with ``fsync="always"``).
        The shard calls this before it sends the answers of a batch of requests."""
        # Always under the lock, even with nothing buffered: another thread may be writing
        # records this caller's answers depend on; they must reach the kernel first.
        with self._lock:
            self._write_buffer()
            if self.fsync == "always":
                os.fsync(self._fd)
                self._unsynced = False
            mirror, ticket = self.mirror, self._ticket
        if self._deposed is not None:
            raise self._deposed
        if mirror is not None:
            # Outside the lock: appends go on while the backup answers, and one wait covers
            # every commit that queued behind it.
            try:
                mirror.wait(ticket)
            except ConnectionError as e:
                self._mirror_lost(mirror, e)

    def sync(self) -> bool:
        """Make every record appended so far durable now (the disk, not just the kernel),
        whatever the fsync mode except "off": the open segment, every closed segment not
        synced yet, and the folder (a new segment's name). For the rare records a commit
        point elsewhere depends on (a checkpoint's seal: its manifest is written next, and
        a power loss must not leave a recorded checkpoint without its writes). Returns
        whether it synced (False under "off")."""
        with self._lock:
            self._write_buffer()
            if self.fsync == "off" or self._closed:
                return False
            os.fsync(self._fd)
            self._unsynced = False
            upto = self._seg - 1
        self.keep(upto)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _mirror_lost(self, mirror: Any, error: BaseException) -> None:
        """``mirror`` stopped answering: ask ``on_mirror_lost`` once (other commits waiting
        on the same link get its verdict), then go on without it, or raise."""
        with self._mirror_lock:
            if self.mirror is mirror:
                try:
                    if self.on_mirror_lost is not None:
                        self.on_mirror_lost(error)
                except BaseException as e:
                    self._deposed = e
                with self._lock:
                    if self.mirror is mirror:
                        self.mirror = None
                mirror.close()
        if self._deposed is not None:
            raise self._deposed

    def attach_mirror(self, mirror: Any) -> None:
        """Make ``mirror`` this journal's backup: send it every segment on disk (after a
        reset), then every byte written from now on; return once it has them all."""
        with self._lock:
            self._write_buffer()
            ticket = mirror.send(protocol.MIRROR_RESET)
            for seg in self._segments():
                with open(self._path(seg), "rb") as f:
                    data = f.read()
                if data or seg == self._seg:
                    ticket = mirror.send(protocol.mirror_append(seg, data))
            old, self.mirror, self._ticket = self.mirror, mirror, ticket
        if old is not None:
            old.close()
        mirror.wait(ticket)

    def detach_mirror(self) -> None:
        with self._lock:
            old, self.mirror = self.mirror, None
        if old is not None:
            old.close()

    def _write_buffer(self) -> None:
        if self._buf and not self._closed:
            data = bytes(self._buf)
            self._buf.clear()
            self._seg_bytes += len(data)
            done = os.write(self._fd, data)
            while done < len(data):  # a short write (rare for regular files)
                done += os.write(self._fd, data[done:])
            self._unsynced = True
            if self.mirror is not None:
                self._ticket = self.mirror.send(protocol.mirror_append(self._seg, data))

    def _sync_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                if self._closed:
                    return
                if self._unsynced:
                    os.fsync(self._fd)
                    self._unsynced = False

    # -- trimming -------------------------------------------------------------------------
    @property
    def segment(self) -> int:
        """The segment records are appended to now."""
        return self._seg

    def rotate(self, min_bytes: int = 0) -> int:
        """Called when a flush takes the shard's buffer. If the current segment holds
        ``min_bytes`` or more, start a new one. Returns the last closed segment: every record
        in it and before it is in this flush (``release`` it once the flush stored all).
        Records stay in the open segment until a later rotation: a replay then applies a
        few already-stored writes again, in order, which leaves the same state."""
        with self._lock:
            self._write_buffer()
            if self._seg_bytes < min_bytes:
                return self._seg - 1
            # No fsync here (a flush per ~100 writes would pay one each): if the flush
            # stores everything, this segment goes anyway; if not, ``keep`` syncs it.
            if self._unsynced and self.fsync != "off":
                self._unsynced_segments.add(self._seg)
            self._unsynced = False
            os.close(self._fd)
            last = self._seg
            self._seg += 1
            self._fd = self._open(self._seg)
            self._seg_bytes = 0
            if self.on_rotate is not None:  # what the segments going away must not take
                for record in self.on_rotate():
                    self._buf += self._packer.pack(record)
            return last

    def keep(self, upto: int) -> None:
        """A flush failed: the segments up to ``upto`` stay, so make them durable."""
        with self._lock:  # a rotation on another thread adds to the set
            segments = sorted(s for s in self._unsynced_segments if s <= upto)
        for seg in segments:
            try:
                fd = os.open(self._path(seg), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass
            self._unsynced_segments.discard(seg)

    def release(self, upto: int) -> None:
        """Remove the segments up to ``upto``: a flush stored everything they hold."""
        if upto <= self._released:
            return
        self._released = upto
        with self._lock:
            if self.mirror is not None:  # the backup drops them too (no need to wait)
                self._ticket = self.mirror.send(protocol.mirror_release(upto))
        for seg in self._segments():
            if seg > upto:
                break
            self._unsynced_segments.discard(seg)
            try:
                os.unlink(self._path(seg))
            except FileNotFoundError:
                pass

    def close(self, remove: bool = False) -> None:
        """Write what is buffered and close; with ``remove``, delete the journal (everything
        in it is stored)."""
        with self._lock:
            if self._closed:
                return
            self._write_buffer()
            if self._unsynced and self.fsync != "off":
                os.fsync(self._fd)
            os.close(self._fd)
            self._closed = True
        self._stop.set()
        self.detach_mirror()
        if remove:  # the folder is this shard's own: its segments and its restart count
            for name in os.listdir(self.directory):
                os.unlink(os.path.join(self.directory, name))
            for folder in (self.directory, os.path.dirname(self.directory)):
                try:  # the cache's folder goes with its last shard's
                    os.rmdir(folder)
                except OSError:
                    break
