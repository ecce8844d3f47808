"""Slot ownership on the shards (``persistroids_dist.slots``), the shard side of resharding:
refusing keys of slots a shard does not own, giving slots away (flushed first), taking them,
and a restarted shard's replay, which must not bring back writes of slots it gave away.

No Ray: ShardHosts in this process, on a real SQLite file and real sockets.
"""

from __future__ import annotations

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


def test_slots_move_flushed_and_the_new_owner_serves_them(hosts):
    a = hosts(0)
    b = hosts(1, slots=b"\x00" * NUM_SLOTS, check_slots=True)
    keys = [f"k{i}" for i in range(40)]
    for k in keys:
        call(a, protocol.write(kb(k), None, encode_value(k)))
    moving = sorted({slot_of(kb(k)) for k in keys[:20]})
    with pytest.raises(MovedError):  # b owns nothing yet
        call(b, protocol.read(kb(keys[0]), None))
    assert a.release_slots(moving, epoch=1) >= 20  # their entries went, flushed first
    assert a.core.metrics()["pending"] == 0
    for k in keys[:20]:
        with pytest.raises(MovedError) as e:
            call(a, protocol.write(kb(k), None, encode_value("late")))
        assert e.value.epoch == 1
    # A batch with one moved key is refused whole: nothing of it applied.
    with pytest.raises(MovedError):
        call(a, protocol.write_many([[kb(keys[30]), None, encode_value("x")],
                                     [kb(keys[0]), None, encode_value("x")]]))
    assert decode_value(call(a, protocol.read(kb(keys[30]), None))) == keys[30]
    b.own_slots(moving, epoch=1)
    for k in keys[:20]:  # read from the store, where a flushed them
        assert decode_value(call(b, protocol.read(kb(k), None))) == k
    assert decode_value(call(a, protocol.read(kb(keys[39]), None))) == keys[39]


def test_a_restarted_shard_replays_no_write_of_a_slot_it_gave_away(hosts, tmp_path):
    a = hosts(0)
    call(a, protocol.write(kb("moved"), None, encode_value("old")))
    call(a, protocol.write(kb("kept"), None, encode_value("mine")))
    moved = slot_of(kb("moved"))
    assert moved != slot_of(kb("kept"))
    a.release_slots([moved], epoch=1)
    call(a, protocol.write(kb("kept"), None, encode_value("pending")))
    # The segment still holds the moved key's write (no rotation since); a crash now:
    a.core.stop()
    a.server.close()
    again = hosts(0)  # a new process on the same journal
    assert again.core.metrics()["pending"] == 1  # "kept" only
    with pytest.raises(MovedError):
        call(again, protocol.read(kb("moved"), None))
    assert decode_value(call(again, protocol.read(kb("kept"), None))) == "pending"
    assert again.slots.epoch == 1 and again.slots.checked


def test_giving_slots_away_fails_whole_if_the_flush_fails(hosts, tmp_path):
    a = hosts(0)
    call(a, protocol.write(kb("k"), None, encode_value(1)))
    store = tmp_path / "store.db"
    a.core.connectors[0].disconnect()
    store.unlink()
    store.mkdir()  # SQLite cannot open a directory: the flush fails
    with pytest.raises(FlushError):
        a.release_slots([slot_of(kb("k"))], epoch=1)
    assert decode_value(call(a, protocol.read(kb("k"), None))) == 1  # still a's, pending
    assert a.slots.owns(kb("k")) and not a.slots.checked and a.slots.epoch == 0


def test_a_lease_on_a_slot_being_given_away_is_refused_with_the_reshards_epoch(hosts):
    # While a reshard recalls the leases on the slots it moves, a new lease on them is
    # refused naming the reshard's epoch, so the client waits for that table instead of
    # retrying here (with the shard's current epoch it would spin).
    a = hosts(0)
    k = kb("leased")
    a._leaving, a._leaving_epoch = {slot_of(k)}, 7
    with pytest.raises(MovedError) as e:
        call(a, protocol.lease([k], b"owner", 1000.0))
    assert e.value.epoch == 7
    a._leaving = set()
    assert call(a, protocol.lease([k], b"owner", 1000.0))[0] > 0  # granted once it is over
