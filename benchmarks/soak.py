"""Soak test (not in CI): minutes of mixed load on a sharded cache while shard processes are
SIGKILLed and the store is stopped and restarted; reports memory over time and anything lost.

    make soak                                   # 10 minutes, the defaults below
    .venv/bin/python -m benchmarks.soak [--minutes 10] [--workers 3] [--shards 2]
        [--kill-every 30] [--outage-every 60] [--outage-s 10] [--rate 1000] ...

Everything it uses is its own: a private local Ray (2 CPUs), a private ``redis-server`` on a
free port as the store (append-only file on, so a stopped server keeps what it stored), and a
journal in a temporary folder. It needs ``redis-server`` on the PATH. Nothing shared (the
PostgreSQL and Redis of the test suite) is touched.

Load: ``--workers`` Ray tasks run for ``--minutes``, each paced at ``--rate`` ops/s, mixing

- pipelined ``write`` of unique keys ``("soak", worker, i)``, acknowledged by ``sync()`` every
  ``--sync-every`` writes: a write counts as acknowledged only if the ``sync()`` that closes
  its batch returned and no call of the batch raised; otherwise every write of that batch
  counts as unknown (each may or may not have been applied);
- ``update(("ctr", j), bump)`` on ``--counters`` counters shared by all workers: acknowledged
  when it returned; refused when the shard answered that the store could not be read (the
  key was not cached during an outage: nothing applied); unknown when it raised anything
  else (UnacknowledgedWritesError, ShardUnavailableError, BackpressureError, ...: such an
  update may have been applied; the write batch it falls in counts as unknown too, to stay
  conservative);
- reads: of a random acknowledged key of the worker (must read back what was written) and of
  a counter (must never be lower than this worker saw it before: a regression). A read that
  fails because the store is down is expected during an outage (listed under read errors).

Chaos, from the driver: every ``--kill-every`` s one random shard process gets SIGKILL (Ray
restarts it and it replays its journal); every ``--outage-every`` s the redis-server is
stopped for ``--outage-s`` s (writes back up to ``--max-pending`` per shard, then writers
wait up to ``--backpressure-timeout`` s and get BackpressureError).

Reading the report. One line every ``--sample-every`` s::

    [ 35.0s] redis DOWN     ops/s   2,874 | s0 pid 4711* rss 142.1M pend 4,579/525k jrnl 681k
    dl 0 rst 1 | s1 ...

``ops/s`` is the calls the shards served since the last line (writes, updates, reads,
counted from their metrics; a restarted shard counts from 0); per shard:
its process id (``*``: a new process since the last line), resident memory (VmRSS), pending
keys/bytes of its write buffer, journal bytes on disk, dead letters, and how many times the
soak has seen it restarted (pid changes). Chaos events print as they happen. Memory should
level off once each shard's LRU is full (``--max-entries``); a restarted shard starts small
again, so look at the growth of the longest-lived process (``growth`` in the summary, MB per
minute over the second half of its samples), which stays near 0 without a leak. ``pend`` and
``jrnl`` rise during an outage and fall back to ~0 after it. The summary also counts the
flush processes seen (a shard's child that stores its large batches, so the soak's catch-up
flushes after an outage go through them) and their largest RSS.

At the end the store is back up, the soak waits for every buffer to drain, ``flush_now()``,
then checks every acknowledged write and counter against the redis-server itself (a fresh
RedisConnector) and through the cache:

- ``lost``: acknowledged writes whose key is missing or wrong (in the store / in the cache);
- counters ``lost`` (below the acknowledged increments) or ``applied twice`` (above the
  acknowledged plus unknown ones);
- ``read mismatches`` and counter ``regressions`` seen while running.

If a shard does not come back (Ray gives up on an actor whose restart raised), the soak
says so (``RUN INCOMPLETE``), checks the store anyway and counts the lost acknowledged writes
that are still in that shard's journal (acknowledged, never replayed).

It prints a summary (ops/s, kills, outages, the checks, max RSS per shard, RSS at start vs
end) and exits 1 if anything was lost, applied twice, read back wrong or went backwards, 2 if
the run itself failed and nothing lost was found (a worker died, a shard is gone, the buffers
never drained). On a non-zero exit it keeps its temporary folder (journals, the store's
append-only file) and prints where it is.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from typing import Any

import msgpack
import ray

import persistroids_dist as pd
from persistroids_dist.codec import encode_key, encode_value
from persistroids_dist.connectors.redis import RedisConnector
from persistroids_dist.connectors.testing import PrivateRedis


def store_error(e: BaseException) -> bool:
    """Whether ``e`` is the call's own failure to read the store (the store is down, or sent
    garbage): the shard answered, and a read inside ``update`` that failed wrote nothing.
    (An earlier pipelined write's refusal is reported by ``sync()``, never by this call.)"""
    if isinstance(e, pd.StoreDataError):
        return True
    return isinstance(e, ConnectionError) and not isinstance(e, pd.ShardUnavailableError)


def bump(v: int) -> int:
    return v + 1


def zero(args: Any) -> int:
    return 0


def value_of(wid: int, i: int, size: int) -> str:
    """The one value ever written to ``("soak", wid, i)``."""
    head = f"v{wid}.{i}."
    return head + "." * max(0, size - len(head))


def _err(counts: Counter, e: BaseException) -> None:
    counts[type(e).__name__] += 1


# -- the workers -------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_retries=0)
def soak_worker(cache: pd.Cache, wid: int, deadline: float, rate: float, sync_every: int,
                counters: int, value_bytes: int, seed: int) -> dict[str, Any]:
    """Mixed load until ``deadline`` (wall clock); returns what was acknowledged."""
    rng = random.Random(seed)
    acked = array("q")  # indexes i of ("soak", wid, i) acknowledged by a sync()
    unknown = array("q")
    batch = array("q")
    tainted = False  # a call since the last sync raised: the batch's outcome is unknown
    ctr_acked = [0] * counters
    ctr_unknown = [0] * counters
    ctr_refused = 0
    seen = [0] * counters  # highest counter value this worker has seen
    errors: dict[str, Counter] = {k: Counter() for k in ("write", "sync", "update", "read")}
    n = {"writes": 0, "updates": 0, "reads": 0, "read_checks": 0}
    mismatches: list[Any] = []
    regressions: list[Any] = []
    n_mismatch = n_regress = 0
    seq = 0

    def close_batch() -> None:
        nonlocal tainted
        try:
            cache.sync()
            ok = not tainted
        except Exception as e:
            _err(errors["sync"], e)
            ok = False
        (acked if ok else unknown).extend(batch)
        del batch[:]
        tainted = False

    try:
        cache.read_many([("ctr", j) for j in range(counters)])  # connect to every shard
    except Exception as e:
        _err(errors["read"], e)
    step = 1.0 / rate if rate > 0 else 0.0
    t_next = time.monotonic()
    t0 = time.time()
    while time.time() < deadline:
        if step:
            t_next += step
            now = time.monotonic()
            if t_next > now + 0.002:
                time.sleep(t_next - now)
            elif now - t_next > 1.0:  # fell behind: do not burst to catch up
                t_next = now
        r = rng.random()
        if r < 0.6:
            i = seq
            seq += 1
            batch.append(i)
            n["writes"] += 1
            try:
                cache.write(("soak", wid, i), value_of(wid, i, value_bytes))
            except Exception as e:
                _err(errors["write"], e)
                tainted = True
            if len(batch) >= sync_every:
                close_batch()
        elif r < 0.85:
            j = rng.randrange(counters)
            n["updates"] += 1
            try:
                v = cache.update(("ctr", j), bump)
                ctr_acked[j] += 1
                if v <= seen[j]:
                    n_regress += 1
                    if len(regressions) < 10:
                        regressions.append((("ctr", j), "update returned", v, "seen", seen[j]))
                seen[j] = max(seen[j], v)
            except Exception as e:
                _err(errors["update"], e)
                if store_error(e):
                    ctr_refused += 1  # the store read failed: not applied
                else:
                    # UNKNOWN: no answer (applied or not). The write batch counts as unknown
                    # too: conservative, since sync() (not this call) reports a refused
                    # pipelined write now.
                    ctr_unknown[j] += 1
                    tainted = True
        else:
            n["reads"] += 1
            try:
                if acked and rng.random() < 0.5:
                    i = acked[rng.randrange(len(acked))]
                    got = cache.read(("soak", wid, i))
                    n["read_checks"] += 1
                    if got != value_of(wid, i, value_bytes):
                        n_mismatch += 1
                        if len(mismatches) < 10:
                            mismatches.append((("soak", wid, i), repr(got)[:60]))
                else:
                    j = rng.randrange(counters)
                    v = cache.read(("ctr", j))
                    if v < seen[j]:
                        n_regress += 1
                        if len(regressions) < 10:
                            regressions.append((("ctr", j), "read", v, "seen", seen[j]))
                    seen[j] = max(seen[j], v)
            except Exception as e:
                _err(errors["read"], e)
                if not store_error(e):
                    tainted = True  # conservative: the connection may have broken
    close_batch()
    return {"wid": wid, "t0": t0, "t1": time.time(), **n, "acked": acked, "unknown": unknown,
            "ctr_acked": ctr_acked, "ctr_unknown": ctr_unknown,
            "ctr_refused": ctr_refused, "errors": {k: dict(v) for k, v in errors.items()},
            "mismatches": mismatches, "n_mismatch": n_mismatch,
            "regressions": regressions, "n_regress": n_regress}


# -- sampling ----------------------------------------------------------------------------------
def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _k(n: float) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n:.0f}"


