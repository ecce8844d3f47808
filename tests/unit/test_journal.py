"""The shard journal without Ray: appends, commits, trimming after a flush, recovery of
what a crashed run acknowledged, a torn last record."""

from __future__ import annotations

import os

import pytest

from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.errors import FlushError
from persistroids_dist.journal import WRITE, Journal
from persistroids_dist.shard import ShardCore


def kb(k):
    return encode_key(k)


def core_over(tmp_path, journal, **kw):
    kw.setdefault("writes_threshold", 10**9)
    kw.setdefault("millis_threshold", 1e9)
    return ShardCore([SQLiteConnector(tmp_path / "store.db")], journal=journal, **kw)


def segments(journal):
    return sorted(n for n in os.listdir(journal.directory) if n.endswith(".journal"))


def test_committed_records_survive_the_process_and_come_back_in_order(tmp_path):
    j = Journal(str(tmp_path / "j"), fsync="off")
    j.append([WRITE, kb("a"), None, encode_value(1), None])
    j.append([WRITE, kb("a"), None, encode_value(2), None])
    j.commit()
    # A crash: the object is dropped without close(); the next run finds the records.
    again = Journal(str(tmp_path / "j"), fsync="off")
    assert [r[3] for r in again.recovered()] == [encode_value(1), encode_value(2)]


def test_a_torn_last_record_ends_recovery_without_losing_earlier_ones(tmp_path):
    j = Journal(str(tmp_path / "j"), fsync="always")
    j.append([WRITE, kb("a"), None, encode_value("whole"), None])
    j.append([WRITE, kb("b"), None, encode_value("x" * 100), None])
    j.commit()
    path = os.path.join(j.directory, segments(j)[0])
    with open(path, "r+b") as f:  # the second record was cut off mid-write by a crash
        f.truncate(os.path.getsize(path) - 10)
    again = Journal(str(tmp_path / "j"))
    assert [r[1] for r in again.recovered()] == [kb("a")]


@pytest.fixture
def rotate_every_flush(monkeypatch):
    """Every flush starts a new segment (in use: once a segment holds 1 MiB)."""
    monkeypatch.setattr("persistroids_dist.shard._JOURNAL_SEGMENT_BYTES", 0)


def test_a_crashed_shard_recovers_every_acknowledged_write_and_delete(tmp_path,
                                                                        rotate_every_flush):
    j = Journal(str(tmp_path / "j"), fsync="interval")
    core = core_over(tmp_path, j)
    core.write(kb("a"), None, encode_value("stored"))
    core.flush()  # "a" is in the store: its record is trimmed
    core.write(kb("b"), None, encode_value("pending"))
    core.delete(kb("a"))
    core.write(kb("c"), None, encode_value(1))
    core.write(kb("c"), None, encode_value(2))
    j.commit()  # the host does this before acknowledging
    # SIGKILL: nothing more happens in this process.
    j2 = Journal(str(tmp_path / "j"))
    fresh = core_over(tmp_path, j2)
    assert fresh.replay(j2.recovered()) == 4
    assert decode_value(fresh.read(kb("b"))) == "pending"
    assert decode_value(fresh.read(kb("c"))) == 2
    assert fresh.read_stored(kb("a")) is None  # the delete came back too
    fresh.flush()
    probe = core_over(tmp_path, None)
    assert decode_value(probe.read(kb("b"))) == "pending"
    assert decode_value(probe.read(kb("c"))) == 2
    assert probe.read_stored(kb("a")) is None
    assert segments(j2) == [segments(j2)[-1]]  # only the fresh, empty segment is left
    assert os.path.getsize(os.path.join(j2.directory, segments(j2)[0])) == 0


