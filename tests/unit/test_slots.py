"""Slot ownership on the shards (``persistroids_dist.slots``), the shard side of resharding:
refusing keys of slots a shard does not own, handing slots over with everything pending on
them (export, stage, finish, own: the coordinator's steps), a process killed between any two
steps, and a restarted shard's replay, which must not bring back writes of slots it gave away.

No Ray: ShardHosts in this process, on a real SQLite file and real sockets.
"""

from __future__ import annotations

import threading
import time

import pytest

from persistroids_dist import FlushError, MovedError, protocol
from persistroids_dist.codec import NUM_SLOTS, decode_value, encode_key, encode_value, slot_of
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.journal import REQUEST, WRITE
from persistroids_dist.slots import OWNS, SlotMap, replay_filter
from persistroids_dist.transport import Connection

SECRET = b"s" * 32
OPTIONS = {"writes_threshold": 10**9, "millis_threshold": 10**9}


def kb(key: str) -> bytes:
    return encode_key(key)


def test_a_slot_map_refuses_keys_of_slots_it_gave_away():
    m = SlotMap(0)
    m.check([kb("a"), kb("b")])  # an original shard owns what is routed to it
    m.give([slot_of(kb("a"))], epoch=3)
    assert m.checked and m.epoch == 3
    m.check([kb("b")])
    with pytest.raises(MovedError) as e:
        m.check([kb("b"), kb("a")])
    assert (e.value.shard, e.value.epoch, e.value.slot) == (0, 3, slot_of(kb("a")))
    m.take([slot_of(kb("a"))], epoch=4)
    m.check([kb("a")])
    restored = SlotMap(0)
    restored.restore(m.record())
    assert restored.bitmap == m.bitmap and restored.epoch == 4 and restored.checked
    with pytest.raises(ValueError, match="bitmap"):
        SlotMap(0, b"\x01" * 10)


def test_replay_drops_writes_of_slots_a_later_owns_record_gives_away():
    a, b = kb("a"), kb("b")
    all_slots = b"\x01" * NUM_SLOTS
    without_a = bytearray(all_slots)
    without_a[slot_of(a)] = 0
    records = [
        [OWNS, 0, all_slots, False],
        [WRITE, a, None, b"1", None],
        [REQUEST, b"sid", 1, b"ok", [[WRITE, a, None, b"2", None], [WRITE, b, None, b"3", None]]],
        [OWNS, 1, bytes(without_a), True],  # a's slot given away (flushed first)
        [WRITE, b, None, b"4", None],
        [OWNS, 2, all_slots, True],  # and taken back: later writes of it count
        [WRITE, a, None, b"5", None],
    ]
    out = list(replay_filter(records, REQUEST, (WRITE,)))
    assert out == [
        records[0],
        [REQUEST, b"sid", 1, b"ok", [[WRITE, b, None, b"3", None]]],  # the request stays
        records[3], records[4], records[5], records[6],
    ]


@pytest.fixture
def hosts(tmp_path):
    made = []

    def make(index: int, **options) -> ShardHost:
        h = ShardHost(index, [SQLiteConnector(str(tmp_path / "store.db"))],
                      {**OPTIONS, "journal_path": str(tmp_path / f"j{index}"), **options},
                      SECRET)
        made.append(h)
        return h
    yield make
    for h in made:
        try:
            h.close()
        except Exception:
            pass


def call(host: ShardHost, frame: bytes):
    c = Connection(host.address(), SECRET)
    try:
        return c.call(frame)
    finally:
        c.close()


def hand(a: ShardHost, b: ShardHost, slots: list[int], epoch: int) -> int:
    """The coordinator's four steps of a reshard, for slots going from ``a`` to ``b``."""
    parts = a.export_slots({s: b.index for s in slots}, epoch)
    for dest, (blob, grants) in parts.items():
        assert dest == b.index
        b.stage_slots(epoch, a.index, blob, grants)
    dropped = a.finish_handoff(epoch)
    b.own_slots(slots, epoch)
    return dropped


def crash(host: ShardHost) -> None:
    """Stop serving without any flush or goodbye, as a SIGKILL would (the OS keeps what was
    written to the journal files)."""
    host.core.stop()
    host.server.close()


def broken_store(path) -> None:
    """Make the SQLite file at ``path`` unopenable: every store call fails (a store down)."""
    path.unlink()
    path.mkdir()


def mended_store(path) -> None:
    path.rmdir()


