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
    "CacheNotFoundError",
    "CheckpointInfo",
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
    "ensure_ray",
    "init",
]
__version__ = "0.1.0"
