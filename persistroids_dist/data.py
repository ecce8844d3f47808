"""Ray Data integration: look up and write back whole batches through one shared cache.

    import ray
    import persistroids_dist as pd
    from persistroids_dist.connectors.sqlite import SQLiteConnector

    cache = pd.init([SQLiteConnector("scores.db")], num_shards=4)
    ds = ray.data.read_parquet("events/")
    ds = ds.map_batches(pd.CacheLookup(cache, key="user_id", column="score", default=0.0))
    ds = ds.map_batches(add_event_weight)          # any batch function of yours
    written = pd.write_back(ds, cache, key="user_id", value="score")

``CacheLookup`` and ``CacheWrite`` are the ``map_batches`` callables: each batch costs one
``read_many`` or one ``write_many`` (one round trip per shard, all shards in parallel), never
one call per row. ``enrich`` and ``write_back`` are the same as functions of a dataset.

Batches are taken as Ray Data hands them over: a dict of NumPy arrays (``batch_format``
``"default"`` or ``"numpy"``), a pandas DataFrame (``"pandas"``) or a pyarrow Table
(``"pyarrow"``); the result has the same format. Key and value columns are turned into plain
Python values (``ndarray.tolist()`` and the like) before they reach the cache, so the key
``np.int64(7)`` of a batch is the cache entry of the key ``7`` written from plain Python
(the codec encodes both the same way too; ``tolist`` converts a whole column in C at once).

One cache for every block: pass the ``Cache`` handle itself. It pickles as its spec, and every
Ray worker process that runs a batch opens its own connections to the shards on first use and
keeps them for the next batches (one set per process, shared by all handles of the cache).

Two ways to run the callables, both supported:

* tasks (the default, and what ``enrich`` / ``write_back`` use): pass an instance,
  ``ds.map_batches(CacheLookup(cache, key="id", column="v"))``. Ray Data may fuse it with
  the neighbouring ``map_batches`` calls into one task per block.
* an actor pool: pass the class and its arguments,
  ``ds.map_batches(CacheLookup, fn_constructor_kwargs={"cache": cache, "key": "id",
  "column": "v"}, concurrency=2)``. Each actor makes one instance and keeps it.

Nothing here imports NumPy, pandas or pyarrow until a batch arrives, so ``import
persistroids_dist`` stays as light as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .client import Cache, _check_ttl

if TYPE_CHECKING:
    import numpy as np
    import pandas
    import pyarrow
    from ray.data import Dataset

    #: A Ray Data batch: a dict of NumPy arrays, a pandas DataFrame or a pyarrow Table.
    Batch = dict[str, np.ndarray] | pandas.DataFrame | pyarrow.Table
else:
    Batch = Any

__all__ = ["CacheLookup", "CacheWrite", "ColumnNotFoundError", "enrich", "write_back"]

#: Name of the one column of the batches ``CacheWrite(..., output="count")`` returns.
WRITTEN = "written"


class ColumnNotFoundError(KeyError):
    """A batch has no column of the name a ``CacheLookup`` or ``CacheWrite`` was given.

    A KeyError (as pandas raises for a missing column) whose message names the column, what it
    was for, and the columns the batch has."""

    def __str__(self) -> str:  # KeyError would show the repr of the message, quotes and all
        return str(self.args[0]) if self.args else ""


# -- batches of every format --------------------------------------------------------------------
def _kind(batch: Any) -> str:
    """``"numpy"``, ``"pandas"`` or ``"pyarrow"``: which of Ray Data's batch formats ``batch``
    is. pandas and pyarrow are only looked up if loaded: a batch of theirs means they are."""
    if isinstance(batch, Mapping):
        return "numpy"
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(batch, pandas.DataFrame):
        return "pandas"
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(batch, pa.Table):
        return "pyarrow"
    raise TypeError(f"expected a Ray Data batch (a dict of NumPy arrays, a pandas DataFrame or "
                    f"a pyarrow Table), got {type(batch).__module__}.{type(batch).__qualname__}")


def _names(batch: Any, kind: str) -> list[str]:
    if kind == "pyarrow":
        return list(batch.column_names)
    return [str(c) for c in (batch.keys() if kind == "numpy" else batch.columns)]


def _column(batch: Any, kind: str, name: str, who: str, role: str) -> list[Any]:
    """Column ``name`` of ``batch`` as a list of plain Python values (NumPy scalars become
    int, float, bool, str, bytes; a row of a tensor column becomes a list)."""
    try:
        col = batch[name] if kind != "pyarrow" else batch.column(name)
    except KeyError:
        raise ColumnNotFoundError(
            f"{who}: the batch has no column {name!r} (given as {role}); its columns are "
            f"{_names(batch, kind)}") from None
    if kind == "pyarrow":
        return col.to_pylist()
    values = col.tolist() if hasattr(col, "tolist") else list(col)
    if getattr(getattr(col, "dtype", None), "kind", None) == "O":
        # An object column (strings, structs, ragged lists) holds Python objects already,
        # except that a row of a list column may itself be an array.
        ndarray = sys.modules["numpy"].ndarray
        values = [v.tolist() if isinstance(v, ndarray) else v for v in values]
    return values


def _keys(batch: Any, kind: str, key: str | tuple[str, ...],
          key_fn: Callable[[Any], Any] | None, who: str) -> list[Any]:
    """The cache key of every row: the key column's values, or tuples of the key columns'
    values, passed through ``key_fn`` if given."""
    if isinstance(key, str):
        keys = _column(batch, kind, key, who, "key")
    else:
        keys = list(zip(*(_column(batch, kind, k, who, "key") for k in key)))
    if key_fn is not None:
        keys = [key_fn(k) for k in keys]
    return keys


def _numpy_column(values: list[Any]) -> Any:
    """A NumPy array for a new column: typed when every value has the same plain type (int,
    float, bool, str), else an object array holding the values as they are (None, dicts and
    lists of any length included), which Ray Data turns into the matching Arrow column."""
    np = sys.modules.get("numpy") or __import__("numpy")
    kinds = set(map(type, values))
    if len(kinds) == 1 and kinds <= {int, float, bool, str}:
        try:
            return np.array(values)
        except OverflowError:  # an int beyond int64 and uint64: kept as an object
            pass
    return np.fromiter(values, dtype=object, count=len(values))


def _with_columns(batch: Any, kind: str, new: dict[str, list[Any]], who: str) -> Any:
    """``batch`` with the columns of ``new`` added (or replaced), in ``batch``'s format."""
    if kind == "numpy":
        out = dict(batch)  # a new dict: Ray Data may hand the same dict to others (zero-copy)
        for name, values in new.items():
            out[name] = _numpy_column(values)
        return out
    if kind == "pandas":
        out = batch.copy(deep=False)  # columns added to a shallow copy, the input is untouched
        for name, values in new.items():
            out[name] = _numpy_column(values)
        return out
    pa = sys.modules["pyarrow"]
    for name, values in new.items():
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # unlike NumPy, no object column
            raise TypeError(f"{who}: column {name!r}: the values do not make one Arrow column "
                            f"({e}); give a default of the values' type, or use "
                            "batch_format='numpy' (object columns)") from e
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, name, arr) if i >= 0 else batch.append_column(name, arr)
    return batch


