"""A linearizability checker for histories of a register with add (pure Python, no Ray).

A history is a list of ``Op``: a ``read -> value``, a ``write(v)`` or an ``add(d) -> new
value`` (``cache.update(k, lambda v: v + d)``) on one key, called at ``call`` and returned at
``ret`` by ``process``. The history is linearizable if every op can be given a point in time
between its call and its return such that, taken in that order, the ops are a legal sequential
run of the register starting from ``initial``.

The search is Wing & Gong's, with the memoization of Lowe (and Knossos/Porcupine): a search
state is (the set of ops linearized so far, as a bitmask; the register's value). From a state
the next op to linearize may be any op not yet linearized that was called before every other
pending op returned (otherwise that one must come first); each state is expanded at most once,
so a history of a few hundred ops with a handful of concurrent processes is checked in
milliseconds. Ops on different keys never constrain each other (linearizability is
compositional, Herlihy & Wing), so each key's sub-history is checked on its own.

Unknown outcomes: an op whose call raised a connection error, or was cut off, has ``ret =
inf``. It may have taken effect at any point after its call, or never: the search tries both
(``take`` and ``skip``), and its result, if it has one, is not checked. A read with an unknown
outcome constrains nothing and is dropped.

``Recorder`` records ops in a worker process with ``time.monotonic()`` (CLOCK_MONOTONIC, shared
by every process on one host); workers return ``recorder.ops`` and the test concatenates them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INF", "Anomaly", "Op", "Recorder", "Result", "check", "check_key", "step"]

INF = math.inf
KINDS = ("read", "write", "add")


@dataclass
class Op:
    """One operation. ``result``: the value a read returned / an add returned (the new value);
    ignored for writes. ``ret = INF``: the outcome is unknown (it may or may not have happened).
    """

    process: Any
    key: Any
    kind: str
    arg: Any = None
    result: Any = None
    call: float = 0.0
    ret: float = INF

    @property
    def unknown(self) -> bool:
        return self.ret == INF

    def describe(self, t0: float = 0.0) -> str:
        if self.kind == "read":
            what = f"read -> {self.result!r}"
        elif self.kind == "write":
            what = f"write({self.arg!r})"
        else:
            what = f"add({self.arg!r}) -> {self.result!r}"
        if self.unknown:
            what = f"{what.split(' ->')[0]} (outcome unknown)"
            end = "..."
        else:
            end = f"{(self.ret - t0) * 1000:.3f}"
        return f"p{self.process} {what} [{(self.call - t0) * 1000:.3f}, {end}] ms"


def step(value: Any, op: Op) -> tuple[bool, Any]:
    """The register-with-add model: (is ``op`` legal from ``value``, the value after it)."""
    if op.kind == "read":
        return op.unknown or op.result == value, value
    if op.kind == "write":
        return True, op.arg
    if op.kind == "add":
        new = value + op.arg
        return op.unknown or op.result == new, new
    raise ValueError(f"unknown op kind {op.kind!r}")


@dataclass
class Anomaly:
    """Why one key's sub-history is not linearizable (or could not be decided)."""

    key: Any
    total: int  # ops of this key that the search had to place (unknown reads dropped)
    linearized: int  # the most ops any linearization attempt managed to place
    value: Any  # the register's value after those
    prefix_tail: list[Op]  # the last ops of that attempt, in linearization order
    stuck: list[tuple[Op, str]]  # the ops that could come next, each with why it cannot
    must_precede: Op | None  # the pending op that returned first: nothing after it may go
    t0: float
    inconclusive: bool = False

    def explain(self) -> str:
        if self.inconclusive:
            return (f"key {self.key!r}: search gave up after its state budget "
                    f"({self.linearized}/{self.total} ops placed at best)")
        lines = [f"key {self.key!r}: not linearizable. At best {self.linearized} of "
                 f"{self.total} ops linearize, leaving the value {self.value!r}; the last of "
                 "them, in order:"]
        lines += [f"    {op.describe(self.t0)}" for op in self.prefix_tail]
        lines.append("  and no op can come next:")
        lines += [f"    {op.describe(self.t0)}: {why}" for op, why in self.stuck]
        if self.must_precede is not None:
            lines.append(f"  (every later op was called after this one returned: "
                         f"{self.must_precede.describe(self.t0)})")
        return "\n".join(lines)


