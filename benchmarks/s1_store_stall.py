"""S1 and S2, stores off the hot path (issue 8): do reads of cached keys stay fast while a
shard's store is slow (S1: a flush of 100k rows to PostgreSQL) or down (S2: a 10 s outage of a
private PostgreSQL)? Each compares the same reads with themselves when the store is idle or up.

S1's reads are measured twice, on caches of their own: with the flushes in the shard's flush
process (init's default: the row with the target) and on its store thread
(``flush_process=False``), so one run shows what the flush process changes.

Every read here is a remote ``cache.read`` of a key its shard holds (no near cache: each call
asks the shard, which the shards' ``lookup`` counters confirm), timed one call at a time by a
reader that sends the next read as soon as the last one returned. Such a reader sends nothing
while it is stalled, so a stall is one sample however long it lasts (coordinated omission):
the p99 rows are therefore corrected as HdrHistogram does (``co_corrected``: a read that took
k expected intervals also counts the k-1 reads the reader would have sent meanwhile), on both
sides alike; the raw p99 is in the notes and the JSON.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, pc_ns, pctl, pg_connect, rounds
from persistroids_dist.codec import decode_value
from persistroids_dist.connectors.postgres import PostgresConnector
from persistroids_dist.connectors.testing import PrivatePostgres, pg_bin_dir

S1_SLOW_US = 20_000.0  # a read slower than 20 ms counts as stalled (S1)
S2_SLOW_US = 500_000.0  # a read slower than 0.5 s counts as stalled (S2)


def co_corrected(us: list[float], interval_us: float) -> list[float]:
    """``us`` plus, for each sample longer than ``interval_us``, the samples of the reads a
    reader sending every ``interval_us`` would have waited through meanwhile (v - i, v - 2i,
    ... down to i), as HdrHistogram's recordValueWithExpectedInterval."""
    interval_us = max(interval_us, 10.0)
    out = list(us)
    for v in us:
        x = v - interval_us
        while x > interval_us:
            out.append(x)
            x -= interval_us
    return out


def _lat(us: list[float], interval_us: float | None = None) -> dict[str, float]:
    """p50/p99/max of ``us``; with ``interval_us`` also the p99 corrected for coordinated
    omission (``p99_co_us``)."""
    d = {"p50_us": pctl(us, 50), "p99_us": pctl(us, 99),
         "max_us": max(us) if us else float("nan"), "samples": len(us),
         "over_20ms": sum(1 for x in us if x > 20_000)}
    if interval_us is not None:
        d["p99_co_us"] = pctl(co_corrected(us, interval_us), 99)
        d["expected_interval_us"] = interval_us
    return d


def _lookups(cache: pd.Cache) -> tuple[int, int]:
    """All shards' (lookup, read) counters: read calls served, and store read rounds."""
    t = cache.metrics()["total"]
    return t["lookup"], t["read"]


