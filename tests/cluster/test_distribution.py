"""The cache on Ray: routing, batching, pickled handles, isolation, auth, errors, shutdown."""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import pytest
import ray

import persistroids_dist as pd
from persistroids_dist.client import NAMESPACE
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.transport import Connection


class FlakySQLite(SQLiteConnector):
    """SQLite store whose flush fails while a flag file exists (visible across processes)."""

    def __init__(self, path, flag):
        super().__init__(path)
        self.flag = str(flag)

    def flush(self, payloads):
        if os.path.exists(self.flag):
            raise OSError("store unavailable (flag file present)")
        super().flush(payloads)

    def write(self, args, value):
        if value == "forbidden":
            raise ValueError("this store refuses 'forbidden'")
        return super().write(args, value)


def stored(path, key):
    probe = SQLiteConnector(path)
    try:
        return probe.read(key)
    finally:
        probe.disconnect()


@ray.remote
def increment_many(cache, keys, rounds):
    for i in range(rounds):
        cache.update(keys[i % len(keys)], lambda v: v + 1)
    return rounds


def test_four_tasks_of_1000_updates_give_exact_totals(make_cache):
    cache = make_cache(init_fn=lambda args: 0, num_shards=3)
    keys = [f"counter-{i}" for i in range(10)]
    done = ray.get([increment_many.remote(cache, keys, 1000) for _ in range(4)])
    assert sum(done) == 4000
    assert cache.read_many(keys) == [400] * 10
    assert cache.metrics()["total"]["updates"] == 4000


@ray.remote
class Worker:
    def __init__(self, cache):
        self.cache = cache

    def bump(self, key):
        return self.cache.update(key, lambda v: (v or 0) + 10)

    def read(self, key):
        return self.cache.read(key)


def test_handle_pickles_into_actors_and_tasks(make_cache):
    cache = make_cache()
    cache.write("shared", 1, wait=True)
    worker = Worker.remote(cache)
    assert ray.get(worker.read.remote("shared")) == 1
    assert ray.get(worker.bump.remote("shared")) == 11
    assert cache.read("shared") == 11
    ray.kill(worker)


def test_two_named_caches_never_see_each_others_data(make_cache):
    a = make_cache(name="iso-a")
    b = make_cache(name="iso-b")
    a.write("k", "from a", wait=True)
    assert b.read("k") is None
    b.write("k", "from b", wait=True)
    assert a.read("k") == "from a"


@ray.remote
def read_via_connect(name, key):
    return pd.connect(name).read(key)


def test_connect_by_name_from_a_task_and_errors_for_unknown_or_taken_names(make_cache):
    cache = make_cache(name="by-name")
    cache.write("greeting", "hello")
    cache.sync()
    assert ray.get(read_via_connect.remote("by-name", "greeting")) == "hello"
    assert pd.connect("by-name").read("greeting") == "hello"
    with pytest.raises(LookupError, match="no running cache named 'nope'"):
        pd.connect("nope")
    with pytest.raises(ValueError, match="already running"):
        pd.init(name="by-name")


def test_read_many_and_write_many_keep_order_across_shards(make_cache):
    cache = make_cache(num_shards=4)
    items = [((i, "t"), {"i": i}) for i in range(500)]
    assert cache.write_many(items) == 500
    keys = [k for k, _ in items][::-1] + ["missing"]
    assert cache.read_many(keys) == [v for _, v in items][::-1] + [None]
    per_shard = [s["entries"] for s in cache.metrics()["shards"]]
    assert all(n > 50 for n in per_shard), per_shard


def test_pipelined_writes_are_read_back_by_the_same_process_in_order(make_cache):
    cache = make_cache(num_shards=2)
    for i in range(2000):
        cache.write("seq", i)
    assert cache.read("seq") == 1999

    def writer(t):
        for i in range(300):
            cache.write(("t", t), i)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.read_many([("t", t) for t in range(4)]) == [299] * 4


def test_bad_keys_and_values_raise_before_anything_is_sent(make_cache):
    cache = make_cache()
    cache.write("ok", 1, wait=True)
    before = cache.metrics()["total"]["write"]
    with pytest.raises(TypeError, match="invalid cache key"):
        cache.write(["list", "key"], 1)
    with pytest.raises(TypeError, match="invalid cache key"):
        cache.read({"a": 1})
    with pytest.raises(TypeError, match="cannot encode"):
        cache.write("k", object())
    with pytest.raises(TypeError, match="cannot encode"):
        cache.write_many([("a", 1), ("b", {1, 2}), ("c", 3)])
    with pytest.raises(TypeError, match="callable"):
        cache.update("ok", 5)
    assert cache.metrics()["total"]["write"] == before
    assert cache.read_many(["a", "c", "ok"]) == [None, None, 1]


def test_init_validates_its_arguments(ray_session):
    with pytest.raises(TypeError, match=r"connectors\[0\].*get_id"):
        pd.init([object()])
    with pytest.raises(ValueError, match="num_shards"):
        pd.init(num_shards=0)
    with pytest.raises(ValueError, match="writes_threshold"):
        pd.init(writes_threshold=-1)
    with pytest.raises(TypeError, match="init_fn"):
        pd.init(init_fn=3)
    with pytest.raises(ValueError, match="name"):
        pd.init(name="a:b")


