"""Ray Data through the cache (persistroids_dist.data): lookups and write-backs inside
``map_batches``, in NumPy, pandas and pyarrow batches, over several blocks, against a model
computed in plain Python, in the cache and in a real SQLite store."""

from __future__ import annotations

import numpy as np
import pandas
import pyarrow as pa
import pytest
import ray.data as ray_data  # ray[data], in the test extra: a missing one fails, never skips
from sqlite_rows import stored

import persistroids_dist as pd
from persistroids_dist.codec import encode_key
from persistroids_dist.connectors.sqlite import SQLiteConnector

N = 10_000
BLOCKS = 8
# Ray Data tasks take 1 CPU each by default, and the test session has 2 (tests/conftest.py;
# the shards take none). Half a CPU lets 4 blocks run at once without waiting for CPUs some
# other Ray work of the session might hold, and no more: each runs in a worker process.
TASK_CPUS = 0.5


@pytest.fixture(autouse=True)
def quiet_ray_data(ray_session):
    ctx = ray_data.DataContext.get_current()
    was = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield
    ctx.enable_progress_bars = was


def add_new(batch):
    """The pipeline's compute step: new = old + 3 * id (old is -1 where the key had no value)."""
    batch = dict(batch)
    batch["new"] = batch["old"] + 3 * batch["id"]
    return batch


def test_numpy_batches_enrich_and_write_back_match_a_model_in_cache_and_store(
        make_cache, tmp_path):
    db = tmp_path / "numpy.db"
    cache = make_cache([SQLiteConnector(db)], num_shards=2, millis_threshold=60_000)
    # Even ids have a value written from plain Python ints; odd ids have none.
    before = {i: i * 10 for i in range(0, N, 2)}
    cache.write_many(before.items())
    model = {i: before.get(i, -1) + 3 * i for i in range(N)}

    ds = ray_data.range(N, override_num_blocks=BLOCKS)
    ds = ds.map_batches(pd.CacheLookup(cache, key="id", column="old", default=-1),
                        num_cpus=TASK_CPUS)
    ds = ds.map_batches(add_new, num_cpus=TASK_CPUS)
    ds = ds.map_batches(pd.CacheWrite(cache, key="id", value="new"), num_cpus=TASK_CPUS)
    rows = ds.take_all()  # runs the pipeline once: lookup, compute, write back

    assert len(rows) == N
    assert {r["id"]: r["old"] for r in rows} == {i: before.get(i, -1) for i in range(N)}
    assert {r["id"]: r["new"] for r in rows} == model
    assert cache.read_many(range(N)) == [model[i] for i in range(N)]
    cache.flush_now()
    assert stored(db) == model


def test_pandas_batches_write_records_and_read_their_fields_back(make_cache, tmp_path):
    db = tmp_path / "pandas.db"
    cache = make_cache([SQLiteConnector(db)], num_shards=2, millis_threshold=60_000)
    items = [{"id": i, "name": f"user-{i}", "score": i / 4} for i in range(N)]
    ds = ray_data.from_items(items, override_num_blocks=BLOCKS)

    # Records {"name", "score"} for ids divisible by 3 only, with the write_back function.
    thirds = ds.map_batches(lambda df: df[df["id"].to_numpy() % 3 == 0], batch_format="pandas",
                            num_cpus=TASK_CPUS)
    written = pd.write_back(thirds, cache, key="id", value=["name", "score"],
                            batch_format="pandas", num_cpus=TASK_CPUS)
    model = {i: {"name": f"user-{i}", "score": i / 4} for i in range(0, N, 3)}
    assert written == len(model)

    enriched = pd.enrich(ds, cache, key="id", columns={"name": "?", "score": -1.0},
                         batch_format="pandas", num_cpus=TASK_CPUS)
    out = enriched.to_pandas()
    assert len(out) == N
    got = dict(zip(out["id"].tolist(), zip(out["name"].tolist(), out["score"].tolist())))
    want = {i: (model[i]["name"], model[i]["score"]) if i in model else ("?", -1.0)
            for i in range(N)}
    assert got == want
    cache.flush_now()
    assert stored(db) == model


def test_numpy_scalar_keys_are_the_entries_of_the_same_plain_keys(make_cache):
    cache = make_cache(num_shards=2)
    assert encode_key(np.int64(7)) == encode_key(7)
    assert encode_key(("user", np.int32(7))) == encode_key(("user", 7))
    # Written from plain Python, read by a batch of NumPy keys of several dtypes.
    cache.write_many([(i, f"plain-{i}") for i in range(20)])
    cache.write_many([(("user", i), i * 2) for i in range(20)])
    cache.write(0.5, "half", wait=True)
    lookup = pd.CacheLookup(cache, key="id", column="v")
    for dtype in (np.int64, np.int32, np.uint8):
        batch = {"id": np.arange(20, dtype=dtype)}
        assert lookup(batch)["v"].tolist() == [f"plain-{i}" for i in range(20)]
    assert pd.CacheLookup(cache, key="f", column="v")(
        {"f": np.array([0.5], dtype=np.float32)})["v"].tolist() == ["half"]
    tuple_lookup = pd.CacheLookup(cache, key=("kind", "id"), column="v")
    batch = {"kind": np.array(["user"] * 20, dtype=object), "id": np.arange(20)}
    assert tuple_lookup(batch)["v"].tolist() == [i * 2 for i in range(20)]
    by_key_fn = pd.CacheLookup(cache, key="id", column="v", key_fn=lambda i: ("user", i))
    assert by_key_fn({"id": np.arange(20)})["v"].tolist() == [i * 2 for i in range(20)]
    # And the other way: written from Ray Data batches (int64 columns), read by plain ints.
    ds = ray_data.range(100, override_num_blocks=4)
    assert pd.write_back(ds, cache, key="id", values=lambda b: b["id"] * 7,
                         num_cpus=TASK_CPUS) == 100
    assert cache.read_many(list(range(100))) == [i * 7 for i in range(100)]