def _s1_run(ctx: Ctx, flush_process: bool) -> dict[str, Any]:
    """S1's rounds on a cache of its own: idle and busy read latencies, flush durations and
    failed checks. ``flush_process``: init's option of that name."""
    n = ctx.pick(100_000, 20_000)
    n_idle = ctx.pick(5_000, 2_000)
    n_rounds = ctx.pick(3, 2)
    suffix = "" if flush_process else "t"
    table = ctx.pg_table("s1" + suffix)
    # One shard; thresholds out of reach, so only the explicit flush_now() flushes.
    cache = pd.init([PostgresConnector(ctx.pg_dsn, table=table)], num_shards=1,
                    writes_threshold=10 ** 9, millis_threshold=1e12, max_entries=4 * n + 10,
                    name=f"bench-{ctx.tag}-s1{suffix}", flush_process=flush_process,
                    journal=os.path.join(ctx.tmpdir, "journal"))
    ctx.caches.append(cache)
    key = ("s1", "hot")
    cache.write(key, 4242, wait=True)
    cache.flush_now()
    read = cache.read
    for _ in range(200):  # cached in the shard; warms the connection
        read(key)
    idle: list[float] = []
    busy: list[float] = []
    flush_s: list[float] = []
    busy_per_round: list[dict[str, float]] = []
    checks: list[str] = []
    lookups_read = 0
    look0, store0 = _lookups(cache)
    written = 1
    for r in rounds(ctx, n_rounds):
        # Idle: the shard has nothing pending. As long as the last flush took (and at least
        # n_idle reads): both sides meet this machine's own hiccups (another process's burst
        # stalls a read for ms) for the same time, so the p99s compare the flush, not how
        # many hiccups each window happened to catch (a 0.2 s idle window made the anchor
        # swing 10x between runs).
        idle_s = flush_s[-1] if flush_s else 0.5
        before = len(idle)
        with no_gc():
            end = pc() + idle_s
            while pc() < end or len(idle) - before < n_idle:
                t = pc_ns()
                read(key)
                idle.append((pc_ns() - t) / 1000)
        lookups_read += len(idle) - before
        # Busy: n distinct pending keys, flushed by one flush_now() in another thread.
        cache.write_many([(("s1", r, i), i) for i in range(n)])
        written += n
        pending = cache.metrics()["total"]["pending"]
        if pending != n:
            checks.append(f"round {r}: {pending} pending before the flush, expected {n}")
        outcome: dict[str, Any] = {}

        def flusher(out: dict[str, Any] = outcome) -> None:
            t0 = pc()
            try:
                cache.flush_now()
            except BaseException as e:  # reported in the notes
                out["error"] = f"{type(e).__name__}: {e}"
            out["seconds"] = pc() - t0

        thread = threading.Thread(target=flusher, daemon=True)
        samples: list[float] = []
        with no_gc():
            thread.start()
            while thread.is_alive():
                t = pc_ns()
                read(key)
                samples.append((pc_ns() - t) / 1000)
        thread.join()
        lookups_read += len(samples)
        busy.extend(samples)
        busy_per_round.append(_lat(samples))
        flush_s.append(outcome.get("seconds", float("nan")))
        if "error" in outcome:
            checks.append(f"round {r}: flush_now raised {outcome['error']}")
    # The flushes ran in the shard's flush process (init's default), or on its store thread.
    flush_pids = cache.metrics()["shards"][0]["flush_pids"]
    if any(flush_pids.values()) != flush_process:
        checks.append(f"flush_process={flush_process}, but the flush processes are "
                      f"{flush_pids}")
    look1, store1 = _lookups(cache)
    # Every timed read reached the shard (lookup) and none went to the store (read).
    if look1 - look0 != lookups_read or store1 != store0:
        checks.append(f"shard lookups {look1 - look0} (expected {lookups_read}), store reads "
                      f"{store1 - store0} (expected 0)")
    if read(key) != 4242:
        checks.append("the hot key read back a wrong value")
    with pg_connect(ctx) as pg:
        rows = pg.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    if rows != written:
        checks.append(f"table has {rows} rows, {written} written")
    cache.shutdown()
    ctx.caches.remove(cache)
    return {"n": n, "idle": idle, "busy": busy, "flush_s": flush_s,
            "busy_per_round": busy_per_round, "checks": checks}