class Sampler:
    """Per-shard memory and buffer state over time."""

    def __init__(self, num_shards: int) -> None:
        self.n = num_shards
        self.pids: list[int | None] = [None] * num_shards
        self.restarts = [0] * num_shards
        self.first_rss: list[float | None] = [None] * num_shards
        self.last_rss: list[float | None] = [None] * num_shards
        self.max_rss = [0.0] * num_shards
        # (shard, pid) -> [(t, rss), ...] and its journaled writes replayed at start
        self.lives: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self.replays: dict[tuple[int, int], int] = {}
        self.ops: dict[tuple[int, int], int] = {}
        self.last_t: float | None = None
        self.max_pending = [0] * num_shards
        self.max_journal = [0] * num_shards
        self.last: dict[str, Any] | None = None
        # Flush processes (a shard's child storing its large flushes) seen, and their RSS.
        self.flush_pids: set[int] = set()
        self.flush_max_rss = 0.0

    def sample(self, cache: pd.Cache, t: float, redis: PrivateRedis) -> dict[str, Any] | None:
        try:
            m = cache.metrics()
        except Exception as e:
            known = " ".join(f"s{s} pid {pid} rss {rss_mb(pid) or 0:.1f}M"
                             for s, pid in enumerate(self.pids))
            print(f"[{t:6.1f}s] metrics unavailable ({type(e).__name__}: {str(e)[:120]}); "
                  f"last known: {known}", flush=True)
            return None
        self.last = m
        parts = []
        served = 0
        for s, sm in enumerate(m["shards"]):
            pid = sm["pid"]
            new = self.pids[s] is not None and pid != self.pids[s]
            if new:
                self.restarts[s] += 1
            self.pids[s] = pid
            rss = rss_mb(pid) or 0.0
            if self.first_rss[s] is None:
                self.first_rss[s] = rss
            self.last_rss[s] = rss
            self.max_rss[s] = max(self.max_rss[s], rss)
            self.lives.setdefault((s, pid), []).append((t, rss))
            self.replays[(s, pid)] = sm.get("replayed", 0)
            # Client calls served: a read is a lookup, a write a write, an update both.
            ops = sm.get("write", 0) + sm.get("lookup", 0) - sm.get("updates", 0)
            served += ops - self.ops.get((s, pid), 0)
            self.ops[(s, pid)] = ops
            self.max_pending[s] = max(self.max_pending[s], sm.get("pending", 0))
            self.max_journal[s] = max(self.max_journal[s], sm.get("journal_bytes", 0))
            for fpid in (sm.get("flush_pids") or {}).values():
                if fpid is not None:
                    self.flush_pids.add(fpid)
                    self.flush_max_rss = max(self.flush_max_rss, rss_mb(fpid) or 0.0)
            parts.append(
                f"s{s} pid {pid}{'*' if new else ' '} rss {rss:5.1f}M "
                f"pend {sm.get('pending', 0):,}/{_k(sm.get('pending_bytes', 0))} "
                f"jrnl {_k(sm.get('journal_bytes', 0))} dl {sm.get('dead_letters', 0)} "
                f"rst {self.restarts[s]}")
        rate = served / (t - self.last_t) if self.last_t is not None and t > self.last_t else 0
        self.last_t = t
        r_rss = rss_mb(redis.proc.pid) if redis.proc is not None else None
        store = f"redis {'up' if redis.up else 'DOWN'}"
        if r_rss is not None:
            store += f" {r_rss:.0f}M"
        print(f"[{t:6.1f}s] {store:<14} ops/s {rate:7,.0f} | " + " | ".join(parts), flush=True)
        return m

    def replayed(self) -> int:
        return sum(self.replays.values())

    def longest_life(self) -> tuple[int, int, list[tuple[float, float]]] | None:
        """(shard, pid, its samples) of the longest-lived shard process."""
        if not self.lives:
            return None
        (s, pid), life = max(self.lives.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0])
        return s, pid, life


