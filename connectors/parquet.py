"""Parquet connector: an append-only log of flushed batches, one Parquet file per batch.

Each flush writes the batch's rows ``(key, value, seq)`` (key and value msgpack bytes, ``seq`` a
per-row increasing number) to a new file; nothing is ever rewritten. The newest row of a key
wins. At connect time the connector builds an in-memory index ``key -> (seq, file, row)`` from
the key and seq columns of every file, extends it on its own flushes, and picks up files written
by other instances (other shards) on the next read.

Where it fits: pipelines whose output is analysed with Arrow, pandas, DuckDB or Spark; append and
audit logs, where every flushed version is kept and files are immutable; large batch flushes
(high throughput, good compression).

Where it does not: hot keys updated at random (every flush adds a row per key, old versions are
never reclaimed, and the index grows with the number of distinct keys); many small flushes,
which make many small files (raise the shard's write threshold, or compact offline); reads by
key are slower than in a database, since a value is fetched from a columnar file.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import MsgpackRowsConnector

from ._fs import atomic_write, ensure_directory, missing_directory, store_directory

__all__ = ["ParquetConnector"]

_SCHEMA = pa.schema([("key", pa.binary()), ("value", pa.binary()), ("seq", pa.int64())])
_SUFFIX = ".parquet"
_TAG = re.compile(r"[^A-Za-z0-9_-]+")
_OPEN_FILES = 4  # value columns kept in memory for reads


class ParquetConnector(MsgpackRowsConnector):
    """Appends flushed batches as Parquet files under ``directory``.

    ``rows_per_file``: a larger batch is split into files of at most this many rows.
    ``compression``: Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
    ``create``: create ``directory`` at connect time if it does not exist.
    """

    def __init__(self, directory: str | os.PathLike[str], *, id: str | None = None,
                 rows_per_file: int = 1_000_000, compression: str = "zstd",
                 create: bool = True) -> None:
        if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) \
                or rows_per_file < 1:
            raise ValueError(f"rows_per_file must be an int >= 1, got {rows_per_file!r}")
        self.directory = store_directory(directory, "ParquetConnector")
        self.rows_per_file = rows_per_file
        self.compression = compression
        self.create = create
        self.id = id or f"parquet:{self.directory}"
        self._reset()

    def _reset(self) -> None:
        self._index: dict[bytes, tuple[int, str, int]] | None = None
        self._known: set[str] = set()
        self._values: OrderedDict[str, pa.Array] = OrderedDict()
        self._last_seq = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # the index is rebuilt by connect() in the shard
        state.update(_index=None, _known=set(), _values=OrderedDict())
        return state

    def __repr__(self) -> str:
        return f"ParquetConnector(directory={self.directory!r}, id={self.id!r})"

    def _missing_dir(self) -> FileNotFoundError:
        return missing_directory(self.directory, "ParquetConnector")

    def connect(self) -> None:
        """Check (or create) the directory and index the files in it."""
        if self._index is not None:
            return
        ensure_directory(self.directory, "ParquetConnector", self.create)
        self._index = {}
        self._refresh()

    def disconnect(self) -> None:
        """Drop the index and cached columns (a later call rebuilds them)."""
        self._reset()

    @property
    def files(self) -> list[str]:
        """The data files, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            raise self._missing_dir() from None
        return sorted(n for n in names if n.endswith(_SUFFIX) and not n.startswith("."))

    def _refresh(self) -> None:
        # Index files this instance has not seen yet (its own, or other shards').
        if self._index is None:
            self.connect()
        for name in self.files:
            if name not in self._known:
                table = pq.read_table(os.path.join(self.directory, name), columns=["key", "seq"])
                self._add(name, table.column("key").to_pylist(), table.column("seq").to_pylist())

    def _add(self, name: str, keys: list[bytes], seqs: list[int]) -> None:
        index = self._index
        assert index is not None
        for row, (key, seq) in enumerate(zip(keys, seqs)):
            entry = (seq, name, row)
            old = index.get(key)
            if old is None or entry > old:
                index[key] = entry
        if seqs:
            self._last_seq = max(self._last_seq, max(seqs))
        self._known.add(name)

    def _value(self, entry: tuple[int, str, int]) -> Any:
        _, name, row = entry
        column = self._values.get(name)
        if column is None:
            table = pq.read_table(os.path.join(self.directory, name), columns=["value"],
                                  memory_map=True)
            column = table.column("value").combine_chunks()
            self._values[name] = column
            if len(self._values) > _OPEN_FILES:
                self._values.popitem(last=False)
        else:
            self._values.move_to_end(name)
        return decode_value(column[row].as_py())

    def read(self, args: Any) -> Any:
        """The newest value flushed for ``args``, or None."""
        return self.read_many([args])[0]

    def read_many(self, args_list: Sequence[Any]) -> list[Any]:
        """The newest value for each of ``args_list`` (None where absent), in order."""
        self._refresh()
        index = self._index
        assert index is not None
        out = []
        for args in args_list:
            entry = index.get(encode_value(args))
            out.append(None if entry is None else self._value(entry))
        return out



    def flush(self, payloads: list[Any]) -> None:
        """Append the batch as one new file (or several of at most ``rows_per_file`` rows)."""
        if not payloads:
            return
        if self._index is None:
            self.connect()
        rows = list(dict(payloads).items())  # a later payload for a key wins
        # seq: wall-clock nanoseconds, strictly increasing per instance, so the newest row of a
        # key wins across restarts and across instances whose clocks agree.
        base = max(time.time_ns(), self._last_seq + 1)
        tag = _TAG.sub("_", self.id)[-40:]
        for start in range(0, len(rows), self.rows_per_file):
            chunk = rows[start:start + self.rows_per_file]
            seqs = list(range(base + start, base + start + len(chunk)))
            keys = [k for k, _ in chunk]
            table = pa.table([pa.array(keys, pa.binary()),
                              pa.array([v for _, v in chunk], pa.binary()),
                              pa.array(seqs, pa.int64())], schema=_SCHEMA)
            name = f"{seqs[0]:020d}-{tag}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
            self._write_file(name, table)
            self._add(name, keys, seqs)

    def _write_file(self, name: str, table: pa.Table) -> None:
        # Written under a dot-name and renamed, so other instances never index a partial file.
        atomic_write(self.directory, name,
                     lambda f: pq.write_table(table, f, compression=self.compression),
                     missing_dir=self._missing_dir)