@case("S1")
def s1_flush_stall(ctx: Ctx) -> None:
    """Reads of a cached key while its shard flushes 100k rows to PostgreSQL, vs idle; the
    same with the flushes on the shard's store thread (flush_process=False), for the
    record."""
    run = _s1_run(ctx, flush_process=True)
    thread = _s1_run(ctx, flush_process=False)
    n, idle, busy, flush_s, checks = (run[k] for k in ("n", "idle", "busy", "flush_s",
                                                        "checks"))
    busy_per_round = run["busy_per_round"]

    interval = pctl(idle, 50)  # the reader's pace when nothing stalls it
    i, b = _lat(idle, interval), _lat(busy, interval)
    slow = sum(1 for x in busy if x > S1_SLOW_US)
    flush_med = med(flush_s)
    ctx.details["S1"] = {"rows_per_flush": n, "idle": i, "busy": b,
                         "busy_per_round": busy_per_round, "flush_s": flush_s,
                         "slow_reads": slow, "slow_read_us": S1_SLOW_US, "checks_failed": checks}
    bad = "; CHECK FAILED: " + "; ".join(checks) if checks else ""
    common = (f"{len(busy)} reads during {len(flush_s)} flushes of {n // 1000}k rows "
              f"(flush median {flush_med:.2f} s), {slow} slower than "
              f"{S1_SLOW_US / 1000:.0f} ms; idle {i['samples']} reads")
    ctx.rows.append(Row("S1", f"read p99 during a {n // 1000}k-row flush (us)",
                        "same reads, shard idle p99", i["p99_co_us"], b["p99_co_us"], "us",
                        "<= 3x", b["p99_co_us"] <= 3 * i["p99_co_us"],
                        f"{common}; p99 corrected for coordinated omission (raw p99 idle "
                        f"{i['p99_us']:.0f} us, busy {b['p99_us']:.0f} us); p50 idle "
                        f"{i['p50_us']:.0f} us, busy {b['p50_us']:.0f} us{bad}"))
    ctx.rows.append(Row("S1", f"read max during a {n // 1000}k-row flush (ms)",
                        "same reads, shard idle max", i["max_us"] / 1000, b["max_us"] / 1000,
                        "ms", f"<= {S1_SLOW_US / 1000:.0f} ms", b["max_us"] <= S1_SLOW_US,
                        f"{common}; shard lookups checked{bad}"))
    # The same flushes on the store thread, measured in its own rounds of this run.
    t_idle, t_busy = _lat(thread["idle"], interval), _lat(thread["busy"], interval)
    ctx.details["S1"]["store_thread"] = {
        "idle": t_idle, "busy": t_busy, "flush_s": thread["flush_s"],
        "checks_failed": thread["checks"]}
    t_bad = "; CHECK FAILED: " + "; ".join(thread["checks"]) if thread["checks"] else ""
    ctx.rows.append(Row("S1", "read p99 during the flush, flush process (us)",
                        "the same, flushes on the store thread", t_busy["p99_co_us"],
                        b["p99_co_us"], "us", "-", None,
                        f"corrected p99s; store thread: raw p99 {t_busy['p99_us']:.0f} us, "
                        f"{t_busy['samples']} reads, flush median "
                        f"{med(thread['flush_s']):.2f} s, its own idle p99 "
                        f"{t_idle['p99_co_us']:.0f} us{t_bad}"))


@case("S2")
def s2_outage_stall(ctx: Ctx) -> None:
    """Reads of cached keys during an outage of a private PostgreSQL, vs before it."""
    outage_s = ctx.pick(10.0, 4.0)
    before_s = 3.0
    what_p99 = f"read p99 during a {outage_s:.0f} s PostgreSQL outage (us)"
    what_max = f"read max during a {outage_s:.0f} s PostgreSQL outage (ms)"
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        note = "not run: PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        ctx.details["S2"] = {"not_run": note}
        ctx.rows.append(Row("S2", what_p99, "same reads before the outage p99", None, None,
                            "us", "<= 3x", None, note))
        return
    pg = PrivatePostgres(bin_dir)
    cache: pd.Cache | None = None
    try:
        pg.initdb()
        pg.start()
        table = f"pdbench_{ctx.tag}_s2"  # on the private server, removed with it
        # The connector's defaults (connect_timeout_s=10) and the cache's default thresholds:
        # a shard flushes about once a second while writes come in.
        cache = pd.init([PostgresConnector(pg.dsn, table=table)], num_shards=2,
                        name=f"bench-{ctx.tag}-s2", journal=os.path.join(ctx.tmpdir, "journal"))
        ctx.caches.append(cache)
        _s2_run(ctx, cache, pg, table, outage_s, before_s, what_p99, what_max)
    finally:
        try:
            if not pg.running:
                pg.start()  # back up, so the shutdown's final flush can land
        except Exception as e:
            print(f"S2: restarting the private PostgreSQL failed: {e!r}", flush=True)
        if cache is not None:
            try:
                cache.shutdown()
                ctx.caches.remove(cache)
            except Exception as e:
                print(f"S2: shutdown of the cache failed: {e!r}", flush=True)
        pg.cleanup()