# -- chaos -------------------------------------------------------------------------------------
_warned: set[int] = set()


def kill_shard(cache: pd.Cache, rng: random.Random) -> tuple[int, int] | None:
    """SIGKILL a random shard's process; (shard, pid), or None if none could be picked now."""
    try:
        shards = cache.metrics()["shards"]
    except Exception:
        return None  # one is restarting: try again shortly
    s = rng.randrange(len(shards))
    pid = shards[s]["pid"]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if not cmdline.startswith(b"ray::") or b"ShardHost" not in cmdline:
        # Never signal a process that is not this shard (Ray titles it ray::_ActorShardHost).
        if pid not in _warned:
            _warned.add(pid)
            title = cmdline.replace(b"\0", b" ").strip()[:80]
            print(f"  (pid {pid} does not look like a shard process: {title!r}; not killed)")
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return s, pid


# -- checks ------------------------------------------------------------------------------------
def chunks(seq: list[Any], size: int = 5000):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


class Unreadable:
    """What the cache answered for a key whose shard could not be asked."""

    def __init__(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {str(error)[:80]}"

    def __repr__(self) -> str:
        return f"<unreadable: {self.error}>"


def cache_read_many(cache: pd.Cache, keys: list[Any]) -> list[Any]:
    """``cache.read_many``; if a shard cannot answer (gone for good), its keys are
    Unreadable and the other shards' keys are still read."""
    try:
        return cache.read_many(keys)
    except Exception:
        pass
    out: list[Any] = [None] * len(keys)
    groups: dict[int, list[int]] = {}
    for n, k in enumerate(keys):
        groups.setdefault(cache.shard_of(k), []).append(n)
    for idx in groups.values():
        try:
            got = cache.read_many([keys[n] for n in idx])
        except Exception as e:
            got = [Unreadable(e)] * len(idx)
        for n, v in zip(idx, got):
            out[n] = v
    return out


def journaled(journal_root: str) -> dict[bytes, bytes]:
    """Encoded key -> encoded value of every write left in the shards' journals (what a
    shard acknowledged and no flush stored, if the shard never came back to replay it)."""
    out: dict[bytes, bytes] = {}
    for folder, _, files in os.walk(journal_root):
        for name in sorted(files):
            if not name.endswith(".journal"):
                continue
            with open(os.path.join(folder, name), "rb") as f:
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
                unpacker.feed(f.read())
            try:
                for rec in unpacker:
                    if rec and rec[0] == 0:  # [WRITE, kb, ab, vb, ttl_s]
                        out[rec[1]] = rec[3]
            except Exception:  # a record cut off by the kill ends the segment
                pass
    return out


def check(cache: pd.Cache, probe: RedisConnector, results: list[dict[str, Any]],
          counters: int, value_bytes: int, journal_root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"acked": 0, "lost_store": 0, "lost_cache": 0, "unreadable": 0,
                           "examples": [], "unknown": 0, "unknown_landed": 0, "stranded": 0}
    left = None
    for res in results:
        wid = res["wid"]
        idx = list(res["acked"])
        out["acked"] += len(idx)
        for part in chunks(idx):
            keys = [("soak", wid, i) for i in part]
            want = [value_of(wid, i, value_bytes) for i in part]
            stored = probe.read_many(keys)
            cached = cache_read_many(cache, keys)
            for k, w, s, c in zip(keys, want, stored, cached):
                if s != w:
                    out["lost_store"] += 1
                    if left is None:
                        left = journaled(journal_root)
                    if left.get(encode_key(k)) == encode_value(w):
                        out["stranded"] += 1
                if isinstance(c, Unreadable):
                    out["unreadable"] += 1
                elif c != w:
                    out["lost_cache"] += 1
                if (s != w or c != w) and len(out["examples"]) < 10:
                    out["examples"].append((k, "store", repr(s)[:40], "cache", repr(c)[:60]))
        unk = list(res["unknown"])
        out["unknown"] += len(unk)
        for part in chunks(unk):
            stored = probe.read_many([("soak", wid, i) for i in part])
            out["unknown_landed"] += sum(
                s == value_of(wid, i, value_bytes) for i, s in zip(part, stored))
    keys = [("ctr", j) for j in range(counters)]
    stored = [v or 0 for v in probe.read_many(keys)]
    cached = cache_read_many(cache, keys)
    acked = [sum(r["ctr_acked"][j] for r in results) for j in range(counters)]
    unknown = [sum(r["ctr_unknown"][j] for r in results) for j in range(counters)]
    ctr_lost, ctr_twice = [], []
    for j in range(counters):
        for where, v in (("store", stored[j]), ("cache", cached[j])):
            if isinstance(v, Unreadable):
                continue
            if v < acked[j]:
                ctr_lost.append((("ctr", j), where, v, "acked", acked[j]))
            elif v > acked[j] + unknown[j]:
                ctr_twice.append((("ctr", j), where, v, "acked+unknown", acked[j] + unknown[j]))
    out.update(ctr_acked=sum(acked), ctr_unknown=sum(unknown), ctr_total=sum(stored),
               ctr_lost=ctr_lost, ctr_twice=ctr_twice)
    return out


# -- the run -----------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="duration of the load")
    p.add_argument("--workers", type=int, default=3, help="Ray worker tasks")
    p.add_argument("--shards", type=int, default=2, help="cache shards")
    p.add_argument("--kill-every", type=float, default=30.0,
                   help="SIGKILL a random shard every this many s (0: never)")
    p.add_argument("--outage-every", type=float, default=60.0,
                   help="stop the store every this many s (0: never)")
    p.add_argument("--outage-s", type=float, default=10.0, help="length of each store outage")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="ops/s per worker (0: as fast as it goes)")
    p.add_argument("--sync-every", type=int, default=50, help="writes per sync()")
    p.add_argument("--counters", type=int, default=32, help="shared counters")
    p.add_argument("--value-bytes", type=int, default=100, help="size of each written value")
    p.add_argument("--max-entries", type=int, default=50_000, help="LRU bound per shard")
    p.add_argument("--max-pending", type=int, default=5_000, help="write buffer bound per shard")
    p.add_argument("--backpressure-timeout", type=float, default=1.0,
                   help="how long a write waits for room in a full buffer")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--ray-logs", action="store_true", help="show the shards' and workers' logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="persistroids-soak-")
    os.makedirs(os.path.join(tmp, "redis"))
    redis = PrivateRedis(os.path.join(tmp, "redis"), appendonly=True)
    cache: pd.Cache | None = None
    code = 2
    try:
        redis.start()
        pd.ensure_ray(address="local", num_cpus=2, log_to_driver=args.ray_logs)
        prefix = f"soak-{uuid.uuid4().hex[:8]}:"
        cache = pd.init([RedisConnector(redis.url, prefix=prefix)], init_fn=zero,
                        num_shards=args.shards, journal=os.path.join(tmp, "journal"),
                        max_entries=args.max_entries, max_pending=args.max_pending,
                        backpressure_timeout_s=args.backpressure_timeout)
        code = run(args, seed, rng, cache, redis, prefix, os.path.join(tmp, "journal"))
        return code
    finally:
        if cache is not None:
            try:
                if not redis.up:
                    redis.start()
                cache.shutdown()
            except Exception as e:
                print(f"shutdown failed: {type(e).__name__}: {e}")
        redis.stop()
        if ray.is_initialized():
            ray.shutdown()
        if code == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # the journals and the store's append-only file, for a post-mortem
            print(f"kept {tmp} (journal/, redis/) for inspection; remove it when done")


