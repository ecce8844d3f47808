"""The near cache: recently read values kept in the calling process for a bounded time."""

from __future__ import annotations

import time
from collections import OrderedDict
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
    """A process-local copy of recently read values, each trusted for ``lease_ms``.

    Guarantees: read-your-writes (this process's writes update it) and bounded staleness (a
    value another process wrote is seen at most ``lease_ms`` after it was applied).
    """

    def __init__(self, lease_ms: float, max_entries: int) -> None:
        if lease_ms <= 0 or max_entries < 1:
            raise ValueError("near cache needs lease_ms > 0 and max_entries >= 1")
        self.ttl = lease_ms / 1000
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, tuple[bytes, float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def put(self, kb: bytes, vb: bytes, value: Any = NO_VALUE,
            since: float | None = None) -> None:
        """Trust ``vb`` until ``lease_ms`` after ``since``: when the request that produced it
        was sent (a slow answer must not stretch the staleness bound). An entry from a
        later request is kept (a slow read must not hide this process's newer write)."""
        entries = self.entries
        expires = (_monotonic() if since is None else since) + self.ttl
        old = entries.get(kb)
        if old is not None and old[1] > expires:
            return
        entries[kb] = (vb, expires, local_value(value))
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