def _check_key(key: Any, who: str) -> str | tuple[str, ...]:
    if isinstance(key, str):
        return key
    if isinstance(key, Sequence) and key and all(isinstance(k, str) for k in key):
        return tuple(key)
    raise TypeError(f"{who}: key must be a column name or a non-empty sequence of column names "
                    f"(a tuple key), got {key!r}")


def _check_callable(fn: Any, what: str, who: str) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{who}: {what} must be callable or None, got {type(fn).__qualname__}")


def _check_cache(cache: Any, who: str) -> None:
    if not isinstance(cache, Cache):
        raise TypeError(f"{who}: cache must be a persistroids_dist.Cache handle (it pickles, so "
                        f"pass the handle itself), got {type(cache).__qualname__}")


# -- lookups ------------------------------------------------------------------------------------
class CacheLookup:
    """A ``map_batches`` callable that adds columns read from the cache by key.

    Per batch it makes one ``cache.read_many`` of the batch's keys and returns the batch (same
    format) with the new columns; the key columns and the other columns are kept.

    ``key``: the key column, or a sequence of columns whose values form a tuple key.
    ``key_fn``: applied to each row's key (a value, or the tuple) to give the cache key, e.g.
    ``lambda uid: ("user", uid)``.
    Exactly one of:

    * ``column``: the name of the new column holding each key's value; ``default`` replaces a
      None answer.
    * ``columns``: ``{name: default}``. The values are dicts (records), and column ``name``
      holds each value's ``name`` field, ``default`` where the field is absent or the key has
      no value. A value that is neither a dict nor None raises TypeError.

    Absent keys: ``read_many`` answers ``init_fn(key)`` for a key that neither the cache nor a
    store has, or None when the cache has no ``init_fn``; only a None answer takes the default.
    (Use ``init_fn`` as the default for every consumer of the cache, ``default`` for this one.)
    A new column of an existing name replaces that column; the key columns cannot be replaced.

    A key column missing from the batch raises ColumnNotFoundError (a KeyError) naming it; a
    key the cache cannot encode raises TypeError naming the key column.
    """

    def __init__(self, cache: Cache, key: str | Sequence[str], *, column: str | None = None,
                 columns: Mapping[str, Any] | None = None, default: Any = None,
                 key_fn: Callable[[Any], Any] | None = None) -> None:
        who = type(self).__name__
        _check_cache(cache, who)
        self.key = _check_key(key, who)
        _check_callable(key_fn, "key_fn", who)
        if (column is None) == (columns is None):
            raise TypeError(f"{who}: give exactly one of column= (the whole value) and "
                            "columns= ({name: default}: fields of dict values)")
        if column is not None and not isinstance(column, str):
            raise TypeError(f"{who}: column must be a column name, got {column!r}")
        if columns is not None:
            if not isinstance(columns, Mapping) or not columns or not all(
                    isinstance(c, str) for c in columns):
                raise TypeError(f"{who}: columns must be a non-empty {{name: default}} dict "
                                f"with str names, got {columns!r}")
            if default is not None:
                raise TypeError(f"{who}: with columns=, give each column's default in the "
                                "dict, not default=")
        out = [column] if column is not None else list(columns or ())
        keys = {self.key} if isinstance(self.key, str) else set(self.key)
        clash = sorted(keys.intersection(out))
        if clash:
            raise ValueError(f"{who}: the new column(s) {clash} would replace the key column(s)")
        self.cache = cache
        self.column = column
        self.columns = dict(columns) if columns is not None else None
        self.default = default
        self.key_fn = key_fn

    def __call__(self, batch: Batch) -> Batch:
        kind = _kind(batch)
        who = type(self).__name__
        keys = _keys(batch, kind, self.key, self.key_fn, who)
        try:
            values = self.cache.read_many(keys) if keys else []
        except TypeError as e:  # a key the codec refuses: say which column it came from
            raise TypeError(f"{who}: key column(s) {self.key!r}: {e}") from e
        if self.column is not None:
            default = self.default
            if default is not None:
                values = [default if v is None else v for v in values]
            return _with_columns(batch, kind, {self.column: values}, who)
        assert self.columns is not None
        new: dict[str, list[Any]] = {name: [] for name in self.columns}
        fields = list(self.columns.items())
        for k, v in zip(keys, values):
            if v is None:
                v = {}
            elif not isinstance(v, dict):
                raise TypeError(f"{who}: columns= takes fields of dict values, but the value "
                                f"of key {k!r} is a {type(v).__qualname__}; use column= for "
                                "the whole value")
            for name, default in fields:
                new[name].append(v.get(name, default))
        return _with_columns(batch, kind, new, who)

    def __repr__(self) -> str:
        what = f"column={self.column!r}" if self.column is not None else \
            f"columns={list(self.columns or ())!r}"
        return f"CacheLookup({self.cache.name!r}, key={self.key!r}, {what})"