@dataclass
class Result:
    ok: bool
    anomalies: list[Anomaly] = field(default_factory=list)
    keys: int = 0
    ops: int = 0
    states: int = 0  # search states expanded, all keys
    seconds: float = 0.0

    def explain(self) -> str:
        if self.ok:
            return (f"linearizable: {self.ops} ops on {self.keys} keys, {self.states} states, "
                    f"{self.seconds * 1000:.1f} ms")
        return "\n".join(a.explain() for a in self.anomalies)

    __str__ = explain


def _why(value: Any, op: Op) -> str:
    if op.kind == "read":
        return f"the value is {value!r}"
    if op.kind == "add":
        try:
            return f"it would return {value + op.arg!r}"
        except TypeError as e:
            return f"cannot add to {value!r}: {e}"
    return "?"


def check_key(ops: Iterable[Op], initial: Any = 0, *, max_states: int = 2_000_000,
              model: Callable[[Any, Op], tuple[bool, Any]] = step) -> Anomaly | None:
    """Check one key's sub-history; None if linearizable, else the Anomaly.

    ``model(value, op) -> (legal, new value)``; ops of kind "read" must never change the value
    (the search places a legal read at once). ``max_states``: give up (an inconclusive
    Anomaly) after expanding this many search states.
    """
    return _search(ops, initial, max_states, model)[0]


def _search(ops: Iterable[Op], initial: Any, max_states: int,
            model: Callable[[Any, Op], tuple[bool, Any]]) -> tuple[Anomaly | None, int]:
    """(None or the Anomaly, the number of search states expanded)."""
    ops = [o for o in ops if not (o.unknown and o.kind == "read")]
    for o in ops:
        if o.kind not in KINDS:
            raise ValueError(f"unknown op kind {o.kind!r}: {o}")
        if o.ret < o.call:
            raise ValueError(f"op returns before its call: {o}")
    ops.sort(key=lambda o: (o.call, o.ret))
    n = len(ops)
    key = ops[0].key if ops else None
    t0 = ops[0].call if ops else 0.0
    calls = [o.call for o in ops]
    rets = [o.ret for o in ops]
    unknowns = [i for i, o in enumerate(ops) if o.unknown]
    reads = [o.kind == "read" for o in ops]
    unknown_mask = sum(1 << i for i in unknowns)
    full = (1 << n) - 1

    def frontier(mask: int) -> list[int]:
        """The ops that may be linearized next: pending ops called no later than the earliest
        return of a pending op (ops of unknown outcome never return, so never block)."""
        done = mask | unknown_mask
        i = (~done & (done + 1)).bit_length() - 1  # the first pending completed op
        # Scanning in call order, an op called after the earliest return seen so far cannot
        # lower it (it returns even later): stop there.
        earliest = INF
        pending = []
        while i < n and calls[i] <= earliest:
            if not (done >> i) & 1:
                pending.append(i)
                if rets[i] < earliest:
                    earliest = rets[i]
            i += 1
        out = [i for i in pending if calls[i] <= earliest]
        out += [u for u in unknowns if not (mask >> u) & 1 and calls[u] <= earliest]
        return out

    start = (0, initial)
    # state -> (the state it came from, the ops placed on the way, in order)
    parent: dict[tuple[int, Any], tuple[Any, tuple[int, ...]] | None] = {start: None}
    stack = [start]
    best, best_count = start, 0
    expanded = 0
    while stack:
        state = stack.pop()
        mask, value = state
        if mask | unknown_mask == full:
            return None, expanded
        expanded += 1
        if expanded > max_states:
            break
        count = (mask & ~unknown_mask).bit_count()
        if count > best_count:
            best, best_count = state, count
        moves = []
        quiet: list[int] = []
        for i in frontier(mask):
            legal, new = model(value, ops[i])
            if not legal:
                continue
            if reads[i]:
                # A legal read: reads never change the state, so if any linearization places
                # it later, moving it to here gives another one (partial-order reduction).
                # Placed at once, no branching. (Not so for a write of the current value:
                # later, it could change the state.)
                quiet.append(i)
            else:
                moves.append((i, new))
        if quiet:
            moves = [(tuple(quiet), value)]
        else:
            moves = [((i,), new) for i, new in sorted(moves, key=lambda m: rets[m[0]])]
        for placed, new in reversed(moves):  # the earliest return is tried first
            nxt = (mask | sum(1 << i for i in placed), new)
            if nxt not in parent:
                parent[nxt] = (state, placed)
                stack.append(nxt)

    # Not linearizable (or out of budget): describe the deepest attempt.
    path: list[int] = []
    s: Any = best
    while parent[s] is not None:
        prev, placed = parent[s]  # type: ignore[misc]
        path[:0] = placed
        s = prev
    mask, value = best
    nxt = frontier(mask)
    stuck = [(ops[i], _why(value, ops[i])) for i in nxt if not ops[i].unknown]
    pend = [ops[i] for i in range(n) if not (mask >> i) & 1 and not ops[i].unknown]
    must = min(pend, key=lambda o: o.ret, default=None)
    return Anomaly(key=key, total=n, linearized=best_count, value=value,
                   prefix_tail=[ops[i] for i in path[-6:]], stuck=stuck, must_precede=must,
                   t0=t0, inconclusive=expanded > max_states), expanded


