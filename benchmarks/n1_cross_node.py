"""N1, a read from another node: ``cache.read`` of a key held in its shard, over TCP as a
client on another node reaches it, against a redis-py GET over TCP loopback (issue 9).

Both are timed in one Ray task that takes itself for a process on another node (it sees a
node id no shard has), so its connections go over TCP to the shards' node address; the
task checks that they did. On one host that is TCP over loopback, as the anchor is: what it
measures is our protocol and server over TCP against Redis's, not a network.

N1-TLS is the same read from a cache made with ``init(tls=...)`` (a throwaway CA and node
certificate made with ``openssl``), so the read goes over TCP inside mutual TLS; Redis stays
plain TCP, timed again in the same task. Its ratio against N1's says what TLS costs a read.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import ray

import persistroids_dist as pd
from benchmarks.harness import Ctx, Row, case, lat_summary, pctl, zero
from persistroids_dist.codec import encode_value
from persistroids_dist.tls import make_test_certificates


@ray.remote(num_cpus=0, max_retries=0)
def _reader(cache: Any, key: str, redis_url: str, rkey: str, n: int, n_rounds: int
            ) -> tuple[str, bool, list[int], list[int], list[list[float]]]:
    import redis

    from persistroids_dist import control

    control._NODE_ID[:] = ["another-node"]  # what a process on another node sees
    for shard in range(cache.num_shards):  # a reused worker may hold Unix connections
        cache._pool.drop(shard)
    r = redis.Redis.from_url(redis_url, socket_timeout=30)
    read, get = cache.read, r.get
    for _ in range(200):  # warm connections and caches
        read(key)
        get(rkey)
    conn = cache._pool.conns[cache.shard_of(key)]
    transport, tls = conn.transport, conn.tls
    ours: list[int] = []
    theirs: list[int] = []
    p50s: list[list[float]] = []
    pc = time.perf_counter_ns
    for _ in range(n_rounds):
        round_p50 = []
        for fn, out in ((lambda: read(key), ours), (lambda: get(rkey), theirs)):
            samples = []
            gc.disable()
            try:
                for _ in range(n):
                    t = pc()
                    fn()
                    samples.append(pc() - t)
            finally:
                gc.enable()
            out.extend(samples)
            round_p50.append(pctl(samples, 50) / 1000)
        p50s.append(round_p50)
    return transport, tls, ours, theirs, p50s


@case("N1")
def n1_cross_node(ctx: Ctx) -> None:
    """Latency of one cache.read over TCP (another node's view) vs a Redis GET over TCP."""
    cache = ctx.shared_cache()
    key = f"{ctx.tag}:n1"
    rkey = f"{ctx.rprefix}n1"
    cache.write(key, 12345, wait=True)
    ctx.redis.set(rkey, encode_value(12345))
    transport, tls, ours, theirs, p50s = ray.get(_reader.remote(
        cache, key, ctx.redis_url, rkey, ctx.pick(3_000, 1_000), ctx.pick(5, 3)), timeout=600)
    o, g = lat_summary(ours), lat_summary(theirs)
    ctx.details["N1"] = {"transport": transport, "tls": tls,
                         "latency": {"ours": o, "redis": g}, "p50_us_per_round": p50s}
    ok = transport == "tcp" and not tls and o["p50_us"] <= g["p50_us"]
    ctx.rows.append(Row("N1", "read over TCP from another node p50 (us)",
                        "redis-py GET p50 (TCP)", g["p50_us"], o["p50_us"], "us", "<= 1x", ok,
                        f"transport {transport}; ours p99 {o['p99_us']:.0f} us; GET p99 "
                        f"{g['p99_us']:.0f} us"))

    # N1-TLS: the same read from a cache whose TCP path is mutual TLS.
    certs = make_test_certificates(os.path.join(ctx.tmpdir, "n1-tls"))
    tls_cache = pd.init(init_fn=zero, num_shards=2, name=f"bench-tls-{ctx.tag}", tls=certs)
    ctx.caches.append(tls_cache)
    tls_cache.write(key, 12345, wait=True)
    transport, tls, ours, theirs, p50s = ray.get(_reader.remote(
        tls_cache, key, ctx.redis_url, rkey, ctx.pick(3_000, 1_000), ctx.pick(5, 3)),
        timeout=600)
    t, g = lat_summary(ours), lat_summary(theirs)
    ctx.details["N1-TLS"] = {"transport": transport, "tls": tls,
                             "latency": {"ours": t, "redis": g}, "p50_us_per_round": p50s}
    check = "" if transport == "tcp" and tls else "CHECK FAILED: not over TLS; "
    ctx.rows.append(Row("N1-TLS", "read over TCP+TLS from another node p50 (us)",
                        "redis-py GET p50 (TCP)", g["p50_us"], t["p50_us"], "us", "-", None,
                        f"{check}transport {transport}, tls {tls}; "
                        f"{t['p50_us'] / o['p50_us']:.2f}x "
                        f"N1's plain TCP read; ours p99 {t['p99_us']:.0f} us; GET p99 "
                        f"{g['p99_us']:.0f} us"))
