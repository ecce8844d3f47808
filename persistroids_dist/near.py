"""The near cache: recently read values kept in the calling process for a bounded time."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

__all__ = ["NO_VALUE", "NearCache", "local_value"]

_monotonic = time.monotonic
# Values of these types can be handed out from a local copy without decoding it again:
# the caller cannot mutate them.
_IMMUTABLE = frozenset((int, float, str, bytes, bool, type(None)))
NO_VALUE = object()


def local_value(value: Any) -> Any:
    """What a local copy keeps besides the bytes: the value if it is immutable."""
    return value if type(value) in _IMMUTABLE else NO_VALUE


class NearCache:
    """A process-local copy of recently read values, shared by every near handle of one cache
    in the process; each handle trusts an entry for its own ``lease_ms``.

    Each entry keeps when the request that produced it was sent (``since``), not an expiry:
    two handles with different ``lease_ms`` then read the same, newest entries, so a write
    through one is read back through the other (read-your-writes across handles).

    Guarantees: read-your-writes (this process's writes update it) and bounded staleness (a
    value another process wrote is seen at most ``lease_ms`` after it was applied).
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"near cache needs max_entries >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, tuple[bytes, float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, kb: bytes, ttl: float) -> tuple[bytes, float, Any] | None:
        """The entry of ``kb`` if it is younger than ``ttl`` seconds, else None."""
        hit = self.entries.get(kb)
        if hit is not None and hit[1] + ttl > _monotonic():
            self.hits += 1
            return hit
        self.misses += 1
        return None

    def put(self, kb: bytes, vb: bytes, value: Any = NO_VALUE,
            since: float | None = None) -> None:
        """Keep ``vb`` as of ``since``: when the request that produced it was sent (a slow
        answer must not stretch the staleness bound). An entry from a later request is kept
        (a slow read must not hide this process's newer write)."""
        entries = self.entries
        since = _monotonic() if since is None else since
        old = entries.get(kb)
        if old is not None and old[1] > since:
            return
        entries[kb] = (vb, since, local_value(value))
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def forget(self, kbs: Iterable[bytes] | None = None) -> None:
        """Drop ``kbs`` (all entries if None): their cached values may be wrong."""
        if kbs is None:
            self.entries.clear()
        else:
            for kb in kbs:
                self.entries.pop(kb, None)
