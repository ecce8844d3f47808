"""persistroids-dist: a Ray-sharded read/write-through cache with write-behind buffering.

    import persistroids_dist as pd
    cache = pd.init([SQLiteConnector("data.db")], init_fn=lambda args: 0)
    cache.update("visits", lambda v: v + 1)
    cache.shutdown()
"""

from typing import TYPE_CHECKING

from .checkpoints import CheckpointInfo
from .connector import BaseConnector, Connector
from .errors import (
    AuthenticationError,
    BackpressureError,
    CacheClosedError,
    CacheNotFoundError,
    FlushError,
    LeaseLostError,
    MovedError,
    PersistroidsError,
    PicklingRefusedError,
    RemoteError,
    ShardUnavailableError,
    ShutdownError,
    StoreDataError,
    StoreUnavailableError,
    UnacknowledgedWritesError,
    WriteError,
)
from .tls import TLSConfig

if TYPE_CHECKING:
    from .api import connect, ensure_ray, init
    from .client import Cache
    from .data import CacheLookup, CacheWrite, ColumnNotFoundError, enrich, write_back

# What needs Ray is imported at first use, not with the package: a process that only needs
# the codec or a connector (a shard's flush process, see flushproc) starts in ~0.1 s
# instead of the ~0.5 s that importing Ray costs.
_LAZY = {
    "connect": "api", "ensure_ray": "api", "init": "api", "Cache": "client",
    "CacheLookup": "data", "CacheWrite": "data", "ColumnNotFoundError": "data",
    "enrich": "data", "write_back": "data",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthenticationError",
    "BackpressureError",
    "BaseConnector",
    "Cache",
    "CacheClosedError",
    "CacheLookup",
    "CacheNotFoundError",
    "CacheWrite",
    "CheckpointInfo",
    "ColumnNotFoundError",
    "Connector",
    "FlushError",
    "LeaseLostError",
    "MovedError",
    "PersistroidsError",
    "PicklingRefusedError",
    "RemoteError",
    "ShardUnavailableError",
    "ShutdownError",
    "StoreDataError",
    "StoreUnavailableError",
    "TLSConfig",
    "UnacknowledgedWritesError",
    "WriteError",
    "connect",
    "enrich",
    "ensure_ray",
    "init",
    "write_back",
]
__version__ = "0.1.0"
