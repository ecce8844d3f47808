"""B3, batches: read_many / write_many of 1,000 keys over 4 shards against Redis MGET / MSET."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.harness import Ctx, Row, case, med, no_gc, pc, rounds
from persistroids_dist.codec import decode_value, encode_value


@case("B3")
def b3_batches(ctx: Ctx) -> None:
    """read_many / write_many of 1,000 keys over 4 shards vs Redis MGET / MSET."""
    cache = ctx.shared_cache()
    size = 1000
    reps = ctx.pick(100, 30)
    n_rounds = ctx.pick(5, 3)
    keys = [f"{ctx.tag}:b3:{i}" for i in range(size)]
    rkeys = [f"{ctx.rprefix}b3:{i}".encode() for i in range(size)]
    items = [(k, i) for i, k in enumerate(keys)]
    mapping = {k: encode_value(i) for i, k in enumerate(rkeys)}
    r = ctx.redis
    cache.write_many(items)
    r.mset(mapping)
    per_shard = [0] * cache.num_shards
    for k in keys:
        per_shard[cache.shard_of(k)] += 1
    rate: dict[str, list[float]] = {"write_many": [], "read_many": [], "mset": [], "mget": []}
    ops: dict[str, Callable[[], Any]] = {
        "write_many": lambda: cache.write_many(items),
        "mset": lambda: r.mset(mapping),
        "read_many": lambda: cache.read_many(keys),
        "mget": lambda: r.mget(rkeys),
    }
    for _ in range(3):
        for fn in ops.values():
            fn()
    for _ in rounds(ctx, n_rounds):
        for name, fn in ops.items():
            with no_gc():
                t = pc()
                for _ in range(reps):
                    fn()
                rate[name].append(reps * size / (pc() - t))
    got = cache.read_many(keys)
    ok = got == list(range(size)) and [decode_value(v) for v in r.mget(rkeys)] == list(
        range(size))
    m = {k: med(v) for k, v in rate.items()}
    ctx.details["B3"] = {"keys_per_s": rate, "median_keys_per_s": m, "keys_per_shard": per_shard,
                         "batches_per_round": reps, "values_ok": ok}
    note = f"{reps} batches of {size:,}/round; keys per shard {per_shard}"
    ctx.rows.append(Row("B3", "write_many 1k keys (keys/s)", "Redis MSET 1k keys",
                        m["mset"], m["write_many"], "/s", ">= 500k/s",
                        m["write_many"] >= 500_000, note))
    ctx.rows.append(Row("B3", "read_many 1k keys (keys/s)", "Redis MGET 1k keys",
                        m["mget"], m["read_many"], "/s", ">= 500k/s",
                        m["read_many"] >= 500_000, "values read back " + ("exact" if ok else
                                                                          "WRONG")))
