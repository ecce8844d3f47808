"""A shard's store thread: the one thread that calls its connectors.

Why a thread of its own: connector I/O (a 100k-row flush, a connect that waits out a
timeout while a store is down) must never run under the lock that serves reads and writes
of cached keys. The caller hands a call to the store thread and waits on the shard's
condition, which releases the shard's lock (every level of it) until the call is done.
One thread for every call keeps a connector's contract simple: it sees one call at a time,
in order, always from the same thread (an SQLite connection, an asyncio loop).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StoreThread", "StoreTimeout"]


class StoreTimeout(Exception):
    """The store thread did not finish a call within the caller's timeout."""


class _Job:
    __slots__ = ("fn", "args", "deadline", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 deadline: float | None) -> None:
        self.fn = fn
        self.args = args
        self.deadline = deadline
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class StoreThread:
    """Runs calls one at a time, in order, on a daemon thread named ``name``.

    ``cond`` is the shard's condition (over its lock): a caller of ``run`` holds that lock,
    and waiting releases it, so the shard keeps serving while the store works.
    """

    def __init__(self, cond: threading.Condition, name: str) -> None:
        self._cond = cond
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)`` on the store thread; its result, or its exception raised here.

        Call with the shard's lock held. With ``timeout``: StoreTimeout once it passes (the
        call is skipped if it has not started by then; one already running finishes and its
        result is dropped)."""
        if threading.current_thread() is self._thread or self._stopped:
            return fn(*args)  # a connector calling back in; or the thread has ended
        job = _Job(fn, args, None if timeout is None else time.monotonic() + timeout)
        self._queue.put(job)
        if not self._cond.wait_for(lambda: job.done, timeout):
            raise StoreTimeout(f"no answer within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        """Finish the calls queued so far, then end the thread (later calls run in the
        caller's thread)."""
        self._stopped = True
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.deadline is not None and time.monotonic() >= job.deadline:
                job.error = StoreTimeout("skipped: its caller stopped waiting")
            else:
                try:
                    job.result = job.fn(*job.args)
                except BaseException as e:  # handed to the caller, raised in its thread
                    job.error = e
            with self._cond:
                job.done = True
                self._cond.notify_all()
