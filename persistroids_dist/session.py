"""Sessions: a request resent after a reconnect is applied once, never twice.

A client connection opens a session (a random id) and numbers the requests that change the
shard's state (``protocol.SEQUENCED``) 1, 2, 3, ... implicitly: both ends count them, so the
frames do not grow. When the connection breaks (the shard process was killed, say), the
client dials the restarted shard, resumes the session with ``SESSION(id, first, next)``
(``first``: the first request whose answer never came; ``next``: the first never sent) and
sends every unanswered request again, in order. The shard keeps, per session, the last
number it applied and that request's answer, plus the errors it answered recently: a resent
request at or below that number is answered from there and not applied again.

Only the last request of a session can be a call whose answer its caller waits for (a call
first collects the answers of everything pipelined before it), so the last answer is enough,
plus the errors: a pipelined request's error must reach ``sync()`` even if its answer was
lost.

With a journal, a request's records and its number go in one journal record (``REQUEST``),
so after a crash a request is either replayed and known as applied, or absent and applied
when resent. Segments are released once flushed, so each new segment starts with the whole
table (``SESSIONS``). Without a journal the table lives in the shard's memory: a restarted
shard does not know the session, and then refuses the resent requests with
UnacknowledgedWritesError (each may or may not have been applied before the crash) rather
than risk applying one twice; the session goes on with new requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import UnacknowledgedWritesError
from .journal import REQUEST, SESSIONS, Journal
from .transport import encode_error

__all__ = ["Link", "Sessions"]

_OK_NONE = msgpack.packb([0, None])
_MAX_ERRORS = 256  # errors kept per session (a client has at most 512 requests in flight)
_MAX_SID = 64


class Session:
    """What a shard knows of one session: the last request applied, its answer frame, and
    recent error answers by number. ``lock`` serializes the session's requests (an old
    connection's thread may still be applying one when the client resumes on a new one)."""

    __slots__ = ("sid", "last", "answer", "errors", "lock")

    def __init__(self, sid: bytes, last: int = 0, answer: bytes = _OK_NONE,
                 errors: dict[int, bytes] | None = None) -> None:
        self.sid = sid
        self.last = last
        self.answer = answer
        self.errors: dict[int, bytes] = errors or {}
        self.lock = threading.Lock()

    def record(self, seq: int, answer: bytes) -> None:
        self.last = seq
        self.answer = answer
        if answer[1] == 1:  # [1, pickled error]: a pipelined caller hears of it at sync()
            self.errors[seq] = answer
            if len(self.errors) > _MAX_ERRORS:
                del self.errors[min(self.errors)]


class Link:
    """One connection's place in its session: the number its next request gets, and below
    which resent requests are refused (the shard lost what it knew of them)."""

    __slots__ = ("session", "next", "refuse_below")

    def __init__(self, session: Session, next_seq: int, refuse_below: int) -> None:
        self.session = session
        self.next = next_seq
        self.refuse_below = refuse_below


