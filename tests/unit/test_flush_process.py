"""Flush processes (flushproc): a shard stores its flushes through a child process, so a
flush's CPU never holds the interpreter lock its reads are served with. Real SQLite files,
real child processes, real SIGKILLs; no Ray."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
from polling import wait_for
from sqlite_rows import stored
from test_dead_letters import POISON, checked_store

from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.errors import FlushError
from persistroids_dist.flushproc import FlushProcessUnreachable
from persistroids_dist.shard import ShardCore


def core_of(*connectors, **kw) -> ShardCore:
    kw.setdefault("writes_threshold", 10**9)
    kw.setdefault("millis_threshold", 1e9)
    kw.setdefault("flush_process_min", 1)  # every batch through the child
    return ShardCore(list(connectors), background=True, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has ended when its state says so.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_flush_is_stored_by_a_child_process_that_ends_with_the_shard(tmp_path):
    db = tmp_path / "s.db"
    core = core_of(SQLiteConnector(db))
    assert core.metrics()["flush_pids"] == {"sqlite:kv": None}  # started by the first flush
    for i in range(25_000):
        core.put(("k", i), i)
    assert core.flush() == 25_000
    pid = core.metrics()["flush_pids"]["sqlite:kv"]
    assert pid is not None and pid != os.getpid() and alive(pid)
    assert len(stored(db)) == 25_000
    core.put(("k", 0), "again")
    core.flush()
    assert core.metrics()["flush_pids"]["sqlite:kv"] == pid  # one child, kept
    assert stored(db)[("k", 0)] == "again"
    assert core.get(("k", 1)) == 1
    core.close()
    assert core.metrics()["flush_pids"] == {"sqlite:kv": None}
    assert not alive(pid)


def test_small_batches_are_stored_in_the_shard_and_large_ones_by_the_child(tmp_path):
    db = tmp_path / "s.db"
    core = core_of(SQLiteConnector(db), flush_process_min=1000)
    for i in range(999):
        core.put(("small", i), i)
    core.flush()
    assert core.metrics()["flush_pids"] == {"sqlite:kv": None}  # no child for 999
    for i in range(1000):
        core.put(("large", i), i)
    core.flush()
    assert core.metrics()["flush_pids"]["sqlite:kv"] is not None
    core.put(("small", 0), "again")  # in the shard again, after the child's batch
    core.flush()
    assert len(stored(db)) == 1999 and stored(db)[("small", 0)] == "again"
    core.close()


def test_which_connectors_get_a_flush_process(tmp_path):
    class Audited(SQLiteConnector):  # overrides flush: may keep state, so it stays here
        def flush(self, payloads):
            return super().flush(payloads)

    class Declared(Audited):
        flush_process_safe = True

    assert not Audited(tmp_path / "a.db").flush_process_safe
    assert Declared(tmp_path / "d.db").flush_process_safe
    core = core_of(SQLiteConnector(tmp_path / "s.db"), SQLiteConnector(":memory:", id="sqlite-mem"),
                   Audited(tmp_path / "a.db", id="audited"), MemoryConnector())
    assert core.metrics()["flush_pids"] == {"sqlite:kv": None}
    core.close()
    core = core_of(SQLiteConnector(tmp_path / "s.db"), flush_process=False)
    assert core.metrics()["flush_pids"] == {}
    core.close()
    # Without a store thread (an embedded shard) every call runs in the caller's thread.
    core = ShardCore([SQLiteConnector(tmp_path / "s.db")])
    assert core.metrics()["flush_pids"] == {}


def test_a_child_killed_during_a_flush_loses_nothing(tmp_path):
    db = tmp_path / "s.db"
    core = core_of(SQLiteConnector(db, busy_timeout_ms=60_000))
    core.put("first", 1)
    core.flush()  # starts the child
    pid = core.metrics()["flush_pids"]["sqlite:kv"]
    for i in range(1000):
        core.put(("k", i), i)
    # Hold SQLite's write lock: the child's flush waits for it, then it is SIGKILLed.
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            core.flush()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=flush)
    t.start()
    # Killed once the child holds the batch: a kill before that (while the shard has only
    # begun its flush) is a child dying between flushes, replaced unnoticed (next test).
    (proc,) = core._flushers.values()
    assert wait_for(lambda: proc.in_flight == 1000)
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    lock.execute("ROLLBACK")
    lock.close()
    (err,) = errors
    assert isinstance(err, FlushError)
    (cause,) = err.errors.values()
    assert isinstance(cause, FlushProcessUnreachable) and isinstance(cause, OSError)
    assert core.metrics()["pending"] == 1000  # kept, as for a store that is down
    assert core.flush() == 1000  # a new child stores them
    new = core.metrics()["flush_pids"]["sqlite:kv"]
    assert new not in (None, pid)
    assert len(stored(db)) == 1001
    core.close()


def test_a_child_killed_between_flushes_is_replaced_unnoticed(tmp_path):
    db = tmp_path / "s.db"
    core = core_of(SQLiteConnector(db))
    core.put("a", 1)
    core.flush()
    pid = core.metrics()["flush_pids"]["sqlite:kv"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid) or core.metrics()["flush_pids"]["sqlite:kv"] is None)
    core.put("b", 2)
    assert core.flush() == 1
    assert stored(db) == {"a": 1, "b": 2}
    core.close()


def test_a_refused_row_is_singled_out_through_the_child(tmp_path):
    # The store's own error comes back through the pipe: the batch is split, the rest
    # stored, the poison row buried after max_attempts with the store's message.
    db = tmp_path / "s.db"
    core = core_of(checked_store(db), max_attempts=2)
    for i in range(300):
        core.put(("k", i), POISON if i == 150 else i)
    with pytest.raises(FlushError, match="CHECK constraint failed") as info:
        core.flush()
    (cause,) = info.value.errors.values()
    assert isinstance(cause, sqlite3.IntegrityError)  # rebuilt as itself
    assert len(stored(db)) == 299
    core.flush()
    (dead,) = core.dead_letters()
    assert dead["key"] == ("k", 150) and "CHECK constraint failed" in dead["error"]
    assert core.metrics()["flush_pids"]["sqlite:kv"] is not None  # all of it went there
    core.close()


def test_a_connector_the_child_cannot_rebuild_is_flushed_here(tmp_path, caplog):
    # Its class lives in a module only this process has (a notebook's, say).
    module = types.ModuleType("pd_only_in_this_process")
    sys.modules[module.__name__] = module

    class Local(SQLiteConnector):
        flush_process_safe = True

    Local.__module__ = module.__name__
    Local.__qualname__ = "Local"
    module.Local = Local
    db = tmp_path / "s.db"
    try:
        core = core_of(Local(db))
        core.put("a", 1)
        with caplog.at_level(logging.WARNING, "persistroids_dist.flushproc"):
            assert core.flush() == 1
        assert "cannot rebuild the connector" in caplog.text
        assert "pd_only_in_this_process" in caplog.text
        assert stored(db) == {"a": 1}
        core.put("b", 2)
        core.flush()
        assert stored(db) == {"a": 1, "b": 2}
        assert core.metrics()["flush_pids"] == {"sqlite:kv": None}
        core.close()
    finally:
        del sys.modules[module.__name__]


def test_the_child_dies_with_a_shard_process_killed_by_sigkill(tmp_path):
    # A shard SIGKILLed while its child flushes: the kernel ends the child too, so no
    # orphan stores an old batch after a restarted shard stored newer values.
    script = textwrap.dedent(f"""
        import sqlite3, sys, threading
        from persistroids_dist.connectors.sqlite import SQLiteConnector
        from persistroids_dist.shard import ShardCore
        core = ShardCore([SQLiteConnector({str(tmp_path / "s.db")!r}, busy_timeout_ms=60000)],
                         background=True, writes_threshold=10**9, millis_threshold=1e9,
                         flush_process_min=1)
        core.put("a", 1)
        core.flush()
        print(core.metrics()["flush_pids"]["sqlite:kv"], flush=True)
        sys.stdin.readline()  # the test holds SQLite's write lock now
        core.put("b", 2)
        print("flushing", flush=True)
        core.flush()  # blocked on the test's lock until this process is killed
    """)
    lock = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=30)
    shard = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        child = int(shard.stdout.readline())
        lock.execute("BEGIN IMMEDIATE")  # after the first flush: the second one waits
        shard.stdin.write("go\n")
        shard.stdin.flush()
        assert shard.stdout.readline().strip() == "flushing"
        time.sleep(0.3)  # most likely in the child's flush by now; if not, still no commit
        assert alive(child)
        shard.send_signal(signal.SIGKILL)
        shard.wait(10)
        assert wait_for(lambda: not alive(child), timeout=10)
    finally:
        lock.close()
        if shard.poll() is None:
            shard.kill()
            shard.wait()
    assert stored(tmp_path / "s.db") == {"a": 1}  # the second flush never committed
