"""What a power loss could take from a checkpoint, checked where it is decided (a power loss
itself cannot be staged here): a shard puts its sealed epoch on the disk
(``checkpoint_durable``, which the coordinator waits for before it writes the manifest); a
restore's rollback is on the disk before a job replays; the default checkpoint store commits
with ``synchronous=FULL``. The fsync calls are observed (the real ones still run), on real
files and a real shard host."""

from __future__ import annotations

import os
import sqlite3

import pytest

from persistroids_dist.checkpoints import default_store
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.journal import Journal

SECRET = b"d" * 32


@pytest.fixture
def synced(monkeypatch):
    """The paths ``os.fsync`` was called on, in order (the real fsync runs too)."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_sync_makes_every_segment_and_the_folder_durable(tmp_path, synced):
    j = Journal(str(tmp_path / "j"), fsync="interval", interval_s=3600)
    j.append([1, b"a"])
    first = j.rotate()  # a closed segment, not synced (a flush rotation skips the fsync)
    j.append([1, b"b"])
    j.commit()  # hands the records to the kernel only
    assert synced == []
    assert j.sync() is True
    seg = [p for p in synced if p.endswith(".journal")]
    assert sorted(seg) == sorted({j._path(first), j._path(j.segment)})
    assert str(tmp_path / "j") in synced  # the new segment's name
    j.close()


def test_sync_does_nothing_when_fsync_is_off(tmp_path, synced):
    j = Journal(str(tmp_path / "j"), fsync="off")
    j.append([1, b"a"])
    assert j.sync() is False and synced == []
    j.close()


def host(tmp_path, fsync: str = "interval") -> ShardHost:
    return ShardHost(0, [SQLiteConnector(str(tmp_path / "s.db"))],
                     {"staged": True, "journal": str(tmp_path / "j"), "fsync": fsync,
                      "init_fn": lambda a: 0}, SECRET)


def test_a_sealed_epoch_is_put_on_the_disk_before_the_manifest(tmp_path, synced):
    h = host(tmp_path)
    try:
        h.core.put("a", 1)
        h.core.put("b", 2)
        counts = h.checkpoint_seal(0)
        assert counts["keys"] == 2
        h.checkpoint_resume(0)  # writes go on before the disk is waited for
        del synced[:]
        assert h.checkpoint_durable(0) is True  # the coordinator's step before the manifest
        # Every segment the sealed writes and the SEAL record are in was fsynced.
        journals = {p for p in synced if p.endswith(".journal")}
        on_disk = {os.path.join(h.journal.directory, n)
                   for n in os.listdir(h.journal.directory) if n.endswith(".journal")}
        older = {p for p in on_disk if p != h.journal._path(h.journal.segment)}
        assert older and older <= journals, (older, journals)
        del synced[:]
        h.checkpoint_recover(0, rollback=True)  # a restore: durable before a replay
        assert any(p.endswith(".journal") for p in synced)
        del synced[:]
        h.checkpoint_recover(0, rollback=False)  # settling at start: the journal suffices
        assert not any(p.endswith(".journal") for p in synced)
    finally:
        h.close()


def test_the_default_checkpoint_store_commits_durably(tmp_path):
    conn = default_store(str(tmp_path / "ckpt"))
    assert isinstance(conn, SQLiteConnector) and conn.synchronous == "FULL"
    conn.connect()
    try:
        conn.flush([conn.write(("checkpoint", "c", 0), {"id": 0})])
        # The setting the store's own connection runs with (2 = FULL).
        assert conn._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        conn.disconnect()
    with sqlite3.connect(str(tmp_path / "ckpt" / "checkpoints.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM kv").fetchone()[0] == 1
