"""Progress bars (``progress=`` on flush_now, shutdown and checkpoint) on Ray with real SQLite
stores: what the bar says, that it follows the shards while they store, that it stays away
when it should, and that an error comes through unchanged with the bar closed. The decision
itself is tested Ray-free in tests/unit/test_progress_unit.py."""

from __future__ import annotations

import io
import re
import threading
import time
import uuid

import pytest
from sqlite_rows import stored
from test_distribution import FlakySQLite

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector


class SlowSQLite(SQLiteConnector):
    """SQLite that takes 0.4 s more per flush call (a shard hands it 10,000 payloads a
    call), so a flush of 25,000 keys lasts long enough for the bar to see it move."""

    def flush(self, payloads):
        time.sleep(0.4)
        super().flush(payloads)


class Tty(io.StringIO):
    """A StringIO that says it is a terminal (what ``progress=None`` looks for)."""

    def isatty(self) -> bool:
        return True


def counts(text: str, total: int) -> list[int]:
    """Every ``n`` the bar drew as ``n/total``, in order."""
    return [int(n) for n in re.findall(rf"(\d+)/{total}\b", text)]


def no_poller_left() -> bool:
    return not any(t.name == "persistroids-progress" and t.is_alive()
                   for t in threading.enumerate())


def quiet(make_cache, connector, **kw) -> pd.Cache:
    """A cache whose thresholds never flush during a test: only the call under test does."""
    return make_cache([connector], writes_threshold=10**9, millis_threshold=600_000,
                      name=f"progress-{uuid.uuid4().hex[:8]}", **kw)


def test_flush_now_draws_from_zero_to_everything_pending(make_cache, tmp_path, capsys):
    db = tmp_path / "store.db"
    cache = quiet(make_cache, SQLiteConnector(db))
    cache.write_many((f"k{i}", i) for i in range(3000))
    out = io.StringIO()
    assert cache.flush_now(progress=True, _progress_file=out) == 3000
    text = out.getvalue()
    drawn = counts(text, 3000)
    assert drawn[0] == 0 and drawn[-1] == 3000, text  # the total was sampled before it ran
    assert text.startswith("\rflush:") and text.endswith("\n"), repr(text)  # a closed line
    assert "failed" not in text
    assert len(stored(db)) == 3000
    assert no_poller_left()
    assert capsys.readouterr().err == ""  # everything went to the given file


def test_the_bar_follows_the_shards_while_they_store(make_cache, tmp_path):
    db = tmp_path / "store.db"
    cache = quiet(make_cache, SlowSQLite(db), num_shards=1)
    cache.write_many((f"k{i}", i) for i in range(25_000))
    out = Tty()  # automatic: a terminal, and the flush lasts over 1.2 s
    assert cache.flush_now(progress=None, _progress_file=out) == 25_000
    drawn = counts(out.getvalue(), 25_000)
    assert drawn[-1] == 25_000
    # It moved with the chunks the store took. (When it appears, after 0.5 s, is tested
    # Ray-free; here a loaded machine may not have stored the first chunk by then.)
    assert any(0 < n < 25_000 for n in drawn), out.getvalue()
    assert drawn == sorted(drawn)
    assert len(stored(db)) == 25_000


def test_no_bar_when_off_or_not_wanted(make_cache, tmp_path, capsys):
    cache = quiet(make_cache, SQLiteConnector(tmp_path / "store.db"))
    cache.write_many((f"k{i}", i) for i in range(2000))
    off = Tty()
    assert cache.flush_now(progress=False, _progress_file=off) == 2000
    cache.write_many((f"k{i}", -i) for i in range(2000))
    piped = io.StringIO()  # automatic, not a terminal: a log file, a pipe
    assert cache.flush_now(_progress_file=piped) == 2000
    cache.write_many((f"k{i}", i) for i in range(10))
    short = Tty()  # automatic on a terminal, but a short flush draws nothing
    assert cache.flush_now(_progress_file=short) == 10
    assert cache.flush_now(progress=False) is None  # nothing pending, as before
    assert off.getvalue() == piped.getvalue() == short.getvalue() == ""
    assert capsys.readouterr().err == ""  # and stderr (pytest's: not a terminal) neither