def test_pyarrow_batches_and_a_function_of_the_row(make_cache):
    cache = make_cache(num_shards=2, init_fn=lambda key: {"twice": -1})
    ds = ray_data.range(1000, override_num_blocks=4)
    # A function of the row: rows arrive as dicts of plain values.
    assert pd.write_back(ds, cache, key="id", value=lambda row: {"twice": row["id"] * 2},
                         batch_format="pyarrow", num_cpus=TASK_CPUS) == 1000
    # init_fn answers for keys nobody wrote (1000..1099): the default is not used for them.
    more = ray_data.range(1100, override_num_blocks=4)
    out = more.map_batches(pd.CacheLookup(cache, key="id", column="v", default="unused"),
                           batch_format="pyarrow", num_cpus=TASK_CPUS).take_all()
    got = {r["id"]: r["v"] for r in out}
    assert got == {i: {"twice": i * 2 if i < 1000 else -1} for i in range(1100)}
    # Values of several types make no Arrow column: the error says which column and what to do.
    cache.write(5, "five", wait=True)
    with pytest.raises(TypeError, match="column 'v': the values do not make one Arrow column"):
        pd.CacheLookup(cache, key="id", column="v")(pa.table({"id": [4, 5]}))
    # A NumPy batch takes them as an object column.
    assert pd.CacheLookup(cache, key="id", column="v")(
        {"id": np.array([4, 5])})["v"].tolist() == [{"twice": 8}, "five"]


def test_an_actor_pool_shares_the_cache_like_tasks(make_cache):
    cache = make_cache(num_shards=2)
    cache.write_many((i, -i) for i in range(500))
    ds = ray_data.range(500, override_num_blocks=4).map_batches(
        pd.CacheLookup, fn_constructor_kwargs={"cache": cache, "key": "id", "column": "neg"},
        concurrency=1, num_cpus=TASK_CPUS)
    assert sorted((r["id"], r["neg"]) for r in ds.take_all()) == [(i, -i) for i in range(500)]


def test_a_missing_column_is_named_in_the_error(make_cache):
    cache = make_cache(num_shards=2)
    batch = {"id": np.arange(3), "x": np.zeros(3)}
    with pytest.raises(pd.ColumnNotFoundError) as info:
        pd.CacheLookup(cache, key="user_id", column="v")(batch)
    assert str(info.value) == ("CacheLookup: the batch has no column 'user_id' (given as key); "
                               "its columns are ['id', 'x']")
    with pytest.raises(KeyError, match="no column 'scroe' .given as value"):
        pd.CacheWrite(cache, key="id", value="scroe")(pandas.DataFrame(batch))
    with pytest.raises(KeyError, match="no column 'nope'"):
        pd.CacheWrite(cache, key="id", value=["x", "nope"])(pa.table(batch))
    assert cache.read_many([0, 1, 2]) == [None, None, None]  # nothing written
    # Through Ray Data the error comes back in Ray's exception, with the same message.
    ds = ray_data.range(10, override_num_blocks=2)
    with pytest.raises(Exception, match="no column 'user_id' .given as key.; its columns are "
                                        r"\['id'\]"):
        pd.enrich(ds, cache, key="user_id", column="v", num_cpus=TASK_CPUS).take_all()


def test_bad_arguments_and_values_are_refused_with_the_reason(make_cache):
    cache = make_cache(num_shards=2)
    with pytest.raises(TypeError, match="exactly one of column= .* and columns="):
        pd.CacheLookup(cache, key="id")
    with pytest.raises(ValueError, match=r"new column\(s\) \['id'\] would replace the key column"):
        pd.CacheLookup(cache, key="id", column="id")
    with pytest.raises(TypeError, match="exactly one of value= .* and values="):
        pd.CacheWrite(cache, key="id")
    with pytest.raises(TypeError, match="cache must be a persistroids_dist.Cache"):
        pd.CacheLookup(lambda: cache, key="id", column="v")
    with pytest.raises(ValueError, match="values= returned 2 values for a batch of 3 rows"):
        pd.CacheWrite(cache, key="id", values=lambda b: [1, 2])({"id": np.arange(3)})
    cache.write(1, "not a dict", wait=True)
    with pytest.raises(TypeError, match="the value of key 1 is a str; use column="):
        pd.CacheLookup(cache, key="id", columns={"a": None})({"id": np.arange(3)})
    with pytest.raises(TypeError, match=r"key column\(s\) 'z'.*invalid cache key"):
        pd.CacheLookup(cache, key="z", column="v")({"z": np.array([1 + 2j])})