def _s2_run(ctx: Ctx, cache: pd.Cache, pg: PrivatePostgres, table: str, outage_s: float,
            before_s: float, what_p99: str, what_max: str) -> None:
    n_keys = 200
    cached: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    expected: dict[Any, int] = {}
    for i in range(n_keys):
        k = ("s2", i)
        cached[cache.shard_of(k)].append(k)
        expected[k] = i * 3
    cache.write_many(list(expected.items()))
    cache.flush_now()
    for k in expected:  # cached in their shards; warms the connections
        cache.read(k)
    look0, store0 = _lookups(cache)

    phase = ["before"]
    stop = threading.Event()
    errors: list[str] = []
    reads: list[tuple[str, int, float, float]] = []  # (phase when sent, shard, sent at, us)
    wrong: list[Any] = []
    written: dict[Any, int] = {}
    sent_in: dict[str, int] = {"before": 0, "outage": 0, "after": 0}

    def reader(shard: int) -> None:
        keys, read, j = cached[shard], cache.read, 0
        try:
            while not stop.is_set():
                k = keys[j % len(keys)]
                p = phase[0]
                t = pc_ns()
                v = read(k)
                reads.append((p, shard, t / 1e9, (pc_ns() - t) / 1000))
                if v != expected[k]:
                    wrong.append(k)
                j += 1
        except BaseException as e:  # reported in the notes
            errors.append(f"reader {shard}: {type(e).__name__}: {e}")

    def writer() -> None:
        j = 0
        try:
            while not stop.is_set():
                k = ("s2w", j)
                p = phase[0]
                cache.write(k, j)  # pipelined; sync() reports a refusal later
                written[k] = j
                sent_in[p] += 1
                j += 1
                stop.wait(0.05)
        except BaseException as e:
            errors.append(f"writer: {type(e).__name__}: {e}")

    def after_reads(shard: int) -> int:
        return sum(1 for r in reads if r[0] == "after" and r[1] == shard)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in (0, 1)]
    threads.append(threading.Thread(target=writer, daemon=True))
    # As every timed block of the suite: no cyclic GC pause in the readers.
    with no_gc():
        for t in threads:
            t.start()
        try:
            time.sleep(before_s)
            phase[0] = "outage"
            t_down = pc()
            pg.stop()
            time.sleep(max(0.0, outage_s - (pc() - t_down)))
            phase[0] = "after"
            t_restart = pc()
            pg.start()
            t_up = pc()  # the server accepts connections again
            # Go on until both readers have read again (a stall may outlast the outage).
            deadline = t_up + 60
            while pc() < deadline and min(after_reads(0), after_reads(1)) < 500:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
    stuck = [t.name for t in threads if t.is_alive()]
    look1, store1 = _lookups(cache)

    # Every write landed once the server was back?
    landing: list[str] = []
    try:
        cache.sync()
    except Exception as e:
        landing.append(f"sync raised {type(e).__name__}: {e}")
    t_land = pc()
    deadline = t_land + 60
    while pc() < deadline and cache.metrics()["total"]["pending"]:
        time.sleep(0.1)
    land_s = pc() - t_land
    try:
        cache.flush_now()
    except Exception as e:
        landing.append(f"flush_now raised {type(e).__name__}: {e}")
    with psycopg.connect(pg.dsn, autocommit=True, connect_timeout=5) as conn:
        stored = {decode_value(bytes(k)): decode_value(bytes(v)) for k, v in
                  conn.execute(f'SELECT k, v FROM "{table}"').fetchall()}
    every = {**expected, **written}
    missing = [k for k in every if stored.get(k) != every[k]]
    m = cache.metrics()["total"]

    before_us = [us for q, _, _, us in reads if q == "before"]
    interval = pctl(before_us, 50)  # the readers' pace when nothing stalls them
    lat = {p: _lat([us for q, _, _, us in reads if q == p], interval)
           for p in ("before", "outage", "after")}
    per_shard = {s: _lat([us for q, sh, _, us in reads if q == "outage" and sh == s], interval)
                 for s in (0, 1)}
    outage = [(s, at, us) for q, s, at, us in reads if q == "outage"]
    slow = [(s, at, us) for s, at, us in outage if us > S2_SLOW_US]
    slow_total_s = sum(us for _, _, us in slow) / 1e6
    # When each slow read began (after the stop) and ended (after the server was up again).
    stalls = [{"shard": s, "began_after_stop_s": round(at - t_down, 2),
               "ended_after_up_s": round(at + us / 1e6 - t_up, 2), "seconds": round(us / 1e6, 2)}
              for s, at, us in slow]
    # Every read over 20 ms, any phase: (phase, shard, sent at seconds after the stop, ms).
    over_20ms = [(q, s, round(at - t_down, 3), round(us / 1000, 1))
                 for q, s, at, us in reads if us > 20_000]
    checks = list(landing) + errors
    if missing:
        checks.append(f"{len(missing)} of {len(every)} writes not in the table, e.g. "
                      f"{missing[:3]}")
    if wrong:
        checks.append(f"{len(wrong)} reads returned a wrong value")
    if stuck:
        checks.append(f"threads still running: {stuck}")
    if look1 - look0 != len(reads) or store1 != store0:
        checks.append(f"shard lookups {look1 - look0} (expected {len(reads)}), store reads "
                      f"{store1 - store0} (expected 0)")
    down_s, restart_s = t_restart - t_down, t_up - t_restart
    ctx.details["S2"] = {
        "outage_s": round(down_s, 2), "restart_s": round(restart_s, 2), "before_s": before_s,
        "latency": lat, "outage_per_shard": per_shard, "slow_reads": len(slow),
        "slow_read_us": S2_SLOW_US, "seconds_in_slow_reads": round(slow_total_s, 2),
        "stalls": stalls, "reads_over_20ms": over_20ms, "writes": len(written),
        "writes_sent_in": sent_in,
        "writes_landed": not missing, "seconds_to_drain_after_restart": round(land_s, 2),
        "flush_errors": m["flush_errors"], "store_timeouts": m.get("store_timeouts"),
        "checks_failed": checks,
    }
    bad = "; CHECK FAILED: " + "; ".join(checks) if checks else ""
    landed = (f"all {len(every)} writes landed ({sent_in['outage']} sent during the outage)"
              if not missing else f"{len(missing)} writes MISSING")
    b, o, a = lat["before"], lat["outage"], lat["after"]
    longest = max(stalls, key=lambda d: d["seconds"], default=None)
    longest_txt = (f"longest {longest['seconds']:.1f} s, from stop+{longest['began_after_stop_s']}"
                   f" s to up{longest['ended_after_up_s']:+} s" if longest else "none")
    common = (f"2 shards, one reader each; {o['samples']} reads sent during the outage "
              f"({down_s:.1f} s), {len(slow)} slower than {S2_SLOW_US / 1e6:.1f} s "
              f"({slow_total_s:.1f} s in them; {longest_txt}); {landed}; flush_errors "
              f"{m['flush_errors']}")
    ctx.rows.append(Row("S2", what_p99, "same reads before the outage p99", b["p99_co_us"],
                        o["p99_co_us"], "us", "<= 3x", o["p99_co_us"] <= 3 * b["p99_co_us"],
                        f"{common}; p99 corrected for coordinated omission (raw p99 before "
                        f"{b['p99_us']:.0f} us, during {o['p99_us']:.0f} us); p50 before "
                        f"{b['p50_us']:.0f} us, during {o['p50_us']:.0f} us; reads over 20 ms "
                        f"before {b['over_20ms']}, during "
                        f"{o['over_20ms']}{bad}"))
    ctx.rows.append(Row("S2", what_max, "same reads, max before", b["max_us"] / 1000,
                        o["max_us"] / 1000, "ms", f"<= {S2_SLOW_US / 1000:.0f} ms",
                        o["max_us"] <= S2_SLOW_US,
                        f"{common}; max per shard {per_shard[0]['max_us'] / 1000:.0f} / "
                        f"{per_shard[1]['max_us'] / 1000:.0f} ms; after the restart: "
                        f"p99 {a['p99_us']:.0f} us raw, max {a['max_us'] / 1000:.0f} ms{bad}"))
