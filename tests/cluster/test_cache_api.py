"""The everyday cache API through Ray: delete, get/contains, invalidate, expiry, NumPy keys."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid

import numpy as np
import pytest
import ray

import persistroids_dist as pd
from persistroids_dist.codec import encode_value
from persistroids_dist.connectors.redis import RedisConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.connectors.testing import require_service


def rows(db) -> dict:
    con = sqlite3.connect(db)
    try:
        return {bytes(k): bytes(v) for k, v in con.execute("SELECT k, v FROM kv")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def test_delete_is_immediate_in_the_cache_and_write_behind_in_the_store(make_cache, tmp_path):
    db = tmp_path / "d.db"
    cache = make_cache([SQLiteConnector(db)], init_fn=lambda a: "init", millis_threshold=60_000)
    cache.write("k", "stored", wait=True)
    cache.flush_now()
    assert encode_value("k") in rows(db)
    cache.delete("k")
    # At once: never the store's old value, although the store still has it.
    assert encode_value("k") in rows(db)
    assert cache.read("k") == "init"
    assert cache.get("k", "absent") == "absent" and "k" not in cache
    cache.flush_now()
    assert encode_value("k") not in rows(db)
    cache.write("k", "back", wait=True)  # a write after a delete wins
    cache.delete("j", wait=False)  # pipelined, like write
    cache.sync()
    assert cache.get("k") == "back" and "k" in cache
    cache.flush_now()
    assert rows(db)[encode_value("k")] == encode_value("back")
    assert cache.metrics()["total"]["deletes"] == 2


@ray.remote
def delete_from_task(cache, key):
    cache.delete(key)
    return cache.get(key, "gone")


def test_a_delete_from_another_process_is_seen_everywhere(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    cache.write("shared", 5, wait=True)
    assert ray.get(delete_from_task.remote(cache, "shared")) == "gone"
    assert cache.read("shared") == 0 and not cache.contains("shared")


def test_get_and_contains_tell_absent_from_an_init_value(make_cache):
    cache = make_cache(init_fn=lambda a: 0)
    assert cache.read("missing") == 0  # falls back to init_fn (cached, not stored)
    assert cache.get("missing", "default") == "default"
    assert cache.get("missing") is None
    assert "missing" not in cache
    cache.write("zero", 0, wait=True)
    assert cache.get("zero", "default") == 0 and "zero" in cache
    cache.update("counter", lambda v: v + 1)
    assert cache.contains("counter") and cache.get("counter") == 1


def test_invalidate_flushes_first_and_drops_from_the_cache_only(make_cache, tmp_path):
    db = tmp_path / "i.db"
    cache = make_cache([SQLiteConnector(db)], millis_threshold=60_000, num_shards=2)
    cache.write("a", 1, wait=True)  # pending: not in the store yet
    assert encode_value("a") not in rows(db)
    reads = cache.metrics()["total"]["read"]
    assert cache.invalidate("a") is True
    assert rows(db)[encode_value("a")] == encode_value(1)  # flushed, never dropped
    assert cache.read("a") == 1
    assert cache.metrics()["total"]["read"] == reads + 1  # read back from the store
    assert cache.invalidate("never-cached") is False
    cache.write_many([(f"m{i}", i) for i in range(20)])
    dropped = cache.invalidate_all()
    assert dropped >= 21
    assert cache.metrics()["total"]["entries"] == 0
    assert cache.read_many([f"m{i}" for i in range(20)]) == list(range(20))


def test_an_expired_entry_is_read_again_from_the_store(make_cache, tmp_path):
    db = tmp_path / "t.db"
    cache = make_cache([SQLiteConnector(db)], num_shards=1, ttl_s=3600)
    # A short TTL (3 s) that a slow CI machine cannot outlive between the write and the first read:
    # with 0.2 s, a first test run on a cold Ray once read the store already.
    written = time.monotonic()
    cache.write("short", "v1", wait=True, ttl_s=3)
    cache.write("long", "v1", wait=True)
    cache.flush_now()
    con = sqlite3.connect(db)  # the store changes behind the cache's back
    con.execute("UPDATE kv SET v = ?", (encode_value("v2"),))
    con.commit()
    con.close()
    assert cache.read("short") == "v1"  # still cached
    time.sleep(max(0.0, written + 3.2 - time.monotonic()))
    assert cache.read("short") == "v2"  # expired: read from the store again
    assert cache.read("long") == "v1"  # the cache's ttl_s (an hour) has not passed
    assert cache.metrics()["total"]["expired"] == 1
    with pytest.raises(ValueError, match="ttl_s"):
        cache.write("x", 1, ttl_s=0)
    with pytest.raises(ValueError, match="ttl_s"):
        pd.init(ttl_s=-1)


def test_the_cache_expires_what_a_redis_store_expires(make_cache):
    require_service("Redis", "127.0.0.1", 6379)
    url = os.environ.get("PERSISTROIDS_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"ttl-{uuid.uuid4().hex[:8]}:"
    cache = make_cache([RedisConnector(url, prefix=prefix, ttl_s=2)], num_shards=1,
                       init_fn=lambda a: "expired")
    written = time.monotonic()  # 2 s, so a slow machine still reads "v" before it expires
    cache.write("k", "v", wait=True)
    cache.flush_now()
    flushed = time.monotonic()  # Redis's 2 s began during flush_now, the cache's before it
    assert flushed - written < 2, "too slow to tell"
    assert cache.read("k") == "v"
    # Redis dropped the key; the cache must not serve it forever
    time.sleep(max(0.0, flushed + 2.3 - time.monotonic()))
    assert cache.read("k") == "expired"
    assert cache.metrics()["shards"][0]["expired"] >= 1


def test_numpy_scalars_are_the_python_values_they_hold(make_cache):
    cache = make_cache()
    cache.write(np.int64(7), np.float32(0.5), wait=True)
    cache.write(("user", np.int32(42)), np.bool_(True), wait=True)
    assert cache.read(7) == 0.5
    assert cache.read(("user", 42)) is True
    cache.write_many([(np.uint8(i), np.int64(i * 10)) for i in range(5)])
    assert cache.read_many(list(range(5))) == [0, 10, 20, 30, 40]


def test_a_poison_write_becomes_a_dead_letter_and_the_rest_reaches_the_store(make_cache,
                                                                              tmp_path):
    db = tmp_path / "check.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL "
                "CHECK (length(v) < 100)) WITHOUT ROWID")
    con.close()
    cache = make_cache([SQLiteConnector(db)], num_shards=1, millis_threshold=20,
                       max_attempts=3)
    cache.write_many([(("row", i), "p" * 200 if i == 7 else i) for i in range(500)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not cache.dead_letters():
        time.sleep(0.05)  # the flush timer retries with backoff
    (dead,) = cache.dead_letters()
    assert dead["key"] == ("row", 7) and dead["attempts"] == 3
    assert "CHECK constraint failed" in dead["error"] and dead["connector"] == "sqlite:kv"
    assert len(rows(db)) == 499
    m = cache.metrics()["total"]
    assert m["dead_letters"] == 1 and m["pending"] == 0
    assert cache.retry_dead_letters() == 1
    cache.write(("row", 7), "short now", wait=True)  # a newer write replaces it
    cache.flush_now()
    assert cache.dead_letters() == [] and len(rows(db)) == 500
    # A poison write is singled out when the store takes others beside it.
    cache.write_many([(("row", 8), "q" * 300), (("row", 9), 9)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not cache.dead_letters():
        time.sleep(0.05)
    assert cache.discard_dead_letters() == 1 and cache.dead_letters() == []