# -- writes -------------------------------------------------------------------------------------
class CacheWrite:
    """A ``map_batches`` callable that writes a value per row to the cache, by key.

    Per batch it makes one ``cache.write_many``, which returns once every shard has applied
    its part (other processes read the values from then on; the stores get them at the
    shards' next flush: ``cache.flush_now()`` or ``shutdown()`` forces it). Then it returns the
    batch unchanged (``output="batch"``, the default), so the pipeline goes on, or a one-row
    batch ``{"written": [n]}`` (``output="count"``), which ``write_back`` sums.

    ``key`` / ``key_fn``: as for ``CacheLookup``. Exactly one of:

    * ``value``: a column name (each row's value of that column); a sequence of column names
      (a dict ``{column: value}`` per row, the record that ``CacheLookup(columns=...)`` reads
      back); or a function of the row (a dict of column name to plain Python value) returning
      the value to write.
    * ``values``: a function of the whole batch (in its own format) returning one value per
      row, e.g. a vectorised NumPy computation.

    ``ttl_s``: the entries' time to live, as for ``cache.write``.

    A column missing from the batch raises ColumnNotFoundError naming it; a key or value the
    cache cannot encode raises TypeError (nothing of that batch is written). If a store's
    connector refuses some writes, ``write_many`` raises WriteError after applying the rest.
    """

    def __init__(self, cache: Cache, key: str | Sequence[str], *,
                 value: str | Sequence[str] | Callable[[dict[str, Any]], Any] | None = None,
                 values: Callable[[Batch], Iterable[Any]] | None = None,
                 key_fn: Callable[[Any], Any] | None = None, ttl_s: float | None = None,
                 output: Literal["batch", "count"] = "batch") -> None:
        who = type(self).__name__
        _check_cache(cache, who)
        self.key = _check_key(key, who)
        _check_callable(key_fn, "key_fn", who)
        _check_callable(values, "values", who)
        if (value is None) == (values is None):
            raise TypeError(f"{who}: give exactly one of value= (a column, columns, or a "
                            "function of the row) and values= (a function of the batch)")
        if value is not None and not isinstance(value, str) and not callable(value):
            if not (isinstance(value, Sequence) and value
                    and all(isinstance(c, str) for c in value)):
                raise TypeError(f"{who}: value must be a column name, a non-empty sequence of "
                                f"column names or a function of the row, got {value!r}")
            value = tuple(value)
        if output not in ("batch", "count"):
            raise ValueError(f"{who}: output must be 'batch' or 'count', got {output!r}")
        if ttl_s is not None:
            _check_ttl(ttl_s, f"{who}: ")
        self.cache = cache
        self.value = value
        self.values = values
        self.key_fn = key_fn
        self.ttl_s = ttl_s
        self.output = output

    def _values(self, batch: Any, kind: str, n: int) -> list[Any]:
        who = type(self).__name__
        value = self.value
        if isinstance(value, str):
            return _column(batch, kind, value, who, "value")
        if isinstance(value, tuple):
            cols = [_column(batch, kind, c, who, "value") for c in value]
            return [dict(zip(value, row)) for row in zip(*cols)]
        if value is not None:  # a function of the row: rows as dicts of plain values
            names = _names(batch, kind)
            cols = [_column(batch, kind, c, who, "a column of the row") for c in names]
            return [value(dict(zip(names, row))) for row in zip(*cols)]
        assert self.values is not None
        out = self.values(batch)
        out = out.tolist() if hasattr(out, "tolist") else list(out)
        if len(out) != n:
            raise ValueError(f"{who}: values= returned {len(out)} values for a batch of {n} rows")
        return out

    def __call__(self, batch: Batch) -> Batch:
        kind = _kind(batch)
        who = type(self).__name__
        keys = _keys(batch, kind, self.key, self.key_fn, who)
        n = len(keys)
        written = 0
        if n:
            values = self._values(batch, kind, n)
            try:
                written = self.cache.write_many(zip(keys, values), ttl_s=self.ttl_s)
            except TypeError as e:  # the codec names the key or value it refused
                raise TypeError(f"{who}: key {self.key!r}, value {self._what()}: {e}") from e
        if self.output == "count":
            np = sys.modules.get("numpy") or __import__("numpy")
            return {WRITTEN: np.array([written], dtype=np.int64)}
        return batch

    def _what(self) -> str:
        if self.values is not None:
            return "values=" + getattr(self.values, "__qualname__", repr(self.values))
        if callable(self.value):
            return "value=" + getattr(self.value, "__qualname__", repr(self.value))
        return repr(self.value)

    def __repr__(self) -> str:
        return f"CacheWrite({self.cache.name!r}, key={self.key!r}, value={self._what()})"


