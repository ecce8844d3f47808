"""Progress bars for long flushes, shutdowns and ``checkpoint(wait_stored=...)`` (tqdm).

tqdm is optional (``pip install 'persistroids-dist[progress]'``). What ``progress=`` means on
``Cache.flush_now``, ``Cache.shutdown`` and ``Cache.checkpoint``:

- ``None`` (the default): a bar only if tqdm is installed, the output is a terminal (stderr
  is a TTY) or this process is a Jupyter/IPython kernel, and the call has lasted
  ``DELAY_S``; a short call prints nothing, and without tqdm nothing changes;
- ``True``: always a bar, from the start (ImportError naming tqdm if it is missing);
- ``False``: never.

How it moves: the operation's own remote call runs exactly as without a bar. Meanwhile a
daemon thread asks every shard for its metrics every ``POLL_S`` on connections of its own
and counts the keys still to store (``unwritten``, ``unstored_through``). The bar's total is
what was to store when the call began, in keys. Shards store in chunks of 10,000 payloads,
so a small flush moves in one step. On success the bar ends at what the call stored; on an
error it stops where it got to, marked failed, and the error propagates unchanged.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from . import control, protocol
from .transport import Connection

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["DELAY_S", "POLL_S", "Tracker", "in_kernel", "is_tty", "should_show",
           "tqdm_available", "unstored_through", "unwritten", "wait_stored", "wanted"]

log = logging.getLogger(__name__)

#: How long a call runs before its bar appears (``progress=None``).
DELAY_S = 0.5
#: How often the shards are asked how far they got.
POLL_S = 0.25
#: A shard that takes longer than this to answer its metrics is left out of the count (a
#: progress bar must never hang, nor hold a call up).
_PROBE_TIMEOUT_S = 5.0

_MISSING = ("progress=True draws a progress bar with tqdm, which is not installed: "
            "pip install 'persistroids-dist[progress]' (or pip install tqdm), or pass "
            "progress=None to draw one only when tqdm is there")

#: Per shard metrics -> keys still to store there.
Measure = Callable[[dict[str, Any]], int]


# -- when to draw ----------------------------------------------------------------------------
def tqdm_available() -> bool:
    """Whether tqdm can be imported."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def in_kernel() -> bool:
    """Whether this process is a Jupyter (IPython) kernel. IPython is never imported here:
    a kernel has imported it already, and importing it elsewhere would cost ~0.3 s."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a broken or partial IPython: not a kernel we can draw in
        return False
    return getattr(shell, "kernel", None) is not None


def is_tty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (False for a closed or replaced stream)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def should_show(progress: bool | None, *, have_tqdm: bool, tty: bool, kernel: bool) -> bool:
    """The decision itself: ``progress`` as the caller gave it, and the facts. Raises
    ImportError for ``True`` without tqdm, TypeError for anything but a bool or None."""
    if progress is None:
        return have_tqdm and (tty or kernel)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if progress and not have_tqdm:
        raise ImportError(_MISSING, name="tqdm")
    return progress


def wanted(progress: bool | None, file: IO[str] | None = None) -> bool:
    """``should_show`` with this process's facts; ``file``: where the bar would go (None:
    stderr, or a notebook widget in a kernel)."""
    if progress is False:
        return False  # and nothing is imported or asked
    stream = sys.stderr if file is None else file
    tty, kernel = is_tty(stream), file is None and in_kernel()
    if progress is None and not (tty or kernel):
        return False  # a batch job's flush does not even import tqdm
    return should_show(progress, have_tqdm=tqdm_available(), tty=tty, kernel=kernel)


# -- what is left to store --------------------------------------------------------------------
def _sealed(m: dict[str, Any]) -> dict[int, int]:
    return {int(e): int(n) for e, n in (m.get("checkpoint") or {}).get("sealed", {}).items()}


def _stored_of_running(m: dict[str, Any]) -> int:
    """Keys of the shard's running flush that a store took already."""
    if not m.get("flushing"):
        return 0
    return max(0, m.get("flushing_keys", 0) - m.get("flushing_unstored", 0))


def unwritten(m: dict[str, Any]) -> int:
    """Keys a flush of this shard (``flush_now``, ``shutdown``) still has to store, from its
    metrics ``m``: its buffer and what its running flush has not stored; for a checkpointed
    shard, the keys of committed checkpoints not stored yet (its open epoch is not
    flushed: it waits for the next checkpoint)."""
    if "checkpoint" in m:
        committed = int(m["checkpoint"].get("committed", -1))
        held = sum(n for e, n in _sealed(m).items() if e <= committed)
        return max(0, held - _stored_of_running(m))
    return int(m.get("pending", 0)) + int(m.get("flushing_unstored", 0))


def unstored_through(epoch: int) -> Measure:
    """A ``Measure``: keys of checkpoint ``epoch`` and older that this shard has not stored
    (epochs are stored oldest first, so a running flush is of one of them)."""
    def measure(m: dict[str, Any]) -> int:
        held = sum(n for e, n in _sealed(m).items() if e <= epoch)
        return max(0, held - _stored_of_running(m)) if held else 0
    return measure


