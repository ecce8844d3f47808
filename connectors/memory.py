"""In-memory connector: a dict inside each shard process (the seed's MemConnector)."""

from __future__ import annotations

from typing import Any

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import MsgpackRowsConnector

__all__ = ["MemoryConnector"]


class MemoryConnector(MsgpackRowsConnector):
    """Keeps flushed values in a dict owned by the shard; nothing survives the process.

    Values are stored encoded, so a caller can never mutate what the "store" holds.
    """

    process_local = True  # each shard has its own copy: see BaseConnector.process_local

    def __init__(self, id: str = "mem", initial: dict[Any, Any] | None = None) -> None:
        self.id = id
        self.state: dict[bytes, bytes] = {}
        for k, v in (initial or {}).items():
            self.state[encode_value(k)] = encode_value(v)
        self.flushed_batches = 0

    def read(self, args: Any) -> Any:
        data = self.state.get(encode_value(args))
        return None if data is None else decode_value(data)

    def read_many(self, args_list: list[Any]) -> list[Any]:
        return [None if d is None else decode_value(d)
                for d in self.read_many_encoded([encode_value(a) for a in args_list])]

    def read_many_encoded(self, keys: list[bytes]) -> list[bytes | None]:
        state = self.state
        return [state.get(k) for k in keys]



    def delete(self, args: Any) -> Any:
        return (encode_value(args), None)

    def flush(self, payloads: list[Any]) -> None:
        state = self.state
        deleted = [k for k, v in payloads if v is None]  # delete payloads: (key, None)
        state.update(payloads)
        for k in deleted:
            del state[k]
        self.flushed_batches += 1
