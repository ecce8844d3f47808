"""persistroids-dist: a Ray-sharded read/write-through cache with write-behind buffering.

    import persistroids_dist as pd
    cache = pd.init([SQLiteConnector("data.db")], init_fn=lambda args: 0)
    cache.update("visits", lambda v: v + 1)
    cache.shutdown()
"""

from .api import connect, ensure_ray, init
from .checkpoints import CheckpointInfo
from .client import Cache
from .connector import BaseConnector, Connector
from .data import CacheLookup, CacheWrite, ColumnNotFoundError, enrich, write_back
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
