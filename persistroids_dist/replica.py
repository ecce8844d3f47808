"""Backups of a shard on another node: its journal, mirrored byte for byte before every
acknowledgement.

A shard with a backup (``init(..., replicas=1)``) sends every byte its journal writes to the
backup, which writes it to a segment file of the same number in a folder on its own node's
disk, and waits for the backup to say so before the answers those bytes cover go out. A
backup is therefore a journal folder kept up to date on another machine; it holds no cache.
When the primary's node dies, the backup becomes the primary the way a restarted shard
does: it replays that folder (the pending writes, the dead letters and the session table,
so resent requests are still applied once) and serves.

Three pieces:

- ``MirrorFiles``: the backup's side of the files (append to a numbered segment, drop the
  segments a flush released, start over);
- ``Backup``: a backup's server (the shard's authenticated socket server, with three
  requests of its own) and its promotion;
- ``MirrorLink``: the primary's connection to its backup. Frames are pipelined: a commit
  sends its bytes under the journal's lock (so they arrive in journal order) and waits for
  their acknowledgement outside it, so one round trip to the backup covers every commit
  that queued behind it (group commit), and appends never wait for the network.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import threading
from typing import Any

from .errors import PersistroidsError
from .protocol import Op
from .tls import TLSConfig
from .transport import Connection, ShardServer, _recv_obj

__all__ = ["Backup", "MirrorFiles", "MirrorLink", "MirrorLostError", "ReplicaDeposedError"]

log = logging.getLogger("persistroids_dist.replica")

_SEGMENT = re.compile(r"^(\d{8})\.journal$")  # journal.Journal's segment names


class MirrorLostError(PersistroidsError, ConnectionError):
    """A shard's backup stopped acknowledging what the primary's journal sent it."""


class ReplicaDeposedError(PersistroidsError, ConnectionError):
    """This shard is no longer its slot range's primary: its backup was promoted (its node
    was taken for dead). It answers nothing more; clients find the new primary."""


class MirrorFiles:
    """A backup's copy of a primary's journal segments, in ``directory``.

    ``fsync`` as the journal's: "always" syncs before every acknowledgement, "interval"
    every ``interval_s``, "off" leaves it to the OS."""

    def __init__(self, directory: str, fsync: str = "interval", interval_s: float = 0.1
                 ) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seg = -1
        self._unsynced = False
        self._closed = False
        self.bytes_received = 0
        self.frames = 0
        self._stop = threading.Event()
        if fsync == "interval":
            threading.Thread(target=self._sync_loop, args=(interval_s,), daemon=True,
                             name="persistroids-mirror-fsync").start()

    def _path(self, seg: int) -> str:
        return os.path.join(self.directory, f"{seg:08d}.journal")

    def segments(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for name in names if (m := _SEGMENT.match(name)))

    def _close_fd(self) -> None:
        if self._fd is not None:
            if self._unsynced and self.fsync != "off":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._unsynced = False

    def append(self, seg: int, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise ReplicaDeposedError("this backup stopped mirroring")
            if seg != self._seg or self._fd is None:
                self._close_fd()
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                   0o600)
                self._seg = seg
            done = os.write(self._fd, data)
            while done < len(data):
                done += os.write(self._fd, data[done:])
            if self.fsync == "always":
                os.fsync(self._fd)
            else:
                self._unsynced = True
            self.bytes_received += len(data)
            self.frames += 1

    def release(self, upto: int) -> None:
        """Drop the segments up to ``upto``: the primary's flush stored what they hold."""
        with self._lock:
            if self._seg <= upto:
                self._close_fd()
            for seg in self.segments():
                if seg > upto:
                    break
                try:
                    os.unlink(self._path(seg))
                except FileNotFoundError:
                    pass

    def reset(self) -> None:
        """Forget every segment: the primary is about to send its whole journal again."""
        with self._lock:
            self._close_fd()
            self._seg = -1
            for seg in self.segments():
                os.unlink(self._path(seg))

    def _sync_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                if self._closed:
                    return
                if self._unsynced and self._fd is not None:
                    os.fsync(self._fd)
                    self._unsynced = False

    def close(self, remove: bool = False) -> None:
        """Stop: nothing more is appended. ``remove``: delete the folder (the cache was shut
        down and everything in it is stored)."""
        with self._lock:
            if not self._closed:
                self._close_fd()
                self._closed = True
        self._stop.set()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
            try:  # the cache's folder goes with the last of its shards' folders
                os.rmdir(os.path.dirname(self.directory))
            except OSError:
                pass