def _holds_through(m: dict[str, Any], epoch: int) -> bool:
    return any(e <= epoch for e in _sealed(m))


# -- asking the shards ------------------------------------------------------------------------
class _Probe:
    """Its own connection to every shard, for METRICS only.

    Not the pool's: a pooled connection serves one request at a time in order, so a poll
    would wait behind (and hold up) another thread's read that waits on a store, and a pooled
    connection that breaks (shutdown closes the shards under the poller) is dropped with its
    unanswered writes counted as lost, after redialling for up to ``shard_wait_s`` under its
    lock. These connections never redial on their own and time out after
    ``_PROBE_TIMEOUT_S``; a shard that fails keeps its last answer. With ``reconnect``, a
    failed shard is found again through Ray at the next sample (a wait that outlives a shard
    restart)."""

    def __init__(self, pool: Pool, reconnect: bool = False) -> None:
        self.spec = pool.spec
        self.addresses = list(pool.addresses)
        self.reconnect = reconnect
        n = len(self.addresses)
        self.conns: list[Connection | None] = [None] * n
        self.failed = [False] * n
        self.last: list[dict[str, Any] | None] = [None] * n

    def _open(self, i: int) -> Connection | None:
        if self.failed[i]:
            if not self.reconnect:
                return None
            self.addresses[i] = control.resolve_address(self.spec, i)  # raises if gone
            self.failed[i] = False
        try:
            self.conns[i] = Connection(self.addresses[i], self.spec.secret,
                                       timeout=_PROBE_TIMEOUT_S,
                                       node_id=control.local_node_id(), tls=self.spec.tls)
        except Exception:
            self.failed[i] = True
        return self.conns[i]

    def sample(self) -> list[dict[str, Any] | None]:
        """Every shard's metrics (all asked first, then all answers read); a shard that
        could not answer keeps its previous metrics (None: never answered)."""
        asked = []
        for i in range(len(self.conns)):
            c = self.conns[i] or self._open(i)
            if c is None:
                continue
            try:
                c.begin(protocol.METRICS)
                asked.append((i, c))
            except Exception:
                self._fail(i)
        for i, c in asked:
            try:
                self.last[i] = c.finish()
            except Exception:
                self._fail(i)
        return self.last

    def _fail(self, i: int) -> None:
        c, self.conns[i] = self.conns[i], None
        if c is not None:
            c.close()
        self.failed[i] = True

    def close(self) -> None:
        for i in range(len(self.conns)):
            c, self.conns[i] = self.conns[i], None
            if c is not None:
                c.close()


def _new_bar(total: int, done: int, desc: str, file: IO[str] | None, started: float) -> Any:
    """A tqdm bar at ``done`` of ``total``: a widget in a notebook (tqdm.auto), else text on
    stderr or ``file``. ``started``: when the call began (``time.monotonic()``)."""
    if file is None:
        with warnings.catch_warnings():  # tqdm.auto warns that notebook mode is in use
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    # Exact counts (no unit_scale): "99871/100000 keys" says what is left, "99.9k" does not.
    # ``initial``: its first drawing already shows how far the call got.
    opts: dict[str, Any] = {"total": total, "initial": done, "desc": desc, "unit": "keys",
                            "file": file, "leave": True}
    try:
        bar = tqdm(**opts)
    except ImportError:  # tqdm.notebook without ipywidgets: plain text instead
        from tqdm.std import tqdm as text
        bar = text(**opts)
    # It may appear DELAY_S into the call: its clock (elapsed, rate) starts with the call
    # (on tqdm's own clock), and the rate counts every key the call stored.
    late = time.monotonic() - started
    bar.start_t = bar._time() - late
    bar.initial = 0
    if late >= POLL_S:  # drawn with no time elapsed: draw its real figures now
        bar.refresh()
    return bar


def _close_bar(bar: Any, done: int, error: BaseException | None) -> None:
    bar.n = done
    if error is not None:
        # Stops where the stores got to, on a finished line (a widget turns red).
        bar.set_postfix_str(f"failed: {type(error).__name__}", refresh=False)
    bar.close()  # draws it once more, as it is now, and ends the line


