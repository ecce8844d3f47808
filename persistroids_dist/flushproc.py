"""A shard's flush process: one connector's ``flush`` run in a child process.

Why a process: a flush of 100k rows spends ~0.5 s of CPU in Python (building rows, the
driver's per-row calls). On the shard's store thread that time is spent holding the
interpreter's lock, and every read of a cached key waits for it: with two cores and a
busy store thread, the thread serving reads waits first for the lock, then for a core
once the lock comes free, and reads stall for milliseconds. A child process has its own
interpreter lock, and it runs at a lower CPU priority (``nice``), so the reads' threads get
a core first. What crosses the pipe is the payloads the shard already built (bytes for
every built-in SQL and Redis connector), pickled in slices small enough (~0.1 ms each)
that the serving thread gets the interpreter between them.

The child holds its own instance of the connector, unpickled from the shard's copy as the
driver sent it and connected there: only a store outside the shard's process can be
flushed this way (never a ``process_local`` one). It ends when its pipe closes, and the
kernel kills it when the shard's process dies (``PR_SET_PDEATHSIG``), so no orphaned child
stores an old batch after a restarted shard stored newer values.

A connector the child cannot rebuild (its class was pickled by value, say, from a
notebook) is flushed in the shard's own process, as without a flush process, and the shard
logs why once.

Frames both ways: a 4-byte big-endian length, then a pickle. To the child: the connector
and the nice level; then per flush ``("part", payloads)`` frames and one ``("flush",)``.
From the child: ``("ready",)`` or ``("unusable", text)`` once it has the connector; then
per flush ``("ok",)`` or ``("error", exception or None, type name, text, is_oserror)``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["FlushProcess", "FlushProcessError", "FlushProcessUnreachable"]

log = logging.getLogger("persistroids_dist.flushproc")

_HEADER = struct.Struct(">I")
# Payloads per pickled frame: ~0.1 ms of pickling for (bytes, bytes) payloads, which is how
# long the serving thread may wait for the interpreter lock between two frames.
_SLICE = 500


class FlushProcessError(Exception):
    """A flush failed in the flush process with an exception that could not be sent back
    as itself; the message names its type and text."""


class FlushProcessUnreachable(ConnectionError):
    """The flush process ended, or failed the same way with an OSError the shard could not
    rebuild. An OSError: the shard treats it as a store that cannot be reached (it keeps the
    batch and retries, without bisecting it)."""


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:  # os.write releases the interpreter lock while the pipe is full
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> Any:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, n))


class FlushProcess:
    """``flush(payloads)`` of a connector run in a child process, started at the first call
    and again after it ended. Calls come from one thread at a time (the store thread: the
    kernel ends the child when the thread that started it ends, see ``_die_with_parent``).

    ``connector_blob`` is the pickled connector, as the driver sent it (not connected);
    ``fallback`` stores a batch in this process, used when the child cannot rebuild the
    connector; ``nice`` is added to the child's CPU niceness.
    """

    def __init__(self, connector_blob: bytes, name: str,
                 fallback: Callable[[list[Any]], Any], nice: int = 10) -> None:
        self._blob = connector_blob
        self.name = name
        self.nice = nice
        self._fallback = fallback
        self.unusable: str | None = None  # why the child cannot flush, once it said so
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.starts = 0
        # Payloads the child holds and has not answered for yet (0 between flushes): a
        # child that ends while this is non-zero failed that flush, not an idle one.
        self.in_flight = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The child imports what the shard imported (a connector class from the user's own
        # module, a runtime_env's working_dir): the same search path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "persistroids_dist.flushproc", str(os.getpid()), self.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        assert proc.stdin is not None and proc.stdout is not None
        self.starts += 1
        try:
            _write_frame(proc.stdin.fileno(), (self._blob, self.nice))
        except OSError:
            pass  # it ended at once: the flush that follows reads its end and says so
        return proc

    def flush(self, payloads: list[Any]) -> Any:
        """Store ``payloads`` through the child's connector; raise what its flush raised
        (rebuilt in this process), or FlushProcessUnreachable if the child ended."""
        if self.unusable is not None:
            return self._fallback(payloads)
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                proc = self._proc = self._start()
                assert proc.stdout is not None
                try:
                    hello = _read_frame(proc.stdout.fileno())
                except (OSError, EOFError) as e:
                    # It died before it could flush anything (it cannot import this
                    # package, say): retrying would never store a thing.
                    hello = ("unusable", f"it ended at start ({type(e).__name__})")
                if hello[0] != "ready":
                    self._end(proc)
                    self.unusable = hello[1]
                    log.warning("%s: flushes in the shard's process: its flush process "
                                "cannot rebuild the connector: %s", self.name, hello[1])
                    return self._fallback(payloads)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                out = proc.stdin.fileno()
                for i in range(0, len(payloads), _SLICE):
                    _write_frame(out, ("part", payloads[i:i + _SLICE]))
                _write_frame(out, ("flush",))
                self.in_flight = len(payloads)
                reply = _read_frame(proc.stdout.fileno())
            except (OSError, EOFError) as e:
                self._end(proc)
                raise FlushProcessUnreachable(
                    f"the flush process of {self.name} ended (exit code {proc.returncode}): "
                    f"{type(e).__name__}") from None
            finally:
                self.in_flight = 0
        if reply[0] == "ok":
            return
        _, exc, type_name, text, is_oserror = reply
        if isinstance(exc, BaseException):
            raise exc
        if is_oserror:
            raise FlushProcessUnreachable(f"{type_name}: {text}")
        raise FlushProcessError(f"{type_name}: {text}")

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._proc is proc:
            self._proc = None

    def close(self) -> None:
        """End the child (it finishes a flush under way first: its pipe closes after)."""
        with self._lock:
            if self._proc is not None:
                self._end(self._proc)


# The child.

def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit now if the
    parent is gone already (it died before the request took effect)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends it, after the flush under way
    if os.getppid() != parent:
        os._exit(0)


def _reply_error(e: BaseException) -> tuple[Any, ...]:
    try:
        blob: Any = e
        pickle.loads(pickle.dumps(e))  # one that cannot be rebuilt goes as text
    except Exception:
        blob = None
    return ("error", blob, type(e).__qualname__, str(e), isinstance(e, OSError))


def _child(parent: int) -> None:
    _die_with_parent(parent)
    # The frames get descriptors of their own; 0 and 1 become /dev/null and stderr, so a
    # connector (or a C library) that reads stdin or prints cannot corrupt them.
    inp, out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        blob, nice = _read_frame(inp)
    except EOFError:
        return
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    loop: asyncio.AbstractEventLoop | None = None

    def call(fn: Any, *args: Any) -> Any:
        nonlocal loop
        result = fn(*args)
        if inspect.isawaitable(result):
            if loop is None:
                loop = asyncio.new_event_loop()
            result = loop.run_until_complete(result)
        return result

    try:
        conn = pickle.loads(blob)
    except Exception as e:
        _write_frame(out, ("unusable", f"{type(e).__name__}: {e}"))
        return
    _write_frame(out, ("ready",))
    connected = False
    parts: list[Any] = []
    while True:
        try:
            frame = _read_frame(inp)
        except EOFError:
            break
        if frame[0] == "part":
            parts.extend(frame[1])
            continue
        payloads, parts = parts, []
        try:
            if not connected:  # again at each flush until it works (a store that was down)
                call(conn.connect)
                connected = True
            call(conn.flush, payloads)
            reply: tuple[Any, ...] = ("ok",)
        except Exception as e:
            reply = _reply_error(e)
        del payloads
        _write_frame(out, reply)
    if connected:
        try:
            call(conn.disconnect)
        except Exception:
            pass


if __name__ == "__main__":
    _child(int(sys.argv[1]))
