"""A shard's host: its ShardCore served on sockets, its flush timer and its lease table.

No Ray in here: the same host runs inside a Ray actor (``actors.ShardActor``) or in a test
process. ``ray.cloudpickle`` is only the serializer that ships ``update`` functions and
checkpoint states.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import cloudpickle

from .codec import slot_of
from .errors import (
    BackpressureError,
    CacheClosedError,
    FlushError,
    LeaseLostError,
    PicklingRefusedError,
)
from .journal import DELETE, REQUEST, SESSIONS, WRITE, Journal
from .protocol import Op, array_header
from .replica import MirrorLink
from .session import Sessions
from .shard import ShardCore
from .slots import ADOPT, HANDOFF, OWNS, TAKEN, SlotMap, expand_handoffs, replay_filter
from .transport import Packed, ShardServer

__all__ = ["Grant", "ShardHost"]

log = logging.getLogger("persistroids_dist.host")


def _unpickle_checkpoint(blob: bytes | None, allow_pickle: bool = True) -> Any:
    if blob and not allow_pickle:
        raise PicklingRefusedError("this cache was made with allow_pickle=False: a checkpoint "
                                   "state (a pickle) is refused, never unpickled")
    return cloudpickle.loads(blob) if blob else None


@dataclass(slots=True)
class Grant:
    """One exclusive lease on one key. ``gen`` names this grant: a RELEASE or renewal that
    names another generation (a late message about an earlier grant) never touches it."""

    owner: bytes
    gen: int
    expires: float  # time.monotonic() seconds
    recalled: bool = False


class ShardHost:
    """Hosts a ShardCore: serves it on sockets and runs its flush timer. Ray-free, so the
    same host can run in a test process; ``ShardActor`` is this class as a Ray actor."""

    def __init__(self, index: int, connectors: list[Any], options: dict[str, Any],
                 secret: bytes, tcp_host: str | None = None) -> None:
        """``options``: ShardCore's, plus ``journal`` (a directory; None: no journal; each
        shard journals in ``<journal>/shard<index>``), ``fsync`` and ``tls`` (a
        ``tls.TLSConfig``: TCP connections over mutual TLS)."""
        self.index = index
        options = dict(options)
        journal_dir = options.pop("journal", None)
        # A promoted backup journals in its own folder (its copy of the primary's journal).
        journal_path = options.pop("journal_path", None)
        if journal_dir and not journal_path:
            journal_path = os.path.join(journal_dir, f"shard{index}")
        fsync = options.pop("fsync", "interval")
        self.secret = secret
        self.tls = tls = options.pop("tls", None)
        self.backpressure_timeout_s = float(options.pop("backpressure_timeout_s", 30.0))
        # allow_pickle=False: no pickled update function or checkpoint state is unpickled;
        # updates run only the functions registered here by name (sent through Ray).
        self.allow_pickle = bool(options.pop("allow_pickle", True))
        self.functions: dict[str, Any] = dict(options.pop("functions", None) or {})
        self.journal = Journal(journal_path, fsync) if journal_path else None
        # The slots this shard owns (see ``slots``): keys of others are refused (MovedError).
        self.slots = SlotMap(index, options.pop("slots", None), options.pop("epoch", 0),
                             options.pop("check_slots", False))
        # background: the core's own store thread makes every connector call and its flusher
        # thread flushes, so no store I/O runs under the lock the handlers below take.
        self.core = ShardCore(connectors, index=index, journal=self.journal, background=True,
                              **options)
        # Numbered requests of client sessions: a request resent after a reconnect (this
        # shard restarted, say) is applied once. Under the core's lock, as the journal is.
        self.sessions = Sessions(self.core._lock, self.journal, index)
        self.sessions.on_resent = self._learn_function
        # Pending state a reshard handed here, journaled but not owned yet (the reshard's
        # last step, ``own_slots``, adopts it): (epoch, source shard) -> its HANDOFF record.
        self._staged: dict[tuple[int, int], list[Any]] = {}
        self._staged_grants: dict[tuple[int, int], list[list[Any]]] = {}
        # The handoff under way from this shard, if any (see ``export_slots``).
        self._handing: dict[str, Any] | None = None
        # The checkpoint cutting now (``checkpoint_seal``): writes wait until it resumes.
        self._paused: int | None = None
        self._pause_timer: threading.Timer | None = None
        if self.journal is not None:
            # A restarted shard first applies what its previous run acknowledged and no
            # flush stored (and learns which requests those were, and which slots it owns);
            # only then does it serve.
            replayed = self.core.replay(self._unwrapped(self.journal.recovered()))
            if replayed:
                log.warning("shard %d: replayed %d journaled write(s) from %s", index,
                            replayed, self.journal.directory)
            # Each new segment starts with the session table and the slot map: the
            # segments a flush releases take their records with them. This run's too.
            self.journal.on_rotate = self._segment_head
            with self.core._lock:
                for record in self._segment_head():
                    self.journal.append(record)
            self.journal.commit()
        self._dir = tempfile.mkdtemp(prefix="persistroids-")
        os.chmod(self._dir, 0o700)
        # Exclusive leases: key -> its current Grant. Guarded by the core's lock, so a lease
        # check and the operation it guards are atomic.
        self._leases: dict[bytes, Grant] = {}
        # Generations go on from the clock, not from 0: a restarted shard must not give a
        # new grant the number of one its previous run gave (a late RELEASE naming that old
        # grant would then match the new one).
        self._gen = time.time_ns() // 1000
        # Set (under the core's lock) while the shard closes: writes are refused from then
        # on, so none can land after the final flush; cleared again if that flush fails.
        self._closing = False
        # The core's own condition: a finished flush wakes the writers waiting for room.
        self._lease_cond = self.core._cond
        self.lease_stats = {"leases_granted": 0, "recalls": 0, "leases_expired": 0}
        handlers = {
            Op.READ: self._read,
            Op.READ_MANY: self._read_many,
            Op.WRITE: self._write,
            Op.WRITE_MANY: self._write_many,
            Op.UPDATE: self._update,
            Op.UPDATE_NAMED: self._update_named,
            Op.FLUSH: self.core.flush_count,
            Op.METRICS: self.metrics,
            Op.PING: lambda: self.index,
            Op.LEASE: self._lease,
            Op.RELEASE: self._release,
            Op.POLL: self._poll,
            Op.DELETE: self._delete,
            Op.GET: self._get,
            Op.INVALIDATE: self._invalidate,
            Op.INVALIDATE_ALL: self.core.invalidate_all,
            Op.READ_MANY_VALUES: self._read_many_values,
            Op.DEAD_LETTERS: self.core.dead_letters,
            Op.RETRY_DEAD_LETTERS: self.core.retry_dead_letters,
            Op.DISCARD_DEAD_LETTERS: self.core.discard_dead_letters,
        }
        self.server = ShardServer(handlers, secret,
                                  unix_path=os.path.join(self._dir, f"shard{index}.sock"),
                                  tcp_host=tcp_host,
                                  before_reply=self.journal.commit if self.journal else None,
                                  sessions=self.sessions, tls=tls)
        self.backup: dict[str, Any] | None = None  # the backup's address, while it has one
        self.backup_transport = ""
        self._before_serving()
        self._address = self.server.start()

    def _before_serving(self) -> None:
        """Runs once the journal is replayed, before the first client is served (a
        restarted primary takes its backup back here, so nothing is acknowledged alone)."""

    def _segment_head(self) -> list[list[Any]]:
        # Staged handoffs too: the segment that holds them may be released before they are
        # taken (a flush of this shard's own keys).
        return [self.sessions.snapshot(), self.slots.record(), *self._staged.values()]

    def _unwrapped(self, records: Any) -> Any:
        """The journal's records, the session and slot ones taken in (a request's own
        records are handed on for the core to replay), without the writes of slots that
        were given away later (they were stored first: see ``slots.replay_filter``)."""
        for record in replay_filter(list(expand_handoffs(records)), REQUEST,
                                    (WRITE, DELETE, ADOPT)):
            if record[0] in (REQUEST, SESSIONS):
                yield from self.sessions.replayed(record)
            elif record[0] == OWNS:
                self.slots.restore(record)
            elif record[0] == HANDOFF:
                self._staged[(record[1], record[2])] = record
            elif record[0] == TAKEN:
                for key in [k for k in self._staged if k[0] == record[1]]:
                    del self._staged[key]
            else:
                yield record

    # -- leases ------------------------------------------------------------------------------
    def _wait_unleased(self, kbs: Any) -> bool:
        """Hold the caller until no other client owns any of ``kbs``. Call with the core lock
        held: the wait releases it, and the caller's operation runs under the same hold.
        Returns whether it waited."""
        leases = self._leases
        waited = False
        while True:
            now = time.monotonic()
            blocked = None
            for kb in kbs:
                rec = leases.get(kb)
                if rec is None:
                    continue
                if rec.expires <= now:  # the owner stopped renewing: its lease is void
                    del leases[kb]
                    self.lease_stats["leases_expired"] += 1
                    log.warning("shard %d: a lease expired (owner %s, generation %d)",
                                self.index, rec.owner.hex()[:8], rec.gen)
                    continue
                if not rec.recalled:
                    rec.recalled = True
                    self.lease_stats["recalls"] += 1
                blocked = rec
            if blocked is None:
                return waited
            self._lease_cond.notify_all()  # wakes the owner's long poll
            self._lease_cond.wait(max(0.0005, blocked.expires - now))
            waited = True

    def _admit(self, kb: bytes | None = None) -> bool:
        """Let a write in (call with the core lock held): refused if the shard is closing;
        while the write buffer is full (``max_pending``/``max_pending_bytes``), wait for a
        flush to make room (the wait releases the lock), up to ``backpressure_timeout_s``,
        then BackpressureError. A write to a key already pending takes no more room.
        Returns whether it waited. While a checkpoint cuts (``checkpoint_seal``), writes wait
        for it: they go after the cut."""
        self._refuse_if_closing()
        waited = False
        while self._paused is not None:
            self._lease_cond.wait(0.05)
            self._refuse_if_closing()
            waited = True
        core = self.core
        if not core.full() or (kb is not None and kb in core._dirty):
            return waited
        core.c["backpressure_waits"] += 1
        deadline = time.monotonic() + self.backpressure_timeout_s
        while core.full():
            left = deadline - time.monotonic()
            if left <= 0:
                core.c["backpressure_refusals"] += 1
                m = core.metrics()
                raise BackpressureError(
                    f"shard {self.index}: write buffer full ({m['pending']} keys, "
                    f"{m['pending_bytes']} bytes pending; max_pending={core.max_pending}, "
                    f"max_pending_bytes={core.max_pending_bytes}) for "
                    f"{self.backpressure_timeout_s:g} s: are its stores down? "
                    f"({m['last_errors'] or 'no store error yet'}); write refused")
            self._lease_cond.wait(min(left, 0.05))  # the flush timer runs meanwhile
            self._refuse_if_closing()
        return True

    def _enter(self, kbs: Any, write: bool = False, kb: bytes | None = None) -> None:
        """Let a request on ``kbs`` in (call with the core lock held): refuse keys of slots
        this shard does not own (MovedError), then, for a ``write``, wait for room in the
        buffer (``_admit``; ``kb``: its one key), and wait while another client leases one
        of them. After any wait, all of it again: the wait released the lock, and a reshard
        may have handed the slots away meanwhile (a write let in then would be lost)."""
        while True:
            if self.slots.checked:
                self.slots.check(kbs)
            waited = self._admit(kb) if write else False
            if self._leases and self._wait_unleased(kbs):
                waited = True
            if not waited:
                return

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise CacheClosedError(f"shard {self.index} is shutting down: write refused")

    def _lease(self, kbs: list[bytes], owner: bytes, ttl_ms: float) -> list[Any]:
        """Grant ``owner`` exclusive use of ``kbs`` (recalling other owners first); return
        ``[generation, values]``: the grant's identity and the keys' current values."""
        with self._lease_cond:
            while self._paused is not None:  # a checkpoint recalls every lease: none now
                self._lease_cond.wait(0.05)
            if self.slots.checked:
                self.slots.check(kbs)
            self._refuse_if_closing()
            out = self.core.read_many(kbs, guard=self._guard(kbs, owner))
            expires = time.monotonic() + ttl_ms / 1000
            self._gen += 1
            for kb in kbs:
                self._leases[kb] = Grant(owner, self._gen, expires)
            self.lease_stats["leases_granted"] += len(kbs)
            return [self._gen, out]

    def _holds(self, kb: bytes, owner: bytes, gen: int) -> bool:
        rec = self._leases.get(kb)
        return rec is not None and rec.owner == owner and rec.gen == gen

    def _release(self, owner: bytes, items: list[list[Any]], grants: list[list[Any]]) -> int:
        """Apply the owner's writes ``[kb, ab, vb, gen]``, then end the named ``[kb, gen]``
        grants. Refused, applying nothing, if a written key's grant is no longer current
        (it expired, or was replaced): those writes were made under a lost lease."""
        with self._lease_cond:
            if self.slots.checked:  # a reshard moved them (with their grants): go there
                self.slots.check([item[0] for item in items])
                self.slots.check([grant[0] for grant in grants])
            if items:
                self._refuse_if_closing()
            lost = [kb for kb, _, _, gen in items if not self._holds(kb, owner, gen)]
            try:
                if not lost and items:
                    self.core.write_many([item[:3] for item in items])
            finally:  # a refused write still ends the grants (its error reaches the owner)
                for kb, gen in grants:
                    if self._holds(kb, owner, gen):
                        del self._leases[kb]
                self._lease_cond.notify_all()
            if lost:
                raise LeaseLostError(
                    f"shard {self.index}: the lease on {len(lost)} key(s) was lost (it expired "
                    f"or was taken over) before their writes came back; those writes were not "
                    f"applied: {lost[:3]!r}")
            return len(items)

    def _poll(self, owner: bytes, ttl_ms: float, wait_ms: float,
              grants: list[list[Any]]) -> list[list[Any]]:
        """Renew the named ``[kb, gen]`` grants of ``owner`` and return its recalled grants
        as ``[kb, gen]``, waiting up to ``wait_ms`` for a recall (a long poll: the owner hears
        of a recall as soon as it happens). A grant the owner does not name is not renewed:
        if its owner never learnt of it (a lost answer), it expires."""
        deadline = time.monotonic() + wait_ms / 1000
        with self._lease_cond:
            while True:
                if self.slots.checked:  # a grant moved with its slot: renew it there
                    self.slots.check([grant[0] for grant in grants])
                now = time.monotonic()
                for kb, gen in grants:
                    rec = self._leases.get(kb)
                    if rec is not None and rec.owner == owner and rec.gen == gen:
                        rec.expires = max(rec.expires, now + ttl_ms / 1000)
                recalled = [[kb, rec.gen] for kb, rec in self._leases.items()
                            if rec.owner == owner and rec.recalled]
                if recalled or now >= deadline:
                    return recalled
                self._lease_cond.wait(deadline - now)

    # -- socket handlers --------------------------------------------------------------------
    def _read(self, kb: bytes, ab: bytes | None, ckpt: bytes | None = None) -> bytes:
        with self._lease_cond:
            self._enter((kb,))
            if ckpt:
                return self.core.read(kb, ab, checkpoint=_unpickle_checkpoint(
                    ckpt, self.allow_pickle))
            return self.core.read(kb, ab)

    def _read_many(self, kbs: list[bytes], abs_: list[bytes | None] | None) -> list[bytes]:
        with self._lease_cond:
            self._enter(kbs)
            return self.core.read_many(kbs, abs_)

    def _guard(self, kbs: Any, owner: bytes | None = None) -> Any:
        """A core guard: wait until no other client than ``owner`` leases any of ``kbs``.
        The core calls it again after every wait for a store, so the check and the
        operation it guards happen in one hold of the lock."""
        def guard() -> None:
            if self.slots.checked:  # the wait for the store let a reshard run
                self.slots.check(kbs)
            if self._leases:
                self._wait_unleased([kb for kb in kbs if kb in self._leases
                                     and self._leases[kb].owner != owner])
        return guard

    def _read_many_values(self, kbs: list[bytes]) -> Packed:
        """``_read_many``, answered as the values themselves (stored bytes concatenated
        into one msgpack array): the client decodes them with the frame, in C."""
        vbs = self._read_many(kbs, None)
        return Packed(array_header(len(vbs)) + b"".join(vbs))

    def _write(self, kb: bytes, ab: bytes | None, vb: bytes, ckpt: bytes | None = None,
               ttl_s: float | None = None) -> None:
        with self._lease_cond:
            self._enter((kb,), True, kb)
            if ckpt:
                self.core.write(kb, ab, vb, ttl_s=ttl_s,
                                checkpoint=_unpickle_checkpoint(ckpt, self.allow_pickle))
            else:
                self.core.write(kb, ab, vb, ttl_s=ttl_s)

    def _delete(self, kb: bytes, ab: bytes | None) -> None:
        with self._lease_cond:
            self._enter((kb,), True, kb)
            self.core.delete(kb, ab)

    def _get(self, kb: bytes, ab: bytes | None) -> bytes | None:
        with self._lease_cond:
            self._enter((kb,))
            return self.core.read_stored(kb, ab)

    def _invalidate(self, kb: bytes) -> bool:
        with self._lease_cond:
            self._enter((kb,))
            return self.core.invalidate(kb)

    def _write_many(self, items: list[list[Any]], ckpt: bytes | None = None) -> int:
        with self._lease_cond:
            # All or nothing: a batch with a key of a slot moved away applies no item.
            self._enter([item[0] for item in items], True)
            if ckpt:
                return self.core.write_many(
                    items, checkpoint=_unpickle_checkpoint(ckpt, self.allow_pickle))
            return self.core.write_many(items)

    def _update(self, kb: bytes, ab: bytes | None, digest: bytes, fn_blob: bytes | None) -> bytes:
        if not self.allow_pickle:
            raise PicklingRefusedError(
                f"shard {self.index}: this cache was made with allow_pickle=False: an update "
                "function sent as a pickle is refused, never unpickled; register it with "
                "init(..., functions={name: fn}) and call update(args, name)")
        fn = self.core.function(digest)
        if fn is None:
            if fn_blob is None:
                raise LookupError(f"unknown update function {digest.hex()}")
            fn = cloudpickle.loads(fn_blob)
            self.core.register_function(digest, fn)
        with self._lease_cond:
            self._enter((kb,), True, kb)
            return self.core.update(kb, ab, fn, guard=self._guard((kb,)))

    def _learn_function(self, req: list[Any]) -> None:
        """A resent UPDATE answered from the session table still registers the function it
        carries: its client takes this process to know it from now on (a new process, after
        a restart or a failover, knows none)."""
        if req[0] == Op.UPDATE and len(req) > 4 and req[4] is not None and self.allow_pickle \
                and self.core.function(req[3]) is None:
            self.core.register_function(req[3], cloudpickle.loads(req[4]))

    def _update_named(self, kb: bytes, ab: bytes | None, name: str) -> bytes:
        """``_update`` by a function registered at ``init(..., functions=...)``."""
        fn = self.functions.get(name) if isinstance(name, str) else None
        if fn is None:
            known = ", ".join(map(repr, sorted(self.functions))) or \
                "none (register them with init(..., functions={name: fn}))"
            raise LookupError(f"shard {self.index}: no update function named {name!r}; "
                              f"registered: {known}")
        with self._lease_cond:
            self._enter((kb,), True, kb)
            return self.core.update(kb, ab, fn, guard=self._guard((kb,)))

    # -- resharding -------------------------------------------------------------------------
    def export_slots(self, moves: dict[int, int], epoch: int, freeze_s: float = 120.0
                     ) -> dict[int, tuple[bytes, list[list[Any]]]]:
        """First step of handing slots to other shards (a reshard; ``moves``: slot -> the
        shard it goes to): refuse every request on them (MovedError naming ``epoch``), hold
        this shard's flushes and return, per receiving shard, everything pending on them
        (``ShardCore.export_keys``, pickled) and the leases held on them (``[kb, owner,
        generation, seconds left, recalled]``).

        Nothing is dropped or journaled yet: ``finish_handoff`` does that once the new
        owners hold the state, ``cancel_handoff`` undoes this step. If neither comes within
        ``freeze_s`` (the coordinator died), the shard cancels it itself, and a late
        ``finish_handoff`` is refused."""
        moving = set(moves)
        if self.journal is None:
            raise ValueError(f"shard {self.index}: resharding needs the journal (a restarted "
                             "shard learns which slots it owns from it)")
        with self._lease_cond:
            if self._handing is not None:
                if self._handing["epoch"] == epoch and self._handing["slots"] == moving:
                    return self._handing["parts"]  # a retried call: the same answer
                raise RuntimeError(f"shard {self.index}: a handoff of epoch "
                                   f"{self._handing['epoch']} is under way")
            before = self.slots.record()
            self.slots.give(moving, epoch)  # in memory only until finish_handoff
            try:
                self.core.hold_flushes(True)  # may wait for a running flush (lock released)
                states: dict[int, list[Any]] = {}
                for state in self.core.export_keys(lambda kb: slot_of(kb) in moving):
                    states.setdefault(moves[slot_of(state[0])], []).append(state)
            except BaseException:
                self.slots.restore(before)
                self.core.hold_flushes(False)
                raise
            # Leases move too: the owner's pushes and renewals go to the new owner, which
            # honours the same grant (owner, generation, time left, recalled or not).
            now = time.monotonic()
            grants: dict[int, list[list[Any]]] = {}
            for kb, g in self._leases.items():
                slot = slot_of(kb)
                if slot in moving:
                    grants.setdefault(moves[slot], []).append(
                        [kb, g.owner, g.gen, max(0.0, g.expires - now), g.recalled])
            parts = {dest: (pickle.dumps(states.get(dest, []), protocol=pickle.HIGHEST_PROTOCOL),
                            grants.get(dest, []))
                     for dest in set(states) | set(grants)}
            timer = threading.Timer(freeze_s, self.cancel_handoff, (epoch, True))
            timer.daemon = True
            self._handing = {"epoch": epoch, "slots": moving, "before": before,
                             "parts": parts, "timer": timer}
            timer.start()
        return parts

    def finish_handoff(self, epoch: int) -> int:
        """Last step of handing slots away, once their new owner journaled their state
        (``stage_slots``): drop everything of them here, journal the new slot map, let
        flushes run again. Returns how many keys with pending state went. Raises
        RuntimeError if no handoff of ``epoch`` is under way (this process restarted, or
        it gave up waiting): the coordinator then exports again, or aborts."""
        with self._lease_cond:
            handing = self._handing
            if handing is None or handing["epoch"] != epoch:
                raise RuntimeError(f"shard {self.index}: no handoff of epoch {epoch} under "
                                   "way (restarted, or it timed out and was cancelled)")
            handing["timer"].cancel()
            moving = handing["slots"]
            dropped = self.core.drop_keys(lambda kb: slot_of(kb) in moving)
            for kb in [kb for kb in self._leases if slot_of(kb) in moving]:
                del self._leases[kb]  # the new owner honours them
            self._lease_cond.notify_all()  # their owners' polls here learn of the move
            self.journal.append(self.slots.record())
            self._handing = None
            self.core.hold_flushes(False)
        self.journal.commit()
        return dropped

    def cancel_handoff(self, epoch: int, timed_out: bool = False) -> bool:
        """Undo ``export_slots`` of ``epoch`` (the reshard aborts): the slots are this
        shard's again, with all their state, and flushes run. Whether one was undone."""
        with self._lease_cond:
            handing = self._handing
            if handing is None or handing["epoch"] != epoch:
                return False
            handing["timer"].cancel()
            self.slots.restore(handing["before"])
            self._handing = None
            self.core.hold_flushes(False)
        if timed_out:
            log.error("shard %d: the handoff of epoch %d was neither finished nor cancelled "
                      "in time; the slots are this shard's again", self.index, epoch)
        return True

    def stage_slots(self, epoch: int, source: int, blob: bytes,
                    grants: list[list[Any]] | None = None) -> int:
        """Second step of a handoff, on the receiving shard: journal the state ``source``
        exported for epoch ``epoch`` (replacing an earlier export of the same source and
        epoch); it is adopted by ``own_slots``, and the leases ``grants`` installed then
        (kept in memory only, as every lease is). Returns how many keys it holds."""
        if self.journal is None:
            raise ValueError(f"shard {self.index}: resharding needs the journal")
        record = [HANDOFF, epoch, source, blob]
        with self._lease_cond:
            self._staged[(epoch, source)] = record
            self._staged_grants[(epoch, source)] = list(grants or [])
            self.journal.append(record)
        self.journal.commit()  # on disk (and on the backup) before the source drops it
        return len(pickle.loads(blob))

    def discard_staged(self, epoch: int) -> int:
        """Forget the state staged for ``epoch`` (the reshard aborted). Returns how many
        sources' states went."""
        with self._lease_cond:
            gone = [k for k in self._staged if k[0] == epoch]
            for k in gone:
                del self._staged[k]
                self._staged_grants.pop(k, None)
            if gone and self.journal is not None:
                self.journal.append([TAKEN, epoch, False])  # none of it adopted on replay
        if gone and self.journal is not None:
            self.journal.commit()
        return len(gone)

    def own_slots(self, slots: list[int], epoch: int) -> int:
        """Take ``slots`` (a reshard moved them here), with whatever was staged for them
        (``stage_slots``): it pends here from now on, flushed by this shard. Idempotent.
        Returns how many keys were adopted."""
        adopted = 0
        with self._lease_cond:
            staged = [k for k in self._staged if k[0] == epoch]
            now = time.monotonic()
            for k in staged:
                adopted += self.core.adopt(pickle.loads(self._staged[k][3]))
                for kb, owner, gen, left, recalled in self._staged_grants.pop(k, []):
                    self._leases[kb] = Grant(owner, gen, now + left, recalled)
                    self._gen = max(self._gen, gen)
            if staged:
                self.journal.append([TAKEN, epoch, True])
                for k in staged:
                    del self._staged[k]
            self.slots.take(slots, epoch)
            self.slots.checked = True
            if self.journal is not None:
                self.journal.append(self.slots.record())
        if self.journal is not None:
            self.journal.commit()
        return adopted

    # -- checkpoints ---------------------------------------------------------------------------
    def _check_checkpointed(self) -> None:
        if not self.core.staged or self.journal is None:
            raise ValueError(f"shard {self.index}: not a checkpointed cache (init(..., "
                             "checkpoints=True) with the journal on)")

    def checkpoint_seal(self, epoch: int, pause_s: float = 120.0) -> dict[str, int]:
        """This shard's part of checkpoint ``epoch``'s cut: stop letting writes in (they
        wait, and go after the cut), recall every lease and wait for its owner's writes
        (they are in the cut), then seal what is pending as the epoch and journal it
        (durable, and on the backup, before this returns). Writes stay held until
        ``checkpoint_resume`` (or ``pause_s``, if the coordinator is gone). Returns the
        epoch's counts (keys, bytes) and the lease wait in ms."""
        self._check_checkpointed()
        with self._lease_cond:
            if self._paused is not None and self._paused != epoch:
                raise RuntimeError(f"shard {self.index}: checkpoint {self._paused} is cutting")
            if epoch in self.core._sealed or epoch <= self.core._committed:
                raise ValueError(f"shard {self.index}: checkpoint {epoch} exists already")
            self._paused = epoch
            start = time.monotonic()
            while self._leases:  # recalled like any access; expired at worst
                self._wait_unleased(list(self._leases))
            waited_ms = (time.monotonic() - start) * 1000
            try:
                counts = self.core.seal(epoch)
            except BaseException:
                self._resume(epoch)
                raise
            timer = self._pause_timer = threading.Timer(pause_s, self.checkpoint_abort,
                                                        (epoch,))
            timer.daemon = True
            timer.start()
        self.journal.commit()
        return {**counts, "lease_wait_ms": round(waited_ms, 3)}

    def checkpoint_durable(self, epoch: int) -> bool:
        """Put this shard's sealed epoch ``epoch`` on the disk (fsync). The coordinator
        calls it after the writes resumed (a slow disk does not lengthen the pause) and
        before it records the checkpoint: a power loss right after the manifest must not
        leave a recorded checkpoint whose writes were only in the page cache. Whether it
        synced (False with ``fsync="off"``)."""
        self._check_checkpointed()
        return self.journal.sync()

    def _resume(self, epoch: int) -> bool:
        if self._paused != epoch:
            return False
        self._paused = None
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self._lease_cond.notify_all()
        return True

    def checkpoint_resume(self, epoch: int) -> bool:
        """Let writes in again after checkpoint ``epoch``'s cut (every shard has cut)."""
        with self._lease_cond:
            return self._resume(epoch)

    def checkpoint_abort(self, epoch: int) -> bool:
        """Checkpoint ``epoch`` failed: its writes belong to the next one; writes go on.
        Whether this shard had sealed it."""
        self._check_checkpointed()
        with self._lease_cond:
            self._resume(epoch)
            undone = self.core.unseal(epoch)
        self.journal.commit()
        return undone

    def checkpoint_commit(self, epoch: int) -> None:
        """Checkpoint ``epoch``'s manifest is written: the stores may have it (and every
        older epoch), oldest first."""
        self._check_checkpointed()
        with self._lease_cond:
            self.core.commit(epoch)
        self.journal.commit()

    def checkpoint_recover(self, epoch: int, rollback: bool) -> dict[str, Any]:
        """Settle this shard with the last committed checkpoint ``epoch`` (-1: none): every
        sealed epoch up to it is committed; with ``rollback`` (a restore) every write after
        it is dropped, else the writes of checkpoints that never committed belong to the
        next one. Returns the state afterwards (``ShardCore.staged_state``) and the keys a
        rollback dropped."""
        self._check_checkpointed()
        with self._lease_cond:
            if self._paused is not None:
                self._resume(self._paused)
            if epoch >= 0:
                self.core.commit(epoch)
            dropped = 0
            if rollback:
                dropped = self.core.rollback(epoch)
            else:
                for e in [e for e in self.core._sealed if e > epoch]:
                    self.core.unseal(e)
        self.journal.commit()
        if rollback:  # a job replays its input from here on: the rollback must hold
            self.journal.sync()
        return {**self.core.staged_state(), "dropped": dropped}

    # -- control plane ----------------------------------------------------------------------
    def address(self) -> dict[str, Any]:
        return self._address

    def attach_backup(self, address: dict[str, Any], node_id: str | None = None,
                      timeout_s: float = 10.0) -> str:
        """Mirror this shard's journal to the backup at ``address`` (a ``replica.Backup``):
        send it everything on disk now, then every write before it is acknowledged. Returns
        the link's transport, "unix" or "tcp" (``metrics()["backup_transport"]`` says
        "tcp+tls" over TLS). ``node_id``: this shard's Ray node (Unix socket if the backup
        shares it). A backup that stays silent ``timeout_s`` counts as lost."""
        if self.journal is None:
            raise ValueError(f"shard {self.index} has no journal to mirror (replicas need one)")
        link = MirrorLink(address, self.secret, node_id=node_id, timeout_s=timeout_s,
                          tls=self.tls)
        self.journal.on_mirror_lost = self._mirror_lost
        try:
            self.journal.attach_mirror(link)
        except BaseException:
            link.close()
            raise
        self.backup, self.backup_transport = address, link.transport + ("+tls" if link.tls
                                                                         else "")
        return link.transport

    def detach_backup(self) -> None:
        """Stop mirroring to the backup (a reshard retired this shard: it holds nothing)."""
        if self.journal is not None:
            self.journal.detach_mirror()
        self.backup = None

    def _mirror_lost(self, error: BaseException) -> None:
        """The backup stopped answering. Here (no Ray): go on without one. The Ray actor
        asks the coordinator, which may say this shard was deposed (its backup promoted)."""
        log.warning("shard %d: its backup stopped answering (%s); going on without one",
                    self.index, error)
        self.backup = None

    def flush(self) -> int:
        """Flush this shard; return the number of distinct keys flushed."""
        return self.core.flush_count()

    def metrics(self) -> dict[str, Any]:
        m = self.core.metrics()
        m["shard"] = self.index
        m["pid"] = os.getpid()
        if self.core.staged:  # keys of the open epoch, sealed epochs not stored yet
            m["checkpoint"] = self.core.staged_state()
        m.update(self.lease_stats)
        m["leased_keys"] = len(self._leases)
        m["auth_failures"] = self.server.auth_failures
        m["handshake_refused"] = self.server.handshake_refused
        m["connections"] = self.server.connections
        m["connections_tcp"] = self.server.tcp_connections
        m["tls"] = self.server.tls is not None
        m["connections_tls"] = self.server.tls_connections
        m["sessions"] = len(self.sessions)
        m.update(self.sessions.stats)
        if self.journal is not None:
            m["journal_bytes"] = self.journal.bytes
            m["journal_path"] = self.journal.directory
        m["role"] = "primary"
        m["backed_up"] = self.backup is not None and self.journal is not None \
            and self.journal.mirror is not None
        m["backup_transport"] = self.backup_transport if m["backed_up"] else None
        return m

    def flush_within(self, timeout_s: float) -> int:
        """Flush, retrying a failing store until ``timeout_s`` has passed (checked between
        attempts: one attempt may run over by the store's own timeout); return how many
        keys are still unwritten (0: everything is stored)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.core.flush_count()
                return 0
            except FlushError:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.journal is None:  # nowhere to keep them: the shutdown fails
                        raise
                    return self.core.metrics()["pending"]
                time.sleep(min(0.25, left))

    def finish(self, disconnect: bool = False) -> dict[str, Any]:
        """The last step of a shutdown with a deadline: ``close``, or, if a store still
        refuses the buffer, stop serving anyway and keep the journal, which holds every
        unwritten write (a later ``init`` with this cache's name and journal replays it).
        The metrics say ``unwritten`` keys and the ``journal_path``. Without a journal this
        raises FlushError and keeps serving, as ``close`` does: nothing is dropped."""
        try:
            return self.close(disconnect)
        except FlushError:
            if self.journal is None:
                raise
        with self._lease_cond:
            self._closing = True
            unwritten = self.core.metrics()["pending"]
        self.core.stop()
        self.server.close()
        self.journal.close(remove=False)
        log.warning("shard %d: stopped with %d unwritten key(s); they stay in the journal %s "
                    "for the next init of this cache", self.index, unwritten,
                    self.journal.directory)
        m = self.metrics()
        m["unwritten"] = unwritten
        return m

    def close(self, disconnect: bool = False) -> dict[str, Any]:
        """Refuse writes, flush and stop serving; if a store fails, raise FlushError and
        keep serving (writes accepted again), so nothing buffered is lost. A handoff under
        way from this shard is cancelled first (a reshard cannot finish without it)."""
        with self._lease_cond:
            self._closing = True
            if self._handing is not None:
                self.cancel_handoff(self._handing["epoch"])
        try:
            metrics = self.core.close(disconnect=disconnect)
        except BaseException:
            with self._lease_cond:
                self._closing = False
            raise
        self.server.close()
        # Checkpointed, writes of no committed checkpoint are not stored by a close: they
        # stay in the journal (the next init replays them, or drops them to restore).
        state = self.core.staged_state() if self.core.staged else None
        unwritten = state["open"] + sum(state["sealed"].values()) if state else 0
        if self.journal is not None:  # else everything journaled is stored now
            self.journal.close(remove=not unwritten)
        metrics["unwritten"] = unwritten
        try:
            os.rmdir(self._dir)
        except OSError:
            pass
        m = self.metrics()
        m.update(metrics)
        return m
