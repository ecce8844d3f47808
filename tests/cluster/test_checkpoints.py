"""Checkpoints of a checkpointed cache (``init(..., checkpoints=True)``) on Ray: what a
checkpoint holds, what reaches the stores and when, restoring one, and the ways one fails
cleanly. The pipeline with killed processes is ``test_pipeline.py``."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
import ray
from polling import wait_for
from sqlite_rows import stored
from test_histories import zero
from writers import BUMP

import persistroids_dist as pd
from persistroids_dist.connectors.redis import RedisConnector
from persistroids_dist.connectors.sqlite import SQLiteConnector
from persistroids_dist.connectors.testing import PrivateRedis


@pytest.fixture
def checkpointed(make_cache, tmp_path):
    def make(**kw) -> pd.Cache:
        return make_cache([SQLiteConnector(tmp_path / "store.db")], init_fn=zero,
                          checkpoints=True, name=kw.pop("name", f"ck-{uuid.uuid4().hex[:8]}"),
                          journal=tmp_path / "journal", **kw)
    return make


def test_writes_reach_the_stores_only_with_a_checkpoint(checkpointed, tmp_path):
    cache = checkpointed(writes_threshold=0, millis_threshold=1)  # thresholds do not flush
    assert cache.last_checkpoint() is None and cache.checkpoints() == []
    for i in range(100):
        cache.write(f"k{i}", i)
    cache.update("n", BUMP)
    time.sleep(0.3)
    assert stored(tmp_path / "store.db") == {}
    with pytest.raises(ValueError, match="checkpointed"):
        cache.flush_now()
    info = cache.checkpoint({"offset": 101})
    assert info.id == 0 and info.state == {"offset": 101} and info.keys == 101
    assert info.pause_s <= info.duration_s and len(info.shards) == 2
    want = {**{f"k{i}": i for i in range(100)}, "n": 1}
    assert wait_for(lambda: stored(tmp_path / "store.db") == want)
    cache.update("n", BUMP)
    second = cache.checkpoint({"offset": 102})
    assert second.id == 1 and second.keys == 1
    assert [c.id for c in cache.checkpoints()] == [0, 1]
    assert cache.last_checkpoint().state == {"offset": 102}
    m = cache.metrics()
    assert m["checkpoints"]["taken"] == 2 and m["checkpoints"]["failed"] == 0
    assert m["checkpoints"]["last"]["id"] == 1 and m["checkpoints"]["last"]["keys"] == 1
    assert {"open", "sealed", "committed"} <= set(m["shards"][0]["checkpoint"])
    assert wait_for(lambda: stored(tmp_path / "store.db").get("n") == 2)


def test_a_checkpoint_with_nothing_pending_is_recorded(checkpointed):
    cache = checkpointed()
    info = cache.checkpoint("empty")
    assert info.keys == 0 and cache.last_checkpoint().state == "empty"


def test_restore_drops_every_write_after_the_checkpoint(checkpointed, tmp_path):
    cache = checkpointed()
    for i in range(50):
        cache.update(f"c{i % 5}", BUMP)
    cache.checkpoint({"offset": 50})
    for i in range(50, 80):
        cache.update(f"c{i % 5}", BUMP)
    cache.write("late", 1)
    name = cache._pool.spec.name
    again = pd.init([SQLiteConnector(tmp_path / "store.db")], init_fn=zero, checkpoints=True,
                    name=name, restore=True)  # the running cache of that name, restored
    assert again.last_checkpoint().state == {"offset": 50}
    assert again.read_many([f"c{i}" for i in range(5)]) == [10] * 5
    assert again.read("late") == 0  # init_fn: no store has it
    assert cache.read("c0") == 10  # every handle sees the restored state
    for i in range(50, 80):  # the job replays its input from the recorded offset
        again.update(f"c{i % 5}", BUMP)
    again.checkpoint({"offset": 80})
    assert wait_for(lambda: stored(tmp_path / "store.db") ==
                    {f"c{i}": 16 for i in range(5)})


def test_a_checkpoint_of_a_state_msgpack_cannot_encode_records_nothing(checkpointed):
    cache = checkpointed()
    cache.write("a", 1)
    cache.checkpoint(1)
    cache.write("a", 2)
    with pytest.raises(TypeError, match="msgpack"):
        cache.checkpoint({"f": object()})
    assert [c.id for c in cache.checkpoints()] == [0]
    assert cache.checkpoint(2).id == 1  # the write is in the next one


def test_a_checkpoint_while_its_store_is_down_fails_cleanly_and_the_next_succeeds(
        checkpointed, tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        ck_store = RedisConnector(server.url, prefix=f"{uuid.uuid4().hex[:6]}:")
        cache = checkpointed(checkpoint_store=ck_store)
        cache.write("a", 1)
        cache.checkpoint("first", wait_stored=True)  # stored: what follows must not be
        cache.write("a", 2)
        cache.write("b", 2)
        server.stop()
        with pytest.raises(RuntimeError, match="checkpoint 1 failed, nothing recorded"):
            cache.checkpoint("second")
        cache.write("c", 3)  # writes go on
        assert cache.read_many(["a", "b", "c"]) == [2, 2, 3]
        assert stored(tmp_path / "store.db") == {"a": 1}  # the failed one stored nothing
        server.start()
        third = cache.checkpoint("third")
        assert third.id == 1 and third.keys == 3  # the failed checkpoint's writes too
        assert [c.state for c in cache.checkpoints()] == ["third"]  # a fresh server
        assert cache.metrics()["checkpoints"]["failed"] == 1
        assert wait_for(lambda: stored(tmp_path / "store.db") == {"a": 2, "b": 2, "c": 3})
    finally:
        server.stop()


def test_a_checkpoint_takes_in_the_writes_of_held_leases(checkpointed):
    cache = checkpointed()
    with cache.lease("x", "y"):
        cache.update("x", BUMP)
        cache.update("y", BUMP)  # in-process only, so far
        info = cache.checkpoint("leased")  # recalls the leases: their writes go in
        cache.update("x", BUMP)  # after the cut (leased again)
    assert info.keys == 2
    name = cache._pool.spec.name
    cache.restore()
    assert cache.read_many(["x", "y"]) == [1, 1]
    assert name


def test_the_cut_is_consistent_with_what_clients_saw_acknowledged(checkpointed):
    # Writers write keys in sequence, each acknowledged before the next is issued, across
    # both shards. A consistent cut holds a prefix of each sequence: never a key without
    # the keys acknowledged before it. Each checkpoint also holds everything acknowledged
    # before it was called.
    cache = checkpointed()
    stop = threading.Event()
    acked: dict[int, int] = {0: -1, 1: -1}

    def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            cache.write(f"w{w}.{i}", i, wait=True)
            acked[w] = i
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        before = dict(acked)
        cache.checkpoint("cut")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    cache.restore()
    for w in (0, 1):
        n = before[w] + 200  # more than a writer does in 0.3 s here: read past the end
        values = cache.read_many([f"w{w}.{i}" for i in range(n)])
        present = [v != 0 or i == 0 for i, v in enumerate(values)]
        count = present.index(False) if False in present else n
        assert all(present[:count]) and not any(present[count:]), f"writer {w}: not a prefix"
        assert count - 1 >= before[w], (w, count, before[w])  # acknowledged before: in it


def test_a_cut_never_recorded_is_dropped_by_a_restore_even_across_a_shard_kill(checkpointed):
    # Killed between prepare and commit: every shard sealed checkpoint 1 (as the coordinator
    # does), one shard process is SIGKILLed, and no manifest was written. A restore goes
    # back to checkpoint 0 on every shard, the restarted one included (its journal has the
    # seal).
    cache = checkpointed()
    cache.write("a", 1)
    cache.checkpoint("zero")
    cache.write("a", 2)
    cache.write("b", 2)
    shards = cache._pool.spec.shards
    pids = [m["pid"] for m in cache.metrics()["shards"]]
    assert [c["keys"] for c in ray.get([s.checkpoint_seal.remote(1) for s in shards])] \
        != [0, 0]
    os.kill(pids[cache.shard_of("a")], signal.SIGKILL)
    for s in shards:  # the killed one may still be restarting (it resumed by restarting)
        try:
            ray.get(s.checkpoint_resume.remote(1))
        except ray.exceptions.RayActorError:
            pass
    assert cache.restore().state == "zero"
    assert cache.read_many(["a", "b"]) == [1, 0]
    assert cache.checkpoint("one").id == 1  # the id the dropped cut had is taken again


def test_periodic_checkpoints_take_the_state_function_s_state(checkpointed, tmp_path):
    cache = checkpointed(checkpoint_every_s=0.3, checkpoint_state=lambda: {"at": time.time()})
    for _ in range(20):
        cache.update("n", BUMP)
    assert wait_for(lambda: len(cache.checkpoints()) >= 2)
    taken = cache.checkpoints()
    assert [c.id for c in taken] == list(range(len(taken)))
    assert all(isinstance(c.state["at"], float) for c in taken)
    assert wait_for(lambda: stored(tmp_path / "store.db").get("n") == 20)


def test_checkpoint_options_are_checked(make_cache, tmp_path):
    with pytest.raises(ValueError, match="need checkpoints=True"):
        pd.init([SQLiteConnector(tmp_path / "s.db")], restore=True, name="x")
    with pytest.raises(ValueError, match="needs the journal"):
        pd.init([SQLiteConnector(tmp_path / "s.db")], checkpoints=True, journal=False)
    with pytest.raises(ValueError, match="restore=True needs the name"):
        pd.init([SQLiteConnector(tmp_path / "s.db")], checkpoints=True, restore=True)
    with pytest.raises(ValueError, match="checkpoint_every_s"):
        pd.init([SQLiteConnector(tmp_path / "s.db")], checkpoints=True, checkpoint_every_s=0)
    plain = make_cache([SQLiteConnector(tmp_path / "s.db")])
    with pytest.raises(ValueError, match="not checkpointed"):
        plain.checkpoint(1)
    with pytest.raises(ValueError, match="checkpointed cache is not supported"):
        make_cache([SQLiteConnector(tmp_path / "t.db")], checkpoints=True,
                   journal=tmp_path / "j").reshard(3)