class Backup:
    """A backup of shard ``index``: ``MirrorFiles`` in ``directory``, served on its own
    authenticated socket (the cache's secret) for the primary's ``MirrorLink``."""

    def __init__(self, index: int, directory: str, fsync: str, secret: bytes, *,
                 unix_path: str | None, tcp_host: str | None = None,
                 tls: TLSConfig | None = None) -> None:
        self.index = index
        self.files = MirrorFiles(directory, fsync)
        self.promoted = False
        self.server = ShardServer({
            Op.MIRROR_APPEND: self.files.append,
            Op.MIRROR_RELEASE: self.files.release,
            Op.MIRROR_RESET: self.files.reset,
            Op.PING: lambda: index,
        }, secret, unix_path=unix_path, tcp_host=tcp_host, tls=tls)
        self.address = self.server.start()

    def stop(self, remove: bool = False) -> None:
        """Stop mirroring (to be promoted, or for good): later appends are refused, so a
        primary that was taken for dead cannot acknowledge another write through here."""
        self.promoted = True
        self.files.close(remove=remove)
        self.server.close()

    def metrics(self) -> dict[str, Any]:
        return {"role": "backup", "shard": self.index, "mirror_path": self.files.directory,
                "mirror_bytes": self.files.bytes_received, "mirror_frames": self.files.frames,
                "pid": os.getpid()}


class MirrorLink:
    """The primary's side: an authenticated connection to its backup at ``address``.

    ``send`` (called under the journal's lock, which orders the frames) returns a ticket;
    ``wait(ticket)`` returns once the backup acknowledged every frame up to it, or raises
    MirrorLostError (the link broke, the backup refused, or it stayed silent for
    ``timeout_s``). A send that fails does not raise: the waits after it do."""

    def __init__(self, address: dict[str, Any], secret: bytes, *, node_id: str | None = None,
                 timeout_s: float = 10.0, tls: TLSConfig | None = None) -> None:
        conn = Connection(address, secret, node_id=node_id, timeout=timeout_s, tls=tls)
        self.sock = conn.sock
        self.unpacker = conn.unpacker
        self.transport = conn.transport
        self.tls = conn.tls
        self.address = address
        self.sent = 0
        self.acked = 0
        self.error: BaseException | None = None
        self._recv_lock = threading.Lock()

    def send(self, frame: bytes) -> int:
        # A frame that could not be sent still takes a ticket, one the backup never
        # acknowledges: the wait for it must fail. (Returning the last ticket instead, often
        # acknowledged already, let a commit after a Unix socket's EPIPE go on as if the
        # backup had it.)
        self.sent += 1
        if self.error is None:
            try:
                self.sock.sendall(frame)
            except OSError as e:
                self.error = e
        return self.sent

    def wait(self, ticket: int) -> None:
        if self.acked >= ticket:
            return
        with self._recv_lock:
            while self.acked < ticket and self.error is None:
                try:
                    status, result = _recv_obj(self.sock, self.unpacker)
                except OSError as e:  # broken, or silent for timeout_s
                    self.error = e
                    break
                if status:  # the backup refused (it was promoted): this link is done
                    self.error = pickle.loads(result)
                    break
                self.acked += 1
            if self.acked < ticket:
                raise MirrorLostError(f"the backup stopped acknowledging: {self.error!r}"
                                      ) from self.error

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
