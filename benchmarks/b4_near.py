"""B4, near-cache hit: near.read(k) of a near-cached key against a plain dict get."""

from __future__ import annotations

from benchmarks.harness import Ctx, Row, case, no_gc, pc_ns, pctl, rounds


@case("B4")
def b4_near_hit(ctx: Ctx) -> None:
    """near.read(k) of a near-cached key vs a plain dict get (per call, timed in batches)."""
    cache = ctx.shared_cache()
    batch = 1000
    n_batches = ctx.pick(300, 100)
    n_rounds = ctx.pick(5, 3)
    key = f"{ctx.tag}:b4"
    cache.write(key, 42, wait=True)
    near = cache.near(lease_ms=50)
    nread = near.read
    d = {key: 42}
    dget = d.get
    nc = near._near  # the process-local near cache (read for its hit counters only)
    h0, m0 = nc.hits, nc.misses
    ours: list[float] = []
    plain: list[float] = []
    rng = range(batch)
    for _ in rounds(ctx, n_rounds):
        with no_gc():
            for _ in range(n_batches):
                t = pc_ns()
                for _ in rng:
                    nread(key)
                ours.append((pc_ns() - t) / batch / 1000)
                t = pc_ns()
                for _ in rng:
                    dget(key)
                plain.append((pc_ns() - t) / batch / 1000)
    hits, misses = nc.hits - h0, nc.misses - m0
    o = {"p50_us": pctl(ours, 50), "p99_us": pctl(ours, 99)}
    a = {"p50_us": pctl(plain, 50), "p99_us": pctl(plain, 99)}
    hit_rate = hits / (hits + misses) if hits + misses else float("nan")
    ctx.details["B4"] = {"near_read": o, "dict_get": a, "batch": batch, "batches": len(ours),
                         "lease_ms": 50, "hits": hits, "misses": misses}
    ctx.rows.append(Row("B4", "near-cache hit p50 (us/call)", "dict.get p50", a["p50_us"],
                        o["p50_us"], "us", "<= 2 us", o["p50_us"] <= 2.0,
                        f"batches of {batch}; lease_ms=50, hit rate {hit_rate:.4%} "
                        f"({misses} misses = lease renewals); p99 {o['p99_us']:.2f} us"))