# -- dataset functions --------------------------------------------------------------------------
def enrich(dataset: Dataset, cache: Cache, key: str | Sequence[str], *,
           column: str | None = None, columns: Mapping[str, Any] | None = None,
           default: Any = None, key_fn: Callable[[Any], Any] | None = None,
           **map_batches_kwargs: Any) -> Dataset:
    """``dataset`` with columns read from ``cache`` by key: ``dataset.map_batches(
    CacheLookup(cache, key, ...), **map_batches_kwargs)`` (lazy, like every ``map_batches``).

    The arguments are ``CacheLookup``'s; ``map_batches_kwargs`` go to ``map_batches``
    (``batch_size``, ``batch_format``, ``num_cpus``, ...). Runs as tasks."""
    fn = CacheLookup(cache, key, column=column, columns=columns, default=default, key_fn=key_fn)
    return dataset.map_batches(fn, **map_batches_kwargs)


def write_back(dataset: Dataset, cache: Cache, key: str | Sequence[str], *,
               value: str | Sequence[str] | Callable[[dict[str, Any]], Any] | None = None,
               values: Callable[[Batch], Iterable[Any]] | None = None,
               key_fn: Callable[[Any], Any] | None = None, ttl_s: float | None = None,
               **map_batches_kwargs: Any) -> int:
    """Write a value per row of ``dataset`` to ``cache`` and return how many were written.

    Unlike ``enrich`` this runs the dataset now, as Ray Data's ``write_*`` methods do; when
    it returns, every value is in the cache (the stores get them at the next flush). The
    arguments are ``CacheWrite``'s; ``map_batches_kwargs`` go to ``map_batches``. To write
    and go on with the rows, use ``dataset.map_batches(CacheWrite(...))`` instead."""
    fn = CacheWrite(cache, key, value=value, values=values, key_fn=key_fn, ttl_s=ttl_s,
                    output="count")
    counts = dataset.map_batches(fn, **map_batches_kwargs)
    # One row per batch: summed here rather than by Dataset.sum, whose aggregation adds a
    # shuffle stage that costs seconds on a small cluster.
    return sum(int(b[WRITTEN].sum()) for b in counts.iter_batches(batch_size=None,
                                                                     batch_format="numpy"))
