"""Poison writes: a payload the store refuses on its own is singled out (the rest of its
batch is stored), retried, then set aside as a dead letter; a store that is down is not
mistaken for poison. Real SQLite with a CHECK constraint, no Ray."""

from __future__ import annotations

import sqlite3

import pytest
from sqlite_rows import stored

from persistroids_dist.codec import encode_key, encode_value
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.errors import FlushError
from persistroids_dist.shard import ShardCore

POISON = "x" * 200  # longer than the CHECK allows


def checked_store(path) -> SQLiteConnector:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL "
                "CHECK (length(v) < 100)) WITHOUT ROWID")
    con.close()
    return SQLiteConnector(path)


class Counting(SQLiteConnector):
    calls = 0

    def flush(self, payloads):
        Counting.calls += 1
        return super().flush(payloads)


def test_one_rejected_row_no_longer_blocks_its_shard(tmp_path):
    # Bug (issue 8): one row behind a CHECK constraint kept all 500 writes of its shard from
    # the store, retried forever.
    db = tmp_path / "s.db"
    core = ShardCore([checked_store(db)], writes_threshold=10**9, millis_threshold=1e9,
                     max_attempts=3)
    for i in range(500):
        core.put(("k", i), POISON if i == 250 else i)
    for attempt in range(1, 4):
        if attempt < 3:
            with pytest.raises(FlushError, match="CHECK constraint failed"):
                core.flush()
        else:
            core.flush()  # the third refusal makes it a dead letter: nothing left failing
        assert len(stored(db)) == 499  # everything else was stored at the first attempt
    (dead,) = core.dead_letters()
    assert dead["key"] == ("k", 250) and dead["attempts"] == 3
    assert dead["connector"] == "sqlite:kv" and "CHECK constraint failed" in dead["error"]
    m = core.metrics()
    assert m["dead_letters"] == 1 and m["pending"] == 0 and m["flush"] == 499
    assert core.get(("k", 250)) == POISON  # still what the cache answers

    assert core.retry_dead_letters() == 1
    assert core.metrics()["pending"] == 1
    for _ in range(3):
        try:
            core.flush()
        except FlushError:
            pass
    assert [d["key"] for d in core.dead_letters()] == [("k", 250)]
    assert core.discard_dead_letters() == 1 and core.dead_letters() == []


def test_a_newer_write_replaces_a_dead_letter(tmp_path):
    db = tmp_path / "s.db"
    core = ShardCore([checked_store(db)], writes_threshold=10**9, millis_threshold=1e9,
                     max_attempts=1)
    core.put("good", 1)
    core.put("bad", POISON)
    core.flush()
    assert [d["key"] for d in core.dead_letters()] == ["bad"]
    core.put("bad", "fixed")
    assert core.dead_letters() == []
    core.flush()
    assert stored(db) == {"good": 1, "bad": "fixed"}


def test_a_store_that_refuses_everything_is_not_poison(tmp_path):
    db = tmp_path / "s.db"
    store = Counting(db)
    core = ShardCore([store], writes_threshold=10**9, millis_threshold=1e9, max_attempts=2)
    for i in range(1000):
        core.put(i, i)
    real = SQLiteConnector.flush

    def down(self, payloads):
        Counting.calls += 1
        raise OSError("store down")

    Counting.flush = down
    try:
        Counting.calls = 0
        for _ in range(5):
            with pytest.raises(FlushError, match="store down"):
                core.flush()
        assert Counting.calls <= 5 * 7  # the batch, two halves, four quarters: no further
        assert core.dead_letters() == [] and core.metrics()["pending"] == 1000
    finally:
        Counting.flush = real
    core.flush()
    assert len(stored(db)) == 1000


def test_two_poison_rows_cost_a_few_calls_not_one_per_row(tmp_path):
    db = tmp_path / "s.db"
    Counting.calls = 0
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL "
                "CHECK (length(v) < 100)) WITHOUT ROWID")
    con.close()
    core = ShardCore([Counting(db)], writes_threshold=10**9, millis_threshold=1e9,
                     max_attempts=1)
    for i in range(1024):
        core.write(encode_key(i), None, encode_value(POISON if i in (3, 700) else i))
    core.flush()
    assert sorted(d["key"] for d in core.dead_letters()) == [3, 700]
    assert len(stored(db)) == 1022
    assert Counting.calls <= 2 * 2 * 10 + 1  # ~2 log2(n) per poison row


def _journaled_core(db, journal_dir):
    """A shard core over ``db`` with its journal in ``journal_dir``, replayed as a restarted
    shard's host does (the previous core is simply abandoned: nothing is closed or flushed,
    as after a SIGKILL; the journal's records already reached the file at each commit)."""
    from persistroids_dist.journal import Journal

    journal = Journal(str(journal_dir), fsync="off")
    core = ShardCore([SQLiteConnector(db)], writes_threshold=10**9, millis_threshold=1e9,
                     max_attempts=1, journal=journal)
    core.replay(journal.recovered())
    return core, journal


def test_dead_letters_survive_a_crash_and_so_do_retries_and_discards(tmp_path):
    # Issue 8: dead letters were held in memory only, so a shard crash lost them (the
    # flush that buried them released the journal segment with their writes).
    db = tmp_path / "s.db"
    checked_store(db).connect()
    jdir = tmp_path / "journal"
    core, journal = _journaled_core(db, jdir)
    for i in range(20):
        core.put(("k", i), POISON if i in (3, 11) else i)
    journal.commit()
    core.flush()  # two dead letters (max_attempts=1); the other 18 rows stored
    assert {d["key"] for d in core.dead_letters()} == {("k", 3), ("k", 11)}
    assert len(stored(db)) == 18

    core, journal = _journaled_core(db, jdir)  # "crash" and restart
    assert {d["key"] for d in core.dead_letters()} == {("k", 3), ("k", 11)}
    assert {d["attempts"] for d in core.dead_letters()} == {1}
    # (Writes already stored may replay as pending again, from a segment too small to have
    # been rotated out; storing them twice leaves the same rows. The dead ones do not.)
    dead_kbs = {encode_key(("k", 3)), encode_key(("k", 11))}
    assert not dead_kbs & core._dirty
    core.flush()  # later flushes keep them in the journal (their segment is released)
    core.put(("k", 50), 50)
    journal.commit()
    core.flush()

    core, journal = _journaled_core(db, jdir)
    assert len(core.dead_letters()) == 2
    assert core.retry_dead_letters() == 2  # pending again...
    journal.commit()
    core, journal = _journaled_core(db, jdir)  # ...and after a crash still pending
    assert core.dead_letters() == [] and dead_kbs <= core._dirty
    core.flush()  # refused again: dead letters again
    assert len(core.dead_letters()) == 2
    assert core.discard_dead_letters() == 2
    journal.commit()
    core, journal = _journaled_core(db, jdir)
    assert core.dead_letters() == [] and not dead_kbs & core._dirty  # discarded for good
    core.flush()
    assert core.dead_letters() == [] and len(stored(db)) == 19