def run(args: argparse.Namespace, seed: int, rng: random.Random, cache: pd.Cache,
        redis: PrivateRedis, prefix: str, journal_root: str) -> int:
    print(f"soak: {args.minutes:g} min, {args.workers} workers x {args.rate:g} ops/s, "
          f"{args.shards} shards, kill every {args.kill_every:g} s, outage every "
          f"{args.outage_every:g} s for {args.outage_s:g} s, seed {seed}; store {redis.url} "
          f"prefix {prefix}", flush=True)
    sampler = Sampler(args.shards)
    t0 = time.monotonic()
    duration = args.minutes * 60
    deadline = t0 + duration
    wall_deadline = time.time() + duration
    refs = [soak_worker.remote(cache, w, wall_deadline, args.rate, args.sync_every,
                               args.counters, args.value_bytes, seed + 1 + w)
            for w in range(args.workers)]
    inf = float("inf")
    next_sample = t0
    next_kill = t0 + args.kill_every if args.kill_every > 0 else inf
    next_outage = t0 + args.outage_every if args.outage_every > 0 else inf
    outage_end: float | None = None
    kills = outages = 0
    down_s = 0.0
    failed = ""
    while True:
        now = time.monotonic()
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) == len(refs):
            break
        if now > deadline + 300:
            failed = "the workers did not finish within 300 s of the deadline"
            break
        if now < deadline:
            if outage_end is None and now >= next_outage:
                redis.stop()
                outage_end = now + args.outage_s
                outages += 1
                next_outage += args.outage_every
                print(f"[{now - t0:6.1f}s] chaos: redis-server stopped for {args.outage_s:g} s",
                      flush=True)
            if now >= next_kill:
                hit = kill_shard(cache, rng)
                if hit is None:
                    next_kill = now + 1.0  # a shard is restarting: retry shortly
                else:
                    kills += 1
                    next_kill += args.kill_every
                    print(f"[{now - t0:6.1f}s] chaos: SIGKILL shard {hit[0]} (pid {hit[1]})",
                          flush=True)
        if outage_end is not None and now >= outage_end:
            redis.start()
            down_s += time.monotonic() - (outage_end - args.outage_s)
            outage_end = None
            print(f"[{time.monotonic() - t0:6.1f}s] chaos: redis-server started", flush=True)
        if now >= next_sample:
            sampler.sample(cache, now - t0, redis)
            next_sample += args.sample_every
        time.sleep(0.1)
    if outage_end is not None:
        redis.start()
        down_s += time.monotonic() - (outage_end - args.outage_s)
    results: list[dict[str, Any]] = []
    if not failed:
        try:
            results = ray.get(refs, timeout=60)
        except Exception as e:
            failed = f"a worker failed: {type(e).__name__}: {e}"
    if failed:
        print(f"RUN FAILED: {failed}")
        return 2
    t_load = max(r["t1"] for r in results) - min(r["t0"] for r in results)

    # Drain: every shard up, every buffer empty, then one explicit flush.
    print(f"[{time.monotonic() - t0:6.1f}s] load over; waiting for the buffers to drain",
          flush=True)
    drain_deadline = time.monotonic() + 300
    pending: int | None = None
    gone = ""  # a shard Ray will not bring back (its creation failed)
    while time.monotonic() < drain_deadline:
        try:
            pending = cache.metrics()["total"]["pending"]
        except pd.CacheClosedError as e:
            gone = str(e)
            time.sleep(3)  # the surviving shards' flush timers store their buffers meanwhile
            break
        except Exception:
            pending = None
        if pending == 0:
            break
        time.sleep(0.5)
    flushed = False
    for _ in range(0 if gone else 10):
        try:
            cache.flush_now()
            flushed = True
            break
        except Exception as e:
            print(f"  flush_now: {type(e).__name__}: {str(e)[:120]}", flush=True)
            time.sleep(2)
    final = sampler.sample(cache, time.monotonic() - t0, redis)
    incomplete = ""
    if gone:
        incomplete = f"a shard is gone for good, its journal never replayed: {gone}"
    elif pending != 0 or not flushed:
        incomplete = f"the buffers did not drain (pending {pending}, flushed {flushed})"
    if incomplete:
        print(f"RUN INCOMPLETE: {incomplete}; checking the store anyway", flush=True)
    try:
        dead = cache.dead_letters()
    except Exception:
        dead = []
    probe = RedisConnector(redis.url, prefix=prefix)
    probe.connect()
    try:
        c = check(cache, probe, results, args.counters, args.value_bytes, journal_root)
    finally:
        probe.disconnect()
    code = report(args, results, c, sampler, final, dead, t_load, kills, outages, down_s)
    if incomplete:
        print(f"RUN INCOMPLETE: {incomplete}")
        return code or 2
    return code


