"""When a progress bar is drawn (``progress.should_show`` / ``wanted``), and how many keys a
shard's metrics say are left to store. Ray-free; the bars themselves are drawn in
tests/cluster/test_progress.py."""

from __future__ import annotations

import io
import sys
import types

import pytest

from persistroids_dist import progress
from persistroids_dist.connector import BaseConnector
from persistroids_dist.shard import ShardCore


@pytest.mark.parametrize("tty, kernel, have_tqdm, shown", [
    (True, False, True, True),     # a terminal
    (False, True, True, True),     # a notebook
    (False, False, True, False),   # a pipe, a log file, a batch job
    (True, False, False, False),   # no tqdm: nothing changes
    (False, True, False, False),
])
def test_automatic_decision(tty, kernel, have_tqdm, shown):
    assert progress.should_show(None, have_tqdm=have_tqdm, tty=tty, kernel=kernel) is shown


def test_true_forces_and_false_never_draws():
    assert progress.should_show(True, have_tqdm=True, tty=False, kernel=False) is True
    assert progress.should_show(False, have_tqdm=True, tty=True, kernel=True) is False
    with pytest.raises(ImportError, match="tqdm") as missing:
        progress.should_show(True, have_tqdm=False, tty=True, kernel=False)
    assert missing.value.name == "tqdm"
    with pytest.raises(TypeError, match="progress"):
        progress.should_show("yes", have_tqdm=True, tty=True, kernel=False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wanted_looks_at_the_stream_the_bar_would_go_to(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", None)  # no kernel here
    assert progress.wanted(None, _Tty()) is True
    assert progress.wanted(None, io.StringIO()) is False
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress.wanted(None) is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.wanted(None) is False
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError on a closed stream: not a terminal
    assert progress.is_tty(closed) is False and progress.is_tty(object()) is False


def test_without_tqdm_automatic_is_off_and_forced_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    assert progress.tqdm_available() is False
    assert progress.wanted(None, _Tty()) is False
    assert progress.wanted(False, _Tty()) is False
    with pytest.raises(ImportError, match=r"persistroids-dist\[progress\]"):
        progress.wanted(True, io.StringIO())


def test_a_kernel_is_recognised_by_its_shell_not_by_ipython_alone(monkeypatch):
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython",
                        types.SimpleNamespace(get_ipython=lambda: shell))
    assert progress.in_kernel() is True
    monkeypatch.setitem(sys.modules, "IPython",  # a terminal IPython: no kernel
                        types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace()))
    assert progress.in_kernel() is False
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert progress.in_kernel() is False
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert progress.in_kernel() is False


def test_unwritten_counts_the_buffer_and_the_running_flush():
    assert progress.unwritten({"pending": 7, "flushing": False, "flushing_keys": 0,
                               "flushing_unstored": 0}) == 7
    # A flush took 30 keys, 10 are stored; 4 writes came in since.
    assert progress.unwritten({"pending": 4, "flushing": True, "flushing_keys": 30,
                               "flushing_unstored": 20}) == 24


def test_unwritten_of_a_checkpointed_shard_counts_committed_epochs_only():
    m = {"pending": 99, "flushing": True, "flushing_keys": 10, "flushing_unstored": 4,
         "checkpoint": {"open": 99, "sealed": {3: 10, 4: 5, 5: 8}, "committed": 4}}
    assert progress.unwritten(m) == 10 + 5 - 6  # epoch 5 waits for its commit
    assert progress.unstored_through(3)(m) == 4
    assert progress.unstored_through(5)(m) == 17
    m["checkpoint"]["sealed"] = {5: 8}
    m["flushing"] = False
    assert progress.unstored_through(4)(m) == 0


class Recording(BaseConnector):
    """A connector that, on every flush call, records its shard's metrics mid-flush (what
    a progress poll sees then)."""

    def __init__(self) -> None:
        self.core: ShardCore | None = None
        self.seen: list[dict] = []
        self.calls = 0

    def get_id(self) -> str:
        return "rec"

    def read(self, args):
        return None

    def flush(self, payloads) -> None:
        self.calls += 1
        assert self.core is not None
        self.seen.append(self.core.metrics())


def test_a_flush_reports_its_unstored_keys_chunk_by_chunk():
    conn = Recording()
    core = ShardCore([conn], writes_threshold=10**9, millis_threshold=10**9)
    conn.core = core
    n = 25_000  # three chunks of at most 10,000
    for i in range(n):
        core.put(f"k{i}", i)
    assert core.metrics()["flushing_unstored"] == 0 and core.metrics()["pending"] == n
    assert core.flush() == n
    assert conn.calls == 3
    assert [m["flushing_unstored"] for m in conn.seen] == [25_000, 15_000, 5_000]
    assert all(m["flushing_keys"] == n and m["pending"] == 0 for m in conn.seen)
    after = core.metrics()
    assert after["flushing_unstored"] == 0 and progress.unwritten(after) == 0