# -- flush_now and shutdown -------------------------------------------------------------------
class Tracker:
    """Draws a bar while its ``with`` block runs a blocking call that stores keys.

    Made before the call, so ``progress=True`` without tqdm fails before anything happens;
    entered once the call is about to start (the total is sampled then). In the block, the
    caller may say how many keys the call left unstored (``finish``); a successful block
    ends the bar at ``total`` minus those. An error in the block propagates unchanged (the
    bar stops where it was, marked failed); nothing the bar does can fail the call.
    """

    def __init__(self, pool: Pool, desc: str, measure: Measure, progress: bool | None,
                 file: IO[str] | None = None) -> None:
        self.enabled = wanted(progress, file)
        self.forced = progress is True
        self.pool, self.desc, self.measure, self.file = pool, desc, measure, file
        self.total = self.done = self.left = 0
        self.bar: Any = None
        self._probe: _Probe | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def finish(self, left: int = 0) -> None:
        """The call succeeded and left ``left`` keys unstored (a shutdown that gave up)."""
        self.left = max(0, left)

    def _remaining(self) -> int:
        assert self._probe is not None
        return sum(self.measure(m) for m in self._probe.sample() if m is not None)

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        try:
            self._started = time.monotonic()
            self._probe = _Probe(self.pool)
            self.total = self._remaining()
            if self.forced:
                self.bar = _new_bar(self.total, 0, self.desc, self.file, self._started)
            elif self.total == 0:  # nothing to store: nothing to draw
                return self
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="persistroids-progress")
            self._thread.start()
        except Exception as e:  # a bar never stops the call
            log.debug("progress bar not shown: %s: %s", type(e).__name__, e)
            self._cleanup()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(POLL_S):
                self.done = max(self.done, min(self.total, self.total - self._remaining()))
                if self.bar is None and time.monotonic() - self._started >= DELAY_S:
                    self.bar = _new_bar(self.total, self.done, self.desc, self.file,
                                        self._started)
                elif self.bar is not None:
                    self.bar.n = self.done
                    self.bar.refresh()
        except Exception as e:  # stop drawing; the call goes on regardless
            log.debug("progress bar stopped: %s: %s", type(e).__name__, e)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if not self.enabled:
            return False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.bar is not None:
                done = self.done if exc is not None else max(0, self.total - self.left)
                _close_bar(self.bar, done, exc)
        except Exception as e:  # never replaces the call's own error or result
            log.debug("progress bar not closed cleanly: %s: %s", type(e).__name__, e)
        self._cleanup()
        return False  # the call's exception, if any, propagates as it was

    def _cleanup(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None


# -- checkpoint(wait_stored=...) --------------------------------------------------------------
def wait_stored(pool: Pool, epoch: int, keys: int, *, timeout_s: float | None,
                progress: bool | None, file: IO[str] | None = None) -> None:
    """Wait until every shard has stored checkpoint ``epoch`` (and the older ones: stores
    get them oldest first), drawing a bar of their keys as ``progress`` says. ``keys``:
    the checkpoint's own (its total, even if some were stored before the first look).

    Polls the shards' metrics every ``POLL_S``: the checkpoint is complete already, this only
    watches the background storing. A store that refuses is retried by the shards (with
    backoff) and shown on the bar; ``timeout_s`` (None: no limit) bounds the wait, then
    TimeoutError names the last store error. A shard that restarts meanwhile is found again
    through Ray (it stores its committed epochs after replaying its journal)."""
    show = wanted(progress, file)
    measure = unstored_through(epoch)
    started = time.monotonic()
    probe = _Probe(pool, reconnect=True)
    bar: Any = None
    done = total = 0
    error: BaseException | None = None
    errors_before: dict[int, int] | None = None
    try:
        while True:
            ms = probe.sample()
            remaining = sum(measure(m) for m in ms if m is not None)
            if errors_before is None:
                # Its own keys, or more while older checkpoints are still being stored.
                total = max(keys, remaining)
                errors_before = {i: m.get("flush_errors", 0) for i, m in enumerate(ms) if m}
                if show and progress is True:
                    bar = _new_bar(total, total - remaining, f"storing checkpoint {epoch}",
                                   file, started)
            if all(m is not None and not _holds_through(m, epoch) for m in ms):
                done = total
                return
            done = max(done, min(total, total - remaining))
            refusing = _store_errors(ms, errors_before)
            if show and bar is None and time.monotonic() - started >= DELAY_S:
                bar = _new_bar(total, done, f"storing checkpoint {epoch}", file, started)
            if bar is not None:
                bar.n = done
                bar.set_postfix_str(f"store refusing: {refusing[:60]}" if refusing else "",
                                    refresh=False)
                bar.refresh()
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                raise TimeoutError(
                    f"checkpoint {epoch} is complete, but its writes were not all stored "
                    f"within {timeout_s:g} s ({remaining} key(s) left; the shards keep "
                    "storing them in the background)"
                    + (f"; last store error: {refusing}" if refusing else ""))
            time.sleep(POLL_S)
    except BaseException as e:
        error = e
        raise
    finally:
        probe.close()
        if bar is not None:
            try:
                bar.set_postfix_str("", refresh=False)
                _close_bar(bar, done, error)
            except Exception as e:
                log.debug("progress bar not closed cleanly: %s: %s", type(e).__name__, e)


def _store_errors(ms: list[dict[str, Any] | None], before: dict[int, int]) -> str:
    """The last store error of a shard whose flushes failed since the wait began, or ''."""
    for i, m in enumerate(ms):
        if m and m.get("flush_errors", 0) > before.get(i, 0) and m.get("last_errors"):
            return "; ".join(str(v) for v in m["last_errors"].values())
    return ""
