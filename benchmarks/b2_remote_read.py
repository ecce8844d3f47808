"""B2, one remote read: latency of cache.read of a key held in its shard, against a redis-py
GET and a bare Ray actor call."""

from __future__ import annotations

import ray

from benchmarks.harness import Ctx, Row, case, lat_summary, no_gc, pc_ns, pctl, rounds
from persistroids_dist.codec import encode_value


@ray.remote(num_cpus=0)
class _Echo:
    """A trivial actor: the cost of one Ray method call round trip."""

    def m(self) -> None:
        return None


@case("B2")
def b2_remote_read(ctx: Ctx) -> None:
    """Latency of one cache.read of a key held in its shard, vs Redis GET and a Ray call."""
    cache = ctx.shared_cache()
    n = ctx.pick(3_000, 1_000)
    n_ray = ctx.pick(500, 200)
    n_rounds = ctx.pick(5, 3)
    key = f"{ctx.tag}:b2"
    rkey = f"{ctx.rprefix}b2"
    cache.write(key, 12345, wait=True)
    r = ctx.redis
    r.set(rkey, encode_value(12345))
    echo = _Echo.remote()
    ray.get(echo.m.remote(), timeout=60)
    read, get = cache.read, r.get
    for _ in range(200):  # warm connections and caches
        read(key)
        get(rkey)
    lat: dict[str, list[int]] = {"ours": [], "redis": [], "ray": []}
    p50s: dict[str, list[float]] = {"ours": [], "redis": [], "ray": []}
    for _ in rounds(ctx, n_rounds):
        for name, fn, count in (("ours", lambda: read(key), n),
                                ("redis", lambda: get(rkey), n),
                                ("ray", lambda: ray.get(echo.m.remote()), n_ray)):
            samples = []
            with no_gc():
                for _ in range(count):
                    t = pc_ns()
                    fn()
                    samples.append(pc_ns() - t)
            lat[name].extend(samples)
            p50s[name].append(pctl(samples, 50) / 1000)
    ray.kill(echo)
    value_ok = cache.read(key) == 12345
    s = {k: lat_summary(v) for k, v in lat.items()}
    ctx.details["B2"] = {"latency": s, "p50_us_per_round": p50s, "value_ok": value_ok}
    o = s["ours"]
    note = f"ours p99 {o['p99_us']:.0f} us"
    ctx.rows.append(Row("B2", "remote read p50 (us)", "redis-py GET p50", s["redis"]["p50_us"],
                        o["p50_us"], "us", "<= 1x", o["p50_us"] <= s["redis"]["p50_us"],
                        f"{note}; GET p99 {s['redis']['p99_us']:.0f} us"))
    ctx.rows.append(Row("B2", "remote read p50 (us)", "Ray actor call p50", s["ray"]["p50_us"],
                        o["p50_us"], "us", "<= 0.25x",
                        o["p50_us"] <= 0.25 * s["ray"]["p50_us"],
                        f"{note}; Ray call p99 {s['ray']['p99_us']:.0f} us"))