def test_a_failed_flush_keeps_its_records_until_a_later_flush_stores_them(tmp_path,
                                                                           rotate_every_flush):
    j = Journal(str(tmp_path / "j"), fsync="off")
    store = SQLiteConnector(tmp_path / "store.db")
    core = ShardCore([store], journal=j, writes_threshold=10**9, millis_threshold=1e9)
    core.write(kb("k"), None, encode_value("v"))
    real_flush = store.flush
    store.flush = lambda payloads: (_ for _ in ()).throw(OSError("store down"))
    with pytest.raises(FlushError):
        core.flush()
    j.commit()
    again = Journal(str(tmp_path / "j"))
    assert [r[1] for r in again.recovered()] == [kb("k")]  # still journaled
    store.flush = real_flush
    core.write(kb("m"), None, encode_value("w"))
    core.flush()
    assert list(Journal(str(tmp_path / "j")).recovered()) == []


def test_writes_nothing_buffers_are_not_journaled(tmp_path):
    class WritesItself(SQLiteConnector):
        def write(self, args, value):
            return None  # stored directly: nothing to buffer, nothing to recover

    j = Journal(str(tmp_path / "j"), fsync="off")
    core = ShardCore([WritesItself(tmp_path / "s.db")], journal=j)
    core.write(kb("x"), None, encode_value(1))
    assert j.appended == 0


def test_close_with_remove_deletes_the_journal(tmp_path):
    j = Journal(str(tmp_path / "j" / "shard0"), fsync="always")
    j.append([WRITE, kb("a"), None, encode_value(1), None])
    j.close(remove=True)
    assert not os.path.exists(tmp_path / "j" / "shard0")
    with pytest.raises(ValueError, match="fsync"):
        Journal(str(tmp_path / "k"), fsync="sometimes")


def test_small_flushes_share_a_segment_and_replaying_it_gives_the_same_state(tmp_path):
    # In use a segment is rotated once it holds 1 MiB, so it may still hold writes a flush
    # stored; replaying them again, in order, must leave the same state.
    j = Journal(str(tmp_path / "j"), fsync="off")
    core = core_over(tmp_path, j)
    core.write(kb("k"), None, encode_value(1))
    core.flush()
    core.write(kb("k"), None, encode_value(2))
    core.delete(kb("gone"))
    core.write(kb("m"), None, encode_value("pending"))
    j.commit()
    assert len(segments(j)) == 1  # no rotation for a small segment
    j2 = Journal(str(tmp_path / "j"))
    fresh = core_over(tmp_path, j2)
    assert fresh.replay(j2.recovered()) == 4  # the stored write of k=1 comes back too
    fresh.flush()
    probe = core_over(tmp_path, None)
    assert decode_value(probe.read(kb("k"))) == 2
    assert decode_value(probe.read(kb("m"))) == "pending"


def test_a_write_many_batch_is_journaled_as_its_writes_and_replays_the_same(tmp_path):
    # write_many's batch path (no time to live, room in the partition) and its per-write
    # path (from the first item with a time to live on) journal the same records.
    j = Journal(str(tmp_path / "j"), fsync="off")
    core = core_over(tmp_path, j)
    core.write(kb("a"), None, encode_value("old"))
    items = [(kb(f"k{i}"), None, encode_value(i)) for i in range(50)]
    items += [(kb("a"), None, encode_value("new")), (kb("t"), None, encode_value("ttl"), 60.0),
              (kb("z"), None, encode_value("after"))]
    assert core.write_many(items) == 53
    j.commit()
    held = {k: core.read(k) for k in [kb(f"k{i}") for i in range(50)] + [kb("a"), kb("z")]}
    j2 = Journal(str(tmp_path / "j"))
    records = list(j2.recovered())
    assert [r[1] for r in records] == [kb("a")] + [item[0] for item in items]
    assert records[-2][4] == 60.0 and records[-1][4] is None
    fresh = core_over(tmp_path, j2)
    assert fresh.replay(iter(records)) == 54
    assert {k: fresh.read(k) for k in held} == held
    assert fresh.metrics()["pending"] == core.metrics()["pending"] == 53
    assert fresh._pending_bytes == core._pending_bytes
