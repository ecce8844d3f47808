"""``Metrics``, what ``cache.metrics()`` returns: still the documented dict (equal to it,
pickled, msgpack-encoded and stored in the cache as it), plus the HTML and DataFrame views
the notebooks use. The handle runs against an in-process shard host (no Ray)."""

from __future__ import annotations

import json
import pickle
import sys
import uuid

import msgpack
import pytest

from persistroids_dist.client import Cache, aggregate
from persistroids_dist.codec import _reference_packb, decode_value, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.metrics_view import Metrics

SECRET = b"m" * 32

SHARDS = [
    {"shard": 0, "pid": 11, "node_id": "a" * 56, "lookup": 4, "hits": 3, "misses": 1,
     "write": 2, "pending": 1, "last_errors": {}, "role": "primary", "tcp": ["10.0.0.1", 7]},
    {"shard": 1, "pid": 12, "node_id": "b" * 56, "lookup": 0, "hits": 0, "misses": 0,
     "write": 5, "pending": 0, "last_errors": {"sqlite": "<locked> & gone"},
     "role": "primary", "tcp": None},
]


@pytest.fixture
def host():
    h = ShardHost(0, [MemoryConnector()], {"init_fn": lambda a: 0}, SECRET)
    yield h
    h.close()


def handle(host: ShardHost) -> Cache:
    spec = {"name": f"metrics-{uuid.uuid4().hex}", "secret": SECRET, "num_shards": 1,
            "addresses": [host.address()], "shards": [None], "cache_key": None}
    return Cache(spec)


def test_metrics_of_a_cache_are_the_documented_dict(host):
    cache = handle(host)
    cache.write("a", 1, wait=True)
    cache.read("a")
    cache.read("b")  # a miss: no store has it, init_fn's 0
    m = cache.metrics()
    assert type(m) is Metrics and isinstance(m, dict)
    assert set(m) == {"total", "shards"}
    assert type(m["total"]) is dict and type(m["shards"]) is list
    assert (m["total"]["lookup"], m["total"]["hits"], m["total"]["misses"]) == (2, 1, 1)
    assert m == {"total": m["total"], "shards": m["shards"]}
    # Stored in the cache, it reads back as the plain dict it is.
    cache.write("metrics", m, wait=True)
    assert cache.read("metrics") == json.loads(json.dumps(m))
    assert type(cache.read("metrics")) is dict
    cache._pool.close()


def test_aggregate_sums_into_total_and_keeps_the_records():
    m = aggregate(SHARDS)
    assert type(m) is Metrics
    assert m["total"]["lookup"] == 4 and m["total"]["write"] == 7
    assert "pid" not in m["total"] and "shard" not in m["total"]
    assert m.total is m["total"] and m.shards == SHARDS


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_as_metrics(protocol):
    m = aggregate(SHARDS)
    back = pickle.loads(pickle.dumps(m, protocol=protocol))
    assert type(back) is Metrics and back == m


def test_encodes_as_the_plain_dict():
    m = aggregate(SHARDS)
    plain = {"total": dict(m["total"]), "shards": list(m["shards"])}
    assert encode_value(m) == encode_value(plain)
    assert encode_value([m, ("t", 1)]) == _reference_packb([m, ("t", 1)])
    assert decode_value(encode_value(m)) == plain
    assert msgpack.unpackb(msgpack.packb(m), strict_map_key=False) == plain


def test_repr_is_the_dicts():
    m = aggregate(SHARDS)
    assert repr(m) == repr(dict(m))


def test_html_has_the_totals_and_a_row_per_shard():
    page = aggregate(SHARDS)._repr_html_()
    assert "summed over 2 shard(s)" in page
    assert page.count("<table>") == 3  # total, per shard, every counter (collapsed)
    per_shard = page.split("<p>Per shard:</p>")[1].split("</table>")[0]
    assert per_shard.count("<tr>") == 3  # header and two shards
    assert "<td>75.0%</td>" in per_shard  # shard 0: 3 hits in 4 lookups
    assert "<td>aaaaaaaa</td>" in per_shard and "<td>bbbbbbbb</td>" in per_shard
    summary = page.split("</table>")[0]
    assert "<th>hit rate</th>" in summary and "<td>75.0%</td>" in summary
    assert "<td>7</td>" in summary  # writes, summed


def test_html_shows_error_counters_and_roles_only_where_they_tell_something():
    healthy = [dict(m, flush_errors=0, restarts=0) for m in SHARDS]
    page = aggregate(healthy)._repr_html_()
    shown = page.split("<details>")[0]  # the collapsed list has every counter
    assert "<th>write</th>" in shown and "<th>pending</th>" in shown
    assert "flush_errors" not in shown and "restarts" not in shown and "role" not in shown
    assert "<td>11</td>" in shown and "<td>12</td>" in shown  # pids, not "1,1"-style
    failing = [dict(healthy[0], flush_errors=3, role="backup"), healthy[1]]
    shown = aggregate(failing)._repr_html_().split("<details>")[0]
    assert shown.count("<th>flush_errors</th>") == 2  # in the summary and per shard
    assert "<th>role</th>" in shown and "<td>backup</td>" in shown
    assert "restarts" not in shown


def test_html_escapes_what_it_shows():
    m = Metrics(total={"x<y>": 1}, shards=[{"shard": 0, "role": "<b>&", "pid": "<p>"}])
    page = m._repr_html_()
    assert "x&lt;y&gt;" in page and "&lt;b&gt;&amp;" in page and "&lt;p&gt;" in page
    assert "<b>&" not in page and "<td><p>" not in page


def test_html_of_an_empty_or_partial_dict():
    assert "<table>" not in Metrics()._repr_html_()
    page = Metrics(total={"lookup": 0})._repr_html_()
    assert "<th>hit rate</th>" in page and "Per shard" not in page


def test_to_frame_has_a_row_per_shard():
    pandas = pytest.importorskip("pandas")
    frame = aggregate(SHARDS).to_frame()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.index) == [0, 1] and frame.index.name == "shard"
    assert list(frame["write"]) == [2, 5] and list(frame["pid"]) == [11, 12]
    assert Metrics().to_frame().empty


def test_to_frame_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    with pytest.raises(ImportError, match="needs pandas.*pip install pandas"):
        aggregate(SHARDS).to_frame()
