"""A store outage against a PostgreSQL server the test starts itself (initdb into a temp
folder, its own port; never the shared server): stopped and restarted while a writer keeps
writing and a reader times reads of cached keys. Every acknowledged write lands once the
store is back; the reads slower than 0.5 s during the outage are counted and printed."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

import persistroids_dist as pd
from persistroids_dist.codec import decode_value
from persistroids_dist.connectors.postgres import PostgresConnector
from persistroids_dist.connectors.testing import PrivatePostgres, pg_bin_dir

SLOW_READ_S = 0.5


@pytest.fixture
def private_pg():
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        if os.environ.get("PERSISTROIDS_REQUIRE_SERVICES") == "1":
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = PrivatePostgres(bin_dir)
    try:
        pg.initdb()
        pg.start()
        yield pg
    finally:
        pg.cleanup()


# private_pg comes before make_cache, so the cache is shut down before the server stops.
def test_a_postgres_outage_loses_no_acknowledged_write(private_pg, make_cache):
    table = f"pgout_{uuid.uuid4().hex[:10]}"
    # A short connect timeout: a flush attempt against the stopped server gives up quickly.
    connector = PostgresConnector(private_pg.dsn, table=table, connect_timeout_s=2,
                                  statement_timeout_ms=5000)
    cache = make_cache([connector], num_shards=2, millis_threshold=50, store_timeout_s=1.0)

    acked: dict[tuple, int] = {}
    for i in range(60):
        acked[("before", i)] = cache.write(("before", i), i * 7, wait=True)
    cache.flush_now()
    # Cached keys of each shard, so each shard's reads are timed on their own.
    cached: dict[int, list[tuple]] = {0: [], 1: []}
    for i in range(60):
        cached[cache.shard_of(("before", i))].append(("before", i))
    assert cached[0] and cached[1]
    assert [cache.read(("before", i)) for i in range(60)] == [i * 7 for i in range(60)]

    phase = ["before"]
    stop = threading.Event()
    errors: list[BaseException] = []
    # (phase when the read was sent, shard, seconds)
    reads: list[tuple[str, int, float]] = []
    acked_at: dict[tuple, float] = {}
    sent_in: dict[tuple, str] = {}  # the phase each acknowledged stream write was sent in
    write_errors: list[BaseException] = []  # BackpressureError: acceptable, not acknowledged
    unexpected: list[tuple[tuple, BaseException]] = []  # any other error a write raised

    def reader(shard: int) -> None:
        keys = cached[shard]
        i = 0
        try:
            while not stop.is_set():
                key = keys[i % len(keys)]
                current = phase[0]
                t0 = time.monotonic()
                value = cache.read(key)
                reads.append((current, shard, time.monotonic() - t0))
                assert value == acked[key], (key, value)
                i += 1
                time.sleep(0.005)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    def writer(w: int) -> None:
        i = 0
        try:
            while not stop.is_set() and i < 300:
                key = ("stream", w, i)
                current = phase[0]
                i += 1
                try:
                    cache.write(key, i, wait=True)
                except pd.BackpressureError as e:  # not expected: max_pending is the default
                    write_errors.append(e)
                    continue
                except Exception as e:  # not acknowledged; reported after the loss check
                    unexpected.append((key, e))
                    continue
                sent_in[key] = current
                acked[key] = i  # recorded once the shard acknowledged it
                acked_at[key] = time.monotonic()
                time.sleep(0.01)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in (0, 1)]
    threads += [threading.Thread(target=writer, args=(w,), daemon=True) for w in (0, 1)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # a healthy stream first
        phase[0] = "outage"
        private_pg.stop()
        down_at = time.monotonic()
        time.sleep(3.0)  # flush attempts fail meanwhile
        # A key no cache holds: its read fails after store_timeout_s (1 s, shorter than the
        # connector's 2 s connect timeout), naming the cause, instead of hanging; metrics()
        # answers (it never touches a store).
        t0 = time.monotonic()
        with pytest.raises(pd.StoreUnavailableError):
            cache.read(("never-cached", 1))
        miss_s = time.monotonic() - t0
        t0 = time.monotonic()
        m_outage = cache.metrics()["total"]
        metrics_s = time.monotonic() - t0
        time.sleep(3.0)
        up_at = time.monotonic()
        private_pg.start()
        phase[0] = "after"
        time.sleep(1.5)  # the stream goes on against the restarted server
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads)

    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and cache.metrics()["total"]["pending"]:
        time.sleep(0.1)
    m_end = cache.metrics()["total"]
    assert m_end["pending"] == 0, m_end
    assert cache.dead_letters() == []  # a store that was down is not a poison write
    cache.flush_now()

    # Read every acknowledged key back from the private server itself, not through the cache.
    with psycopg.connect(private_pg.dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT k, v FROM {}").format(sql.Identifier(table)))
        stored = {decode_value(bytes(k)): decode_value(bytes(v)) for k, v in rows.fetchall()}
    missing = [k for k in acked if k not in stored]
    wrong = [k for k in acked if k in stored and stored[k] != acked[k]]

    n_down = sum(1 for t in acked_at.values() if down_at <= t < up_at)
    n_sent_outage = sum(1 for p in sent_in.values() if p == "outage")
    outage = [(s, t) for p, s, t in reads if p == "outage"]
    slow = [(s, t) for s, t in outage if t > SLOW_READ_S]
    print(f"\n[pg outage] acknowledged writes: {len(acked)}; {n_sent_outage} sent during the "
          f"outage, {n_down} acknowledged while the server was down; flush_errors: "
          f"{m_end['flush_errors']}, backpressure refusals: {m_end['backpressure_refusals']}")
    for shard in (0, 1):
        ts = [t for s, t in outage if s == shard]
        print(f"[pg outage] shard {shard}: cached-key reads during the outage: {len(ts)}, "
              f"slower than {SLOW_READ_S} s: {sum(t > SLOW_READ_S for t in ts)}, "
              f"max {max(ts, default=0):.3f} s, "
              f"{sum(t for t in ts if t > SLOW_READ_S):.1f} s spent in slow reads")
    print(f"[pg outage] all shards: {len(outage)} reads during the outage, {len(slow)} slow, "
          f"max {max((t for _, t in outage), default=0):.3f} s; max before: "
          f"{max((t for p, _, t in reads if p == 'before'), default=0):.3f} s, max after the "
          f"restart: {max((t for p, _, t in reads if p == 'after'), default=0):.3f} s")

    print(f"[pg outage] writes refused with BackpressureError: {len(write_errors)}, writes "
          f"that raised another error: {len(unexpected)} {[repr(e) for _, e in unexpected[:3]]}")

    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} acknowledged writes stored with a wrong value: {wrong[:5]}"
    # Writes sent during the outage are acknowledged (buffered), but not necessarily while the
    # server is down: a shard in a failing flush holds back its writers too (see below).
    assert n_sent_outage >= 1, "no write sent during the outage was acknowledged"
    assert m_end["flush_errors"] >= 1
    print(f"[pg outage] a miss failed after {miss_s:.2f} s; metrics() took {metrics_s:.3f} s "
          f"(flush_errors so far {m_outage['flush_errors']})")
    # Stores off the hot path: no read of a cached key waited for the stopped server. One
    # that did would take the connector's 2 s connect timeout at least (before the fix:
    # every flush attempt held the shard's lock that long); the 0.5 s count is printed.
    assert all(t < 2.0 for _, t in outage), max(t for _, t in outage)
    assert metrics_s < 2.0 and m_outage["store_timeouts"] >= 1
    # Checked last, so a run that hits it still reports the loss check above. A write may
    # fail only with BackpressureError (none expected here: max_pending is the default); one
    # that raised anything else was not acknowledged (its key is not in `acked`), but the
    # error itself is a bug of the cache.
    described = "; ".join(f"{k}: {type(e).__name__}: {e}" for k, e in unexpected[:5])
    # (An IndexError in ShardCore._flush_one when the store came back mid-bisection showed
    # here until it was fixed: any error of that kind fails this test now.)
    assert not unexpected, f"writes raised unexpected errors: {described}"


def test_shutdown_with_a_deadline_during_an_outage_keeps_the_rest_for_the_next_init(
        private_pg, tmp_path):
    # Issue 8: a shutdown while the store is down flushes until its deadline, then stops
    # anyway and reports, per shard, what it could not write; the journal keeps it, and the
    # next init of the same name and journal replays it and writes it once the store is up.
    table = f"pgsd_{uuid.uuid4().hex[:10]}"
    name = f"sd-{uuid.uuid4().hex[:8]}"
    journal = tmp_path / "journal"

    def start() -> pd.Cache:
        return pd.init([PostgresConnector(private_pg.dsn, table=table, connect_timeout_s=1)],
                       name=name, num_shards=2, journal=journal, writes_threshold=10**6,
                       millis_threshold=600_000)

    cache = start()
    try:
        acked = {("k", i): cache.write(("k", i), i * 3, wait=True) for i in range(120)}
        private_pg.stop()
        result = cache.shutdown(timeout_s=1.5)
    except BaseException:
        cache.shutdown(timeout_s=0)  # the test failed: do not leave the actors behind
        raise
    assert result["total"]["unwritten"] == 120
    assert [m["unwritten"] > 0 for m in result["shards"]] == [True, True]
    with pytest.raises(pd.CacheNotFoundError):
        pd.connect(name)  # the cache is gone; its journal is not
    private_pg.start()
    again = start()
    try:
        assert again.metrics()["total"]["replayed"] == 120
        again.flush_now()
        with psycopg.connect(private_pg.dsn, autocommit=True) as conn:
            rows = conn.execute(sql.SQL("SELECT k, v FROM {}").format(sql.Identifier(table)))
            stored = {decode_value(bytes(k)): decode_value(bytes(v))
                      for k, v in rows.fetchall()}
        assert stored == {k: v for k, v in acked.items()}
    finally:
        again.shutdown()