class Sessions:
    """The session table of one shard.

    ``lock`` is the shard's lock (reentrant): a request runs under it from its first journal
    record to its number's, so a flush's segment rotation (under the same lock) sees every
    request whole. The handlers a request runs must therefore make their journal appends
    after their last wait on that lock's condition (all of them do: they wait for room,
    leases or stores first, then apply).
    """

    def __init__(self, lock: Any, journal: Journal | None, shard: int,
                 max_sessions: int = 10_000) -> None:
        self._lock = lock
        self.journal = journal
        self.shard = shard
        self.max_sessions = max_sessions
        self._table: OrderedDict[bytes, Session] = OrderedDict()  # least recently used first
        self._table_lock = threading.Lock()
        self.stats = {"sessions_resumed": 0, "resends_answered": 0, "resends_refused": 0}
        # Told of each resent request answered from the table (not applied again): what it
        # carries besides its effect must still be taken in (an update's function, which
        # the client now takes this process to know).
        self.on_resent: Callable[[Any], None] | None = None

    def __len__(self) -> int:
        return len(self._table)

    def _get(self, sid: bytes, create: bool = True) -> Session | None:
        with self._table_lock:
            s = self._table.get(sid)
            if s is not None:
                self._table.move_to_end(sid)
            elif create:
                s = self._table[sid] = Session(sid)
                while len(self._table) > self.max_sessions:  # the least recently used goes
                    self._table.popitem(last=False)
            return s

    # -- the wire ---------------------------------------------------------------------------
    def open(self, sid: Any, first: Any, next_seq: Any) -> tuple[Link, int | None]:
        """A connection opens or resumes session ``sid``; the frames numbered ``first`` to
        ``next_seq - 1`` come again. Returns the link and the last number this shard applied
        for the session (None: it does not know the session)."""
        if not (isinstance(sid, bytes) and 0 < len(sid) <= _MAX_SID and type(first) is int
                and type(next_seq) is int and 1 <= first <= next_seq):
            raise ValueError(f"shard {self.shard}: malformed SESSION request "
                             f"(first={first!r}, next={next_seq!r})")
        known = self._get(sid, create=False)
        s = known or self._get(sid)
        assert s is not None
        with s.lock:
            last = s.last if known is not None else None
            refuse_below = 0
            if first < next_seq:
                self.stats["sessions_resumed"] += 1
                if (last is None and first > 1) or (last is not None and last < first - 1):
                    # Answers up to first - 1 came, yet this shard has no record of them: it
                    # restarted without a journal (or dropped the session). The resent
                    # requests cannot be told applied or not: refuse them, go on after.
                    refuse_below = next_seq
                    with self._lock:
                        s.last = max(s.last, next_seq - 1)
            for seq in [q for q in s.errors if q < first]:  # their answers arrived
                del s.errors[seq]
        return Link(s, first, refuse_below), last

    def apply(self, link: Link, answer: Callable[[Any], bytes], req: Any) -> bytes:
        """Run ``answer(req)`` (the request's answer frame, errors included) once for the
        link's next number; a number already applied is answered from the table."""
        seq = link.next
        link.next = seq + 1
        s = link.session
        if seq < link.refuse_below:
            self.stats["resends_refused"] += 1
            return msgpack.packb([1, encode_error(UnacknowledgedWritesError(
                self.shard, 1, "it was resent after a reconnect, and this shard cannot tell "
                "whether it was applied before (the shard restarted without a journal, or "
                "forgot the session); it was not applied again"))])
        with s.lock:
            if seq <= s.last:  # resent, and applied already
                self.stats["resends_answered"] += 1
                if self.on_resent is not None:
                    self.on_resent(req)
                if seq == s.last:
                    return s.answer
                return s.errors.get(seq, _OK_NONE)
            journal = self.journal
            with self._lock:
                if journal is None:
                    out = answer(req)
                    s.record(seq, out)
                    return out
                journal.begin_request()
                out = None
                try:
                    out = answer(req)
                finally:
                    # Even if ``answer`` died half-way: what it applied is journaled.
                    frame = out if out is not None else _OK_NONE
                    journal.end_request([REQUEST, s.sid, seq, frame])
                    s.record(seq, frame)
                return out

    # -- the journal ------------------------------------------------------------------------
    def snapshot(self) -> list[Any]:
        """The table as a SESSIONS record (called under the shard's lock)."""
        with self._table_lock:
            sessions = list(self._table.values())
        return [SESSIONS, [[s.sid, s.last, s.answer, [[q, e] for q, e in s.errors.items()]]
                           for s in sessions if s.last]]

    def replayed(self, record: list[Any]) -> list[Any]:
        """Restore what a REQUEST or SESSIONS record says; return the request's records
        (for the shard to replay), or [] for a table."""
        if record[0] == SESSIONS:
            for sid, last, answer, errors in record[1]:
                s = self._get(sid)
                assert s is not None
                if last >= s.last:
                    s.last, s.answer = last, answer
                    s.errors.update((q, e) for q, e in errors)
            return []
        _, sid, seq, answer, records = record
        s = self._get(sid)
        assert s is not None
        if seq > s.last:
            s.record(seq, answer)
        return records
