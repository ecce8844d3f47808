"""K1: tuple keys against string keys and Redis MGET, garbage collector on.

Run by ``python -m benchmarks.run --only K1``. Measured in one run over the run's shared 4-shard
cache, with Python's cyclic garbage collector left ON (as a task handling Ray Data batches runs).
The operations take turns batch by batch, so that load from elsewhere on a shared machine falls
on all of them alike and the ratios hold even where the absolute rates wander:

* ``read_many`` / ``write_many`` of 1,000 tuple keys ``("user", i)`` against the same calls with
  the string keys ``f"user:{i}"`` (target: tuple keys at >= 0.8x the string keys' rate);
* ``read_many`` of those 1,000 tuple keys against Redis ``MGET`` of 1,000 keys (target >= 1.5x);
* ``encode_key`` alone, tuple against string keys (reported, no target).

Redis keys get the run's unique prefix and are deleted at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.harness import Ctx, Row, case, med, pc, rounds
from persistroids_dist.codec import decode_value, encode_key, encode_value


@case("K1")
def k1_tuple_keys(ctx: Ctx) -> None:
    """Tuple keys against string keys and Redis MGET, 1,000 keys per batch, GC on."""
    cache = ctx.shared_cache()
    size = 1000
    reps = ctx.pick(100, 30)
    n_rounds = ctx.pick(5, 3)
    tkeys = [("user", i) for i in range(size)]
    skeys = [f"user:{i}" for i in range(size)]
    rkeys = [f"{ctx.rprefix}k1:user:{i}".encode() for i in range(size)]
    titems = [(k, i) for i, k in enumerate(tkeys)]
    sitems = [(k, i) for i, k in enumerate(skeys)]
    r = ctx.redis
    r.mset({k: encode_value(i) for i, k in enumerate(rkeys)})
    try:
        cache.write_many(titems)
        cache.write_many(sitems)
        ops: dict[str, Callable[[], Any]] = {
            "write_many tuple": lambda: cache.write_many(titems),
            "write_many str": lambda: cache.write_many(sitems),
            "read_many tuple": lambda: cache.read_many(tkeys),
            "read_many str": lambda: cache.read_many(skeys),
            "mget": lambda: r.mget(rkeys),
            "encode_key tuple": lambda: [encode_key(k) for k in tkeys],
            "encode_key str": lambda: [encode_key(k) for k in skeys],
        }
        for _ in range(3):  # warm connections, shard dictionaries and Redis
            for fn in ops.values():
                fn()
        rate: dict[str, list[float]] = {name: [] for name in ops}
        for _ in rounds(ctx, n_rounds):
            spent = dict.fromkeys(ops, 0.0)
            for _ in range(reps):  # GC stays on: no gc.disable() here
                for name, fn in ops.items():
                    t = pc()
                    fn()
                    spent[name] += pc() - t
            for name, s in spent.items():
                rate[name].append(reps * size / s)
        ok = (cache.read_many(tkeys) == list(range(size))
              and cache.read_many(skeys) == list(range(size))
              and [decode_value(v) for v in r.mget(rkeys)] == list(range(size)))
    finally:
        r.delete(*rkeys)
    m = {name: med(v) for name, v in rate.items()}
    ctx.details["K1"] = {"keys_per_s": rate, "median_keys_per_s": m, "batches_per_round": reps,
                         "gc": "on", "values_ok": ok}
    checked = "values read back " + ("exact" if ok else "WRONG")
    note = f"GC on; {reps} batches of {size:,}/round, interleaved; {checked}"
    for op in ("read_many", "write_many"):
        ours, anchor = m[f"{op} tuple"], m[f"{op} str"]
        ctx.rows.append(Row("K1", f"{op} 1k tuple keys (keys/s)", f"{op} 1k str keys",
                            anchor, ours, "/s", ">= 0.8x", ours / anchor >= 0.8, note))
    ours, anchor = m["read_many tuple"], m["mget"]
    ctx.rows.append(Row("K1", "read_many 1k tuple keys (keys/s)", "Redis MGET 1k keys",
                        anchor, ours, "/s", ">= 1.5x", ours / anchor >= 1.5,
                        f"{note}; str keys: {m['read_many str'] / anchor:.2f}x MGET"))
    ctx.rows.append(Row("K1", "encode_key, tuple keys (keys/s)", "encode_key, str keys",
                        m["encode_key str"], m["encode_key tuple"], "/s", "-", None,
                        "in-process, no I/O; reported, no target"))