def report(args: argparse.Namespace, results: list[dict[str, Any]], c: dict[str, Any],
           sampler: Sampler, final: dict[str, Any] | None, dead: list[dict[str, Any]],
           t_load: float, kills: int, outages: int, down_s: float) -> int:
    writes = sum(r["writes"] for r in results)
    updates = sum(r["updates"] for r in results)
    reads = sum(r["reads"] for r in results)
    ops = writes + updates + reads
    errors: dict[str, Counter] = {}
    for r in results:
        for kind, counts in r["errors"].items():
            errors.setdefault(kind, Counter()).update(counts)
    n_mismatch = sum(r["n_mismatch"] for r in results)
    n_regress = sum(r["n_regress"] for r in results)
    total = (final or {}).get("total", {})
    print()
    print("== soak summary ==")
    print(f"load: {t_load:.0f} s, {args.workers} workers, {args.shards} shards: {ops:,} ops "
          f"({ops / t_load:,.0f}/s): {writes:,} writes, {updates:,} updates, {reads:,} reads")
    print(f"chaos: {kills} shard kills (restarts seen {sum(sampler.restarts)}, journaled "
          f"writes replayed {sampler.replayed():,}), {outages} store outages ({down_s:.0f} s "
          f"down); backpressure refusals {total.get('backpressure_refusals', 0)} (of the "
          f"surviving processes)")
    for kind in ("write", "sync", "update", "read"):
        if errors.get(kind):
            shown = ", ".join(f"{k} {v:,}" for k, v in errors[kind].most_common())
            print(f"  {kind} errors: {shown}")
    print(f"writes: {c['acked']:,} acknowledged: lost {c['lost_store']:,} in the store, "
          f"{c['lost_cache']:,} in the cache; {c['unknown']:,} unknown, of which "
          f"{c['unknown_landed']:,} landed")
    if c["stranded"] or c["unreadable"]:
        print(f"  of the lost in the store, {c['stranded']:,} are still in a shard's journal "
              f"(acknowledged, never replayed); {c['unreadable']:,} keys unreadable through "
              f"the cache (their shard is gone)")
    for ex in c["examples"]:
        print(f"  e.g. {ex}")
    refused = sum(r["ctr_refused"] for r in results)
    print(f"counters: {args.counters} keys, {c['ctr_acked']:,} acknowledged, "
          f"{c['ctr_unknown']:,} unknown and {refused:,} refused (store down) increments, "
          f"stored total {c['ctr_total']:,}: "
          f"lost {len(c['ctr_lost'])} keys, applied twice {len(c['ctr_twice'])} keys")
    for ex in (c["ctr_lost"] + c["ctr_twice"])[:10]:
        print(f"  e.g. {ex}")
    checks = sum(r["read_checks"] for r in results)
    print(f"reads while running: {checks:,} read-backs of acknowledged writes, {n_mismatch:,} "
          f"mismatched; counter regressions {n_regress:,}")
    for r in results:
        for ex in r["mismatches"][:3] + r["regressions"][:3]:
            print(f"  e.g. worker {r['wid']}: {ex}")
    print(f"dead letters left: {len(dead)}")
    for s in range(args.shards):
        print(f"memory shard {s}: RSS start {sampler.first_rss[s] or 0:.1f} MB, end "
              f"{sampler.last_rss[s] or 0:.1f} MB, max {sampler.max_rss[s]:.1f} MB; max pending "
              f"{sampler.max_pending[s]:,} keys, max journal {sampler.max_journal[s] / 1e6:.1f} "
              f"MB")
    print(f"flush processes: {len(sampler.flush_pids)} seen (one per shard process "
          f"that flushed a large batch), max RSS {sampler.flush_max_rss:.1f} MB")
    longest = sampler.longest_life()
    if longest is not None and len(longest[2]) >= 3:
        s, pid, life = longest
        (t_a, first), (t_m, mid), (t_z, last) = life[0], life[len(life) // 2], life[-1]
        slope = (last - mid) / ((t_z - t_m) / 60) if t_z > t_m else 0.0
        print(f"growth: longest-lived shard process (shard {s}, pid {pid}, "
              f"{(t_z - t_a) / 60:.1f} min observed): {first:.1f} -> {mid:.1f} (half-way) -> "
              f"{last:.1f} MB; {slope:+.1f} MB/min over its second half")
    bad = (c["lost_store"] + c["lost_cache"] + c["unreadable"] + len(c["ctr_lost"])
           + len(c["ctr_twice"]) + n_mismatch + n_regress)
    if bad:
        print("RESULT: FAILED: something acknowledged was lost, applied twice, read back wrong "
              "or went backwards")
        return 1
    print("RESULT: OK: nothing acknowledged lost, nothing applied twice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
