"""Which hash slots a shard owns, and the journal's memory of it (for resharding).

Keys hash to ``NUM_SLOTS`` slots (``codec.slot_of``); a table maps slots to shards. A shard
serves only keys of the slots it owns: ``SlotMap.check`` raises ``MovedError`` for any other,
so a client routing by an older table is told to refresh instead of being served by the
wrong shard. An original shard that never gave a slot away skips the check: a client of any
epoch can only send it keys of slots it owns (tables only ever give it more).

Ownership changes are journaled as ``OWNS`` records (the whole map), said again at the start
of every segment. A shard gives slots away only once their new owner holds what was pending
on them (``HANDOFF``, journaled there first), so on replay every write or delete of a slot
that a *later* ``OWNS`` record no longer owns lives on elsewhere: ``replay_filter`` drops
those records (applied again, an old write would later be flushed over the new owner's
newer one). ``expand_handoffs`` turns each ``TAKEN`` into one ``ADOPT`` record per key, so the
same filter applies to handed-over keys.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from .codec import NUM_SLOTS
from .errors import MovedError

__all__ = ["ADOPT", "HANDOFF", "OWNS", "TAKEN", "SlotMap", "expand_handoffs", "replay_filter",
           "slots_of_table"]

OWNS = 6  # journal record: [OWNS, epoch, bitmap bytes (one byte per slot: 1 owned)]
# A reshard hands pending state over in two journaled steps on the receiving shard:
HANDOFF = 7  # [HANDOFF, epoch, source shard, pickled key states]: staged, not owned yet
TAKEN = 8  # [TAKEN, epoch, adopted]: the staged states of that epoch pend here from this
#            point on (adopted True), or were discarded (False: the reshard aborted)
ADOPT = 9  # [ADOPT, kb, key state]: one key of a TAKEN handoff (made on replay, not written)

_crc32 = zlib.crc32


def _slot(kb: bytes) -> int:
    return _crc32(kb) % NUM_SLOTS  # codec.slot_of, inlined: this runs for every key


def slots_of_table(table: list[int], shard: int) -> bytes:
    """The ownership bitmap of ``shard`` under slot ``table``."""
    return bytes(1 if owner == shard else 0 for owner in table)


class SlotMap:
    """The slots one shard owns (``bitmap``: one byte per slot) at ``epoch``. ``checked``:
    refuse keys of other slots (False only for an original shard that never gave one away)."""

    def __init__(self, shard: int, bitmap: bytes | None = None, epoch: int = 0,
                 checked: bool = False) -> None:
        self.shard = shard
        self.bitmap = bytearray(bitmap if bitmap is not None else b"\x01" * NUM_SLOTS)
        if len(self.bitmap) != NUM_SLOTS:
            raise ValueError(f"a slot bitmap has {NUM_SLOTS} bytes, got {len(self.bitmap)}")
        self.epoch = epoch
        self.checked = checked

    def owns(self, kb: bytes) -> bool:
        return bool(self.bitmap[_slot(kb)])

    def check(self, kbs: Iterable[bytes]) -> None:
        """Raise MovedError if any of ``kbs`` is in a slot this shard does not own."""
        if not self.checked:
            return
        bitmap = self.bitmap
        for kb in kbs:
            if not bitmap[_slot(kb)]:
                raise MovedError(self.shard, self.epoch, _slot(kb))

    def give(self, slots: Iterable[int], epoch: int) -> None:
        for s in slots:
            self.bitmap[s] = 0
        self.epoch = max(self.epoch, epoch)
        self.checked = True

    def take(self, slots: Iterable[int], epoch: int) -> None:
        for s in slots:
            self.bitmap[s] = 1
        self.epoch = max(self.epoch, epoch)

    def record(self) -> list[Any]:
        return [OWNS, self.epoch, bytes(self.bitmap), self.checked]

    def restore(self, record: list[Any]) -> None:
        _, self.epoch, bitmap, self.checked = record
        self.bitmap = bytearray(bitmap)


def replay_filter(records: list[Any], nested: int, kinds: tuple[int, ...]
                  ) -> Iterator[list[Any]]:
    """``records`` (a journal's, in order) without the ``kinds`` records (writes, deletes:
    ``[kind, kb, ...]``) of slots that a later OWNS record gives away; also inside records
    of kind ``nested`` (a session REQUEST: ``[kind, sid, seq, answer, [record, ...]]``),
    whose own entry stays. OWNS records themselves are passed on."""
    # Backwards: the slots given away by some OWNS record after each position.
    gone_after: list[bytearray | None] = [None] * len(records)
    gone: bytearray | None = None
    for i in range(len(records) - 1, -1, -1):
        gone_after[i] = gone
        if records[i][0] == OWNS:
            not_owned = bytes(1 - b for b in records[i][2])
            gone = bytearray(not_owned) if gone is None else bytearray(
                a | b for a, b in zip(gone, not_owned, strict=True))

    def keep(record: list[Any], gone: bytearray | None) -> bool:
        return gone is None or record[0] not in kinds or not gone[_slot(record[1])]

    for record, gone in zip(records, gone_after, strict=True):
        if gone is None:
            yield record
        elif record[0] == nested:
            yield [*record[:4], [r for r in record[4] if keep(r, gone)]]
        elif keep(record, gone):
            yield record


def expand_handoffs(records: Iterable[list[Any]]) -> Iterator[list[Any]]:
    """``records`` with an ``[ADOPT, kb, state]`` record per key handed over before each
    ``TAKEN`` (from the ``HANDOFF`` records of its epoch; a source's later HANDOFF replaces
    its earlier one, as a retried reshard step does). HANDOFF and TAKEN pass on too."""
    staged: dict[int, dict[int, list[Any]]] = {}
    for record in records:
        if record[0] == HANDOFF:
            staged.setdefault(record[1], {})[record[2]] = record
        elif record[0] == TAKEN:
            handoffs = staged.pop(record[1], {}).values()
            if record[2]:
                for handoff in handoffs:
                    for state in pickle.loads(handoff[3]):
                        yield [ADOPT, state[0], state]
        yield record