def test_checkpoint_wait_stored_draws_the_storing_of_its_writes(make_cache, tmp_path):
    db = tmp_path / "store.db"
    cache = make_cache([SQLiteConnector(db)], checkpoints=True,
                       name=f"progress-ck-{uuid.uuid4().hex[:8]}", journal=tmp_path / "j")
    cache.write_many((f"k{i}", i) for i in range(2000))
    with pytest.raises(ValueError, match="wait_stored"):
        cache.checkpoint({"offset": 0}, progress=True)  # nothing to draw without the wait
    assert cache.last_checkpoint() is None  # refused before the cut
    out = io.StringIO()
    info = cache.checkpoint({"offset": 2000}, wait_stored=True, progress=True,
                            _progress_file=out)
    assert info.id == 0 and info.keys == 2000
    # Returned once stored: no waiting for the background here.
    assert len(stored(db)) == 2000
    drawn = counts(out.getvalue(), 2000)  # from where the shards were when it looked
    assert drawn[-1] == 2000 and drawn == sorted(drawn), out.getvalue()
    assert out.getvalue().startswith("\rstoring checkpoint 0:")
    # Without a bar, and with a time limit it easily meets.
    cache.write_many((f"k{i}", -i) for i in range(100))
    second = cache.checkpoint({"offset": 2100}, wait_stored=10.0)
    assert second.id == 1 and stored(db)["k99"] == -99


def test_wait_stored_gives_up_after_its_limit_with_the_store_error(make_cache, tmp_path):
    db, flag = tmp_path / "store.db", tmp_path / "down"
    cache = make_cache([FlakySQLite(db, flag)], checkpoints=True,
                       name=f"progress-ck-{uuid.uuid4().hex[:8]}", journal=tmp_path / "j")
    cache.write_many((f"k{i}", i) for i in range(500))
    flag.touch()
    out = io.StringIO()
    with pytest.raises(TimeoutError, match="store unavailable") as late:
        cache.checkpoint("s", wait_stored=1.5, progress=True, _progress_file=out)
    assert "checkpoint 0 is complete" in str(late.value)
    assert cache.last_checkpoint().id == 0  # complete all the same
    text = out.getvalue()
    assert "failed: TimeoutError" in text and text.endswith("\n"), repr(text)
    assert counts(text, 500)[-1] == 0
    flag.unlink()
    cache.checkpoint("s2", wait_stored=30)  # the shards' retries store it once it is back
    assert len(stored(db)) == 500


def test_errors_come_through_unchanged_and_the_bar_is_closed(make_cache, tmp_path):
    db, flag = tmp_path / "store.db", tmp_path / "down"
    cache = quiet(make_cache, FlakySQLite(db, flag))
    cache.write_many((f"k{i}", i) for i in range(1500))
    flag.touch()
    out = io.StringIO()
    with pytest.raises(pd.FlushError) as failed:
        cache.flush_now(progress=True, _progress_file=out)
    assert type(failed.value) is pd.FlushError and "store unavailable" in str(failed.value)
    text = out.getvalue()
    assert counts(text, 1500)[-1] == 0 and "failed: FlushError" in text, repr(text)
    assert text.endswith("\n") and no_poller_left()

    down = io.StringIO()
    with pytest.raises(pd.ShutdownError) as refused:
        cache.shutdown(progress=True, _progress_file=down)
    assert type(refused.value) is pd.ShutdownError
    assert "failed: ShutdownError" in down.getvalue() and down.getvalue().endswith("\n")
    assert cache.read("k7") == 7  # still running: nothing was dropped

    flag.unlink()
    done = io.StringIO()
    metrics = cache.shutdown(progress=True, _progress_file=done)
    assert metrics["total"]["pending"] == 0 and len(stored(db)) == 1500
    drawn = counts(done.getvalue(), 1500)
    assert drawn[0] == 0 and drawn[-1] == 1500, done.getvalue()
    assert no_poller_left()


def test_forced_progress_without_tqdm_fails_before_anything_happens(make_cache, tmp_path,
                                                                     monkeypatch):
    db = tmp_path / "store.db"
    cache = quiet(make_cache, SQLiteConnector(db))
    cache.write("a", 1, wait=True)
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    with pytest.raises(ImportError, match="tqdm"):
        cache.flush_now(progress=True)
    assert stored(db) == {}  # nothing was flushed
    assert cache.flush_now() == 1  # automatic without tqdm: as before, silently