def test_slots_move_with_their_pending_writes_while_the_store_is_down(hosts, tmp_path):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    keys = [f"k{i}" for i in range(40)]
    for k in keys:
        call(a, protocol.write(kb(k), None, encode_value(k)))
    call(a, protocol.delete(kb(keys[1]), None))
    store = tmp_path / "store.db"
    for host in (a, b):  # an open connection would go on writing to the unlinked file
        host.core.connectors[0].disconnect()
    broken_store(store)  # nothing can be flushed: the handoff moves the buffer itself
    moving = sorted({slot_of(kb(k)) for k in keys[:20]})
    mine = [k for k in keys if slot_of(kb(k)) in moving]
    with pytest.raises(MovedError):  # b owns nothing yet
        call(b, protocol.read(kb(keys[0]), None))
    assert hand(a, b, moving, epoch=1) == len(mine)
    assert a.core.metrics()["pending"] == 40 - len(mine)
    assert b.core.metrics()["pending"] == len(mine)
    for k in mine:
        with pytest.raises(MovedError) as e:
            call(a, protocol.write(kb(k), None, encode_value("late")))
        assert e.value.epoch == 1
    # A batch with one moved key is refused whole: nothing of it applied.
    other = next(k for k in keys if k not in mine)
    with pytest.raises(MovedError):
        call(a, protocol.write_many([[kb(other), None, encode_value("x")],
                                     [kb(mine[0]), None, encode_value("x")]]))
    assert decode_value(call(a, protocol.read(kb(other), None))) == other
    for k in mine:  # from b's memory: the store has none of them
        want = None if k == keys[1] else k
        assert decode_value(call(b, protocol.read(kb(k), None))) == want
    mended_store(store)
    assert b.flush() == len(mine) and a.flush() == 40 - len(mine)
    fresh = hosts(2)  # a new shard over the same store reads what both flushed
    for k in keys:
        want = None if k == keys[1] else k
        assert decode_value(call(fresh, protocol.read(kb(k), None))) == want


def test_dead_letters_and_times_to_live_move_with_their_slots(tmp_path):
    import sqlite3
    db = tmp_path / "checked.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL "
                "CHECK (length(v) < 100)) WITHOUT ROWID")
    con.close()
    made = [ShardHost(i, [SQLiteConnector(str(db))],
                      {**OPTIONS, "max_attempts": 1, "journal_path": str(tmp_path / f"j{i}"),
                       **({"slots": b"\x00" * NUM_SLOTS, "check_slots": True} if i else {})},
                      SECRET) for i in range(2)]
    a, b = made
    try:
        call(a, protocol.write(kb("poison"), None, encode_value("x" * 200)))
        for i in range(5):  # stored beside it: the store is up, only that row is refused
            call(a, protocol.write(kb(f"good{i}"), None, encode_value(i)))
        for _ in range(3):
            try:
                a.flush()
            except FlushError:
                pass
        assert [d["key"] for d in a.core.dead_letters()] == ["poison"]
        call(a, protocol.write(kb("brief"), None, encode_value(1), ttl_s=3600))
        slots = sorted({slot_of(kb("poison")), slot_of(kb("brief"))})
        hand(a, b, slots, epoch=1)
        assert a.core.dead_letters() == [] and a.core.metrics()["pending"] == 0
        (dead,) = b.core.dead_letters()
        assert dead["key"] == "poison" and "CHECK" in dead["error"]
        left = b.core._expires[kb("brief")] - b.core._clock()
        assert 3500 < left <= 3600
        assert b.core.discard_dead_letters() == 1
    finally:
        for h in made:
            h.close()


def test_a_source_restarted_mid_handoff_keeps_its_slots_and_is_exported_again(hosts):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    call(a, protocol.write(kb("k"), None, encode_value(1)))
    slot = slot_of(kb("k"))
    parts = a.export_slots({slot: 1}, epoch=1)
    b.stage_slots(1, 0, *parts[1])
    crash(a)  # killed between the export and the finish: it replays, owns the slot again
    a = hosts(0)
    call(a, protocol.write(kb("k"), None, encode_value(2)))  # an old-table client writes
    with pytest.raises(RuntimeError, match="no handoff of epoch 1"):
        a.finish_handoff(1)
    b.stage_slots(1, 0, *a.export_slots({slot: 1}, epoch=1)[1])  # over the first one
    assert a.finish_handoff(1) == 1
    assert b.own_slots([slot], 1) == 1
    assert decode_value(call(b, protocol.read(kb("k"), None))) == 2