def test_store_errors_surface_and_nothing_accepted_is_lost(make_cache, tmp_path):
    db, flag = tmp_path / "s.db", tmp_path / "down"
    cache = make_cache([FlakySQLite(db, flag)], num_shards=2, millis_threshold=60000)
    cache.write("a", 1)
    cache.write("b", "forbidden")  # refused inside the shard: surfaces at the next sync
    with pytest.raises(pd.WriteError, match="refuses") as refused:
        cache.sync()
    assert isinstance(refused.value.first, ValueError) and refused.value.applied == 1
    assert cache.read("b") is None
    flag.touch()
    with pytest.raises(pd.FlushError, match="store unavailable"):
        cache.flush_now()
    total = cache.metrics()["total"]
    assert total["pending"] == 1 and total["flush_errors"] >= 1
    with pytest.raises(pd.FlushError):
        cache.shutdown()  # refuses to drop the buffered write
    assert cache.read("a") == 1
    flag.unlink()
    assert cache.flush_now() == 1
    assert stored(db, "a") == 1


def test_flush_now_returns_none_when_nothing_is_pending(make_cache):
    cache = make_cache()
    assert cache.flush_now() is None
    cache.write("x", 1)
    assert cache.flush_now() == 1
    assert cache.flush_now() is None


def test_wrong_secret_is_refused_and_counted(make_cache):
    cache = make_cache(num_shards=1)
    address = cache._spec["addresses"][0]
    with pytest.raises(pd.AuthenticationError):
        Connection(address, b"not the secret")
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(address["unix"])
    raw.recv(100)
    raw.sendall(msgpack.packb([b"garbage", b"x"]))
    assert raw.recv(100) == b""  # closed without serving
    raw.close()
    assert cache.metrics()["shards"][0]["auth_failures"] == 2


def test_shutdown_flushes_removes_actors_and_closes_the_handle(ray_session, tmp_path):
    db = tmp_path / "final.db"
    cache = pd.init([SQLiteConnector(db)], name="to-close", num_shards=2,
                    millis_threshold=60000)
    cache.write_many([(f"k{i}", i) for i in range(10)])
    final = cache.shutdown(disconnect=True)
    assert final["total"]["flush"] == 10 and final["total"]["pending"] == 0
    assert stored(db, "k7") == 7
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE]
    assert not [n for n in names if "to-close" in n]
    with pytest.raises(pd.CacheClosedError):
        cache.read("k1")
    with pytest.raises(pd.CacheClosedError):
        cache.shutdown()


@ray.remote
def pipelined_increments(cache, keys, rounds):
    add = lambda v: v + 1  # noqa: E731
    for i in range(rounds):
        cache.update(keys[i % len(keys)], add, wait=False)
    cache.sync()
    return rounds


def test_pipelined_updates_are_exact_after_sync_and_errors_surface(make_cache):
    cache = make_cache(init_fn=lambda args: 0, num_shards=2)
    keys = [f"p{i}" for i in range(7)]
    assert sum(ray.get([pipelined_increments.remote(cache, keys, 700) for _ in range(3)])) == 2100
    assert cache.read_many(keys) == [300] * 7
    assert cache.update("p0", lambda v: v / 0, wait=False) is None
    with pytest.raises(ZeroDivisionError):
        cache.sync()
    assert cache.read("p0") == 300  # the failed update changed nothing


def test_a_lone_queued_write_reaches_its_shard_without_another_call(make_cache):
    cache = make_cache(num_shards=1)
    cache.write("lonely", "here")  # queued for micro-batching; no later call from us
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline and seen != "here":
        seen = ray.get(read_via_connect.remote(cache.name, "lonely"))
    assert seen == "here"


def test_write_many_applies_every_item_a_store_does_not_refuse(make_cache, tmp_path):
    cache = make_cache([FlakySQLite(tmp_path / "m.db", tmp_path / "flag")], num_shards=1)
    with pytest.raises(pd.WriteError, match="1 write.s. refused, 2 applied") as refused:
        cache.write_many([("a", 1), ("b", "forbidden"), ("c", 3)])
    assert refused.value.errors[0][0] == 1
    assert cache.read_many(["a", "b", "c"]) == [1, None, 3]


def test_another_driver_process_connects_by_name(make_cache):
    """As a notebook would: a separate Python process joins the Ray cluster and the cache."""
    import subprocess
    import sys

    cache = make_cache(name="shared-with-driver", init_fn=lambda a: 0)
    cache.write("from-first", 41, wait=True)
    code = (
        "import persistroids_dist as pd\n"
        "c = pd.connect('shared-with-driver')\n"
        "c.write('from-second', c.read('from-first') + 1, wait=True)\n"
        "print(c.update('counter', lambda v: v + 5))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "5"
    assert cache.read_many(["from-second", "counter"]) == [42, 5]
