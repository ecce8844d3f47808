"""A checkpointed shard (``ShardCore(staged=True)``): writes reach the stores only as part of
a committed epoch, oldest first; a failed checkpoint gives its writes back to the next
epoch; a restore drops everything after the restored epoch; a restarted shard rebuilds all
of it from its journal. Real SQLite, no Ray."""

from __future__ import annotations

import pytest
from sqlite_rows import stored

from persistroids_dist.codec import encode_key
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.errors import FlushError
from persistroids_dist.journal import Journal
from persistroids_dist.shard import ShardCore

OPTS = {"writes_threshold": 0, "millis_threshold": 1, "staged": True}


def core(tmp_path, journal: bool = True, **kw) -> ShardCore:
    j = Journal(str(tmp_path / "j"), fsync="off") if journal else None
    return ShardCore([SQLiteConnector(str(tmp_path / "s.db"))], journal=j,
                     **{**OPTS, **kw})


def test_only_committed_epochs_reach_the_store_oldest_first(tmp_path):
    c = core(tmp_path)
    c.put("a", 1)
    c.put("b", 1)
    c.tick()
    assert stored(tmp_path / "s.db") == {}  # thresholds passed, nothing is committed
    with c._lock:
        assert c.seal(1) == {"keys": 2, "bytes": c._sealed[1].sizes[encode_key("a")] * 2}
    c.put("a", 2)  # the next epoch's
    with c._lock:
        c.seal(2)
        c.commit(1)
    c.flush()
    assert stored(tmp_path / "s.db") == {"a": 1, "b": 1}
    assert c.get("a") == 2  # the cache answers the newest
    with c._lock:
        c.commit(2)
    c.flush()
    assert stored(tmp_path / "s.db") == {"a": 2, "b": 1}
    assert c.staged_state() == {"open": 0, "sealed": {}, "committed": 2}


def test_a_failed_checkpoint_gives_its_writes_to_the_next(tmp_path):
    c = core(tmp_path)
    c.put("a", 1)
    c.put("b", 1)
    with c._lock:
        c.seal(1)
    c.put("a", 2)  # newer than the sealed one: wins after the unseal
    with c._lock:
        assert c.unseal(1)
        c.seal(2)
        c.commit(2)
    c.flush()
    assert stored(tmp_path / "s.db") == {"a": 2, "b": 1}


def test_a_rollback_drops_what_came_after_the_restored_epoch(tmp_path):
    c = core(tmp_path)
    c.put("a", 1)
    with c._lock:
        c.seal(1)
        c.commit(1)  # committed, not stored yet
    c.put("a", 2)
    c.put("b", 2)
    with c._lock:
        c.seal(2)  # sealed, never committed
    c.put("a", 3)
    c.put("c", 3)
    with c._lock:
        assert c.rollback(1) == 3
    assert [c.get(k) for k in "abc"] == [1, None, None]  # as of epoch 1
    c.flush()
    assert stored(tmp_path / "s.db") == {"a": 1}


def test_a_restarted_shard_rebuilds_epochs_commits_and_rollbacks(tmp_path):
    c = core(tmp_path)
    c.put("a", 1)
    with c._lock:
        c.seal(1)
        c.commit(1)
    c.flush()  # epoch 1 stored
    c.put("a", 2)
    with c._lock:
        c.seal(2)
    c.put("b", 3)
    with c._lock:
        c.seal(3)  # sealed, never committed
    c.put("c", 4)  # open
    with c._lock:
        c.commit(2)  # committed; no write since, so the store was not reached
    c.journal.commit()
    c.stop()  # a crash: the journal keeps it all
    again = core(tmp_path)
    again.replay(again.journal.recovered())
    assert again.staged_state() == {"open": 1, "sealed": {2: 1, 3: 1}, "committed": 2}
    assert [again.get(k) for k in "abc"] == [2, 3, 4]
    with again._lock:
        again.rollback(2)  # a job restores checkpoint 2
    again.flush()
    assert stored(tmp_path / "s.db") == {"a": 2}
    again.journal.commit()
    again.stop()
    third = core(tmp_path)  # and the rollback holds after another restart
    third.replay(third.journal.recovered())
    assert third.staged_state() == {"open": 0, "sealed": {}, "committed": 2}
    assert [third.get(k) for k in "abc"] == [2, None, None]


def test_a_store_down_keeps_the_committed_epoch_and_the_next_waits(tmp_path):
    c = core(tmp_path)
    c.put("a", 1)
    with c._lock:
        c.seal(1)
        c.commit(1)
    db = tmp_path / "s.db"
    c.connectors[0].disconnect()
    if db.exists():
        db.unlink()
    db.mkdir()
    with pytest.raises(FlushError):
        c.flush()
    c.put("a", 2)
    with c._lock:
        c.seal(2)
        c.commit(2)
    assert c.staged_state()["sealed"] == {1: 1, 2: 1}
    db.rmdir()
    c.flush()
    assert stored(db) == {"a": 2}
    assert c.staged_state()["sealed"] == {}


def test_committed_keys_are_never_evicted_before_they_are_stored(tmp_path):
    c = core(tmp_path, max_entries=2)
    for i in range(5):
        c.put(i, i)
    with c._lock:
        c.seal(1)
    assert all(c.get(i) == i for i in range(5))  # over capacity, none dropped
    with c._lock:
        c.commit(1)
    c.flush()
    assert len(c._entries) <= 2 and stored(tmp_path / "s.db")[4] == 4