def test_a_destination_restarted_before_or_after_taking_still_has_the_state(hosts):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    for i in range(10):
        call(a, protocol.write(kb(f"k{i}"), None, encode_value(i)))
    slots = sorted({slot_of(kb(f"k{i}")) for i in range(10)})
    b.stage_slots(1, 0, *a.export_slots(dict.fromkeys(slots, 1), epoch=1)[1])
    crash(b)  # staged, not taken: the new process has it staged (from its journal)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    assert b.core.metrics()["pending"] == 0 and len(b._staged) == 1
    a.finish_handoff(1)
    assert b.own_slots(slots, 1) == 10
    call(b, protocol.write(kb("k3"), None, encode_value("newer")))
    crash(b)  # taken: the keys pend again after the restart, the newer write on top
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    assert b.core.metrics()["pending"] == 10 and not b._staged
    got = [decode_value(call(b, protocol.read(kb(f"k{i}"), None))) for i in range(10)]
    assert got == [0, 1, 2, "newer", 4, 5, 6, 7, 8, 9]
    crash(a)  # and the source replays none of them
    a = hosts(0)
    assert a.core.metrics()["pending"] == 0
    with pytest.raises(MovedError):
        call(a, protocol.read(kb("k0"), None))


def test_a_cancelled_handoff_moves_nothing(hosts):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    call(a, protocol.write(kb("k"), None, encode_value(1)))
    slot = slot_of(kb("k"))
    b.stage_slots(1, 0, *a.export_slots({slot: 1}, epoch=1)[1])
    with pytest.raises(MovedError):
        call(a, protocol.read(kb("k"), None))
    assert a.cancel_handoff(1) and b.discard_staged(1) == 1
    assert decode_value(call(a, protocol.read(kb("k"), None))) == 1
    assert a.flush() == 1  # flushes run again
    crash(b)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    assert not b._staged and b.core.metrics()["pending"] == 0


def test_a_handoff_nobody_finishes_is_cancelled_by_the_shard_itself(hosts):
    a = hosts(0)
    call(a, protocol.write(kb("k"), None, encode_value(1)))
    a.export_slots({slot_of(kb("k")): 1}, epoch=1, freeze_s=0.2)
    with pytest.raises(MovedError):
        call(a, protocol.read(kb("k"), None))
    deadline = time.monotonic() + 10
    while a._handing is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decode_value(call(a, protocol.read(kb("k"), None))) == 1
    with pytest.raises(RuntimeError, match="no handoff"):
        a.finish_handoff(1)


def test_a_restarted_shard_replays_no_write_of_a_slot_it_gave_away(hosts):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    call(a, protocol.write(kb("moved"), None, encode_value("old")))
    call(a, protocol.write(kb("kept"), None, encode_value("mine")))
    moved = slot_of(kb("moved"))
    assert moved != slot_of(kb("kept"))
    hand(a, b, [moved], epoch=1)
    call(a, protocol.write(kb("kept"), None, encode_value("pending")))
    crash(a)  # the segment still holds the moved key's write (no rotation since)
    again = hosts(0)  # a new process on the same journal
    assert again.core.metrics()["pending"] == 1  # "kept" only
    with pytest.raises(MovedError):
        call(again, protocol.read(kb("moved"), None))
    assert decode_value(call(again, protocol.read(kb("kept"), None))) == "pending"
    assert again.slots.epoch == 1 and again.slots.checked


def test_leases_move_with_their_slots(hosts):
    # A lease held on a slot being handed over is not recalled: from the export on, a new
    # lease, the owner's push and its renewal are refused naming the reshard's epoch (the
    # client waits for that table instead of retrying here); the new owner honours the
    # same grant, and another client's access there recalls it as usual.
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    k = kb("leased")
    call(a, protocol.write(k, None, encode_value(1)))
    gen, _ = call(a, protocol.lease([k], b"owner", 60_000.0))
    parts = a.export_slots({slot_of(k): 1}, epoch=7)
    (grant,) = parts[1][1]
    assert grant[:3] == [k, b"owner", gen] and 59 < grant[3] <= 60
    for frame in (protocol.lease([k], b"other", 1000.0),
                  protocol.release(b"owner", [[k, None, encode_value(2), gen]], [[k, gen]]),
                  protocol.poll(b"owner", 1000.0, 0.0, [[k, gen]])):
        with pytest.raises(MovedError) as e:
            call(a, frame)
        assert e.value.epoch == 7
    b.stage_slots(7, 0, *parts[1])
    a.finish_handoff(7)
    b.own_slots([slot_of(k)], 7)
    assert not a._leases and b._holds(k, b"owner", gen)
    assert call(b, protocol.poll(b"owner", 60_000.0, 0.0, [[k, gen]])) == []  # renewed
    # Another client's read there recalls it; the owner's release (with its write) is
    # applied by the new owner under the moved grant, and the read then sees it.
    got = []
    reader = threading.Thread(target=lambda: got.append(call(b, protocol.read(k, None))))
    reader.start()
    assert call(b, protocol.poll(b"owner", 60_000.0, 5000.0, [[k, gen]])) == [[k, gen]]
    call(b, protocol.release(b"owner", [[k, None, encode_value(2), gen]], [[k, gen]]))
    reader.join(10)
    assert [decode_value(v) for v in got] == [2]
