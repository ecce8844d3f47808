"""Writers that keep a cache busy while a test does something to it (a reshard, a lost
node), and what the cache acknowledged to them, to compare with afterwards.

Four threads: unique keys written with ``wait=True`` (``acked``), batches of pipelined writes
confirmed by ``sync()`` (``batches``), counters bumped by ``update`` (``counts``), and one key
overwritten by pipelined writes, which must end with the last (in ``batches``). Any error is
recorded (``errors``): the tests expect none.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import traceback
from typing import Any

BUMP = functools.partial(operator.add, 1)


class Writers:
    """``with Writers(cache, tag):`` runs the threads until the block ends. Keys carry
    ``tag``: ``<tag>u<i>``, ``<tag>p<batch>.<j>``, counters ``<tag>c<0..counters-1>``."""

    def __init__(self, cache: Any, tag: str = "", counters: int = 3, batch: int = 50) -> None:
        self.cache, self.tag, self.batch = cache, tag, batch
        self.stop = threading.Event()
        self.acked: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.counts = [0] * counters
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=f) for f in
                        (self._unique, self._pipelined, self._counters, self._overwrite)]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def counter_names(self) -> list[str]:
        return [f"{self.tag}c{c}" for c in range(len(self.counts))]

    def _guard(self, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # every error is a finding: with where it was raised
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.errors.append(f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}"
                               f":{where.lineno} in {where.name})"[:1500])
            return False

    def _unique(self) -> None:
        i = 0
        while not self.stop.is_set():
            k = f"{self.tag}u{i}"
            if self._guard(functools.partial(self.cache.write, k, i, wait=True)):
                self.acked[k] = i
            i += 1

    def _pipelined(self) -> None:
        b = 0
        while not self.stop.is_set():
            batch = {f"{self.tag}p{b}.{j}": b for j in range(self.batch)}
            for k, v in batch.items():
                self.cache.write(k, v)
            if self._guard(self.cache.sync):
                self.batches.update(batch)
            b += 1

    def _counters(self) -> None:
        i = 0
        while not self.stop.is_set():
            c = i % len(self.counts)
            if self._guard(self.cache.update, f"{self.tag}c{c}", BUMP):
                self.counts[c] += 1
            i += 1


    def _overwrite(self) -> None:
        # One key written over and over, pipelined: if a write could land after a later one
        # of this process (reordered by a reshard's resends, say), the key would not end
        # with the last value. ``batches`` gets the last value a sync confirmed.
        k, i = f"{self.tag}o", 0
        while not self.stop.is_set():
            i += 1
            self.cache.write(k, i)
            if i % 100 == 0 and self._guard(self.cache.sync):
                self.batches[k] = i
        if self._guard(self.cache.sync):
            self.batches[k] = i


def lost(cache: Any, expected: dict[str, Any]) -> list[str]:
    """The keys of ``expected`` whose value in ``cache`` is not the expected one."""
    keys = sorted(expected)
    values = cache.read_many(keys) if keys else []
    return [k for k, v in zip(keys, values, strict=True) if v != expected[k]]