def check(history: Iterable[Op], initial: Any = 0, *, max_states: int = 2_000_000,
          model: Callable[[Any, Op], tuple[bool, Any]] = step) -> Result:
    """Check a multi-key history key by key. ``initial``: every key's first value, or a
    mapping key -> first value (keys it lacks start at None)."""
    started = time.perf_counter()
    by_key: dict[Any, list[Op]] = {}
    n = 0
    for op in history:
        by_key.setdefault(op.key, []).append(op)
        n += 1
    anomalies = []
    states = 0
    for key, ops in by_key.items():
        first = initial.get(key) if isinstance(initial, Mapping) else initial
        anomaly, expanded = _search(ops, first, max_states, model)
        states += expanded
        if anomaly is not None:
            anomalies.append(anomaly)
    return Result(ok=not anomalies, anomalies=anomalies, keys=len(by_key), ops=n, states=states,
                  seconds=time.perf_counter() - started)


class Recorder:
    """Records one process's ops, timed with ``time.monotonic()``.

    ``invoke`` opens an op (unknown outcome until ``complete``); ``run`` does both around a
    call. An op whose call raised stays unknown (it may have been applied before the error),
    which is never wrong, only less sharp; ``discard`` removes one known not to have happened.
    """

    def __init__(self, process: Any) -> None:
        self.process = process
        self.ops: list[Op] = []

    def invoke(self, kind: str, key: Any, arg: Any = None) -> Op:
        op = Op(self.process, key, kind, arg, None, time.monotonic(), INF)
        self.ops.append(op)
        return op

    @staticmethod
    def complete(op: Op, result: Any = None, at: float | None = None) -> Op:
        op.ret = time.monotonic() if at is None else at
        op.result = result
        return op

    def run(self, kind: str, key: Any, arg: Any, fn: Callable[[], Any]) -> Any:
        op = self.invoke(kind, key, arg)
        result = fn()  # if this raises, the op stays unknown
        self.complete(op, result if kind != "write" else None)
        return result

    def discard(self, op: Op) -> None:
        self.ops.remove(op)
