"""A pipeline that counts events exactly once, whatever is killed while it runs.

It consumes numbered events (event ``i`` adds 1 to counter ``key(i)``), applies them in Ray
tasks through a checkpointed cache, and after every ``--every`` events takes a checkpoint
that records the offset reached. Killed at any point (this driver, a shard, the cache's
coordinator) and started again with the same arguments, it restores the last checkpoint,
which drops every increment made after it, and replays its input from the recorded offset:
every counter ends exact, in the cache and in the store.

    python examples/pipeline.py --name counts --store /tmp/counts.db --events 2000

It joins the Ray cluster in RAY_ADDRESS (or starts a local one); the cache is detached, so
it outlives a killed driver, and the next run finds it by name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import ray

import persistroids_dist as pd
from persistroids_dist.connectors.sqlite import SQLiteConnector

KEYS = 17  # counters


def key(i: int) -> str:
    return f"counter{(i * 7919) % KEYS}"


def expected(events: int) -> dict[str, int]:
    """What the counters must end at: each event counted once."""
    return dict(Counter(key(i) for i in range(events)))


def zero(_: object) -> int:
    return 0


def bump(v: int) -> int:
    return v + 1


@ray.remote(num_cpus=0, max_retries=0)
def apply(cache: pd.Cache, start: int, stop: int) -> int:
    """Apply events ``start`` to ``stop`` (not included)."""
    for i in range(start, stop):
        cache.update(key(i), "bump")
    return stop - start


def run(name: str, store: str, journal: str | bool, events: int, every: int,
        workers: int) -> int:
    pd.ensure_ray()
    cache = pd.init([SQLiteConnector(store)], name=name, num_shards=2, init_fn=zero,
                    functions={"bump": bump}, checkpoints=True, restore=True,
                    detached=True, journal=journal)
    last = cache.last_checkpoint()
    offset = last.state["offset"] if last is not None else 0
    print(f"resuming at event {offset}", flush=True)
    while offset < events:
        stop = min(offset + every, events)
        step = -(-(stop - offset) // workers)
        ray.get([apply.remote(cache, a, min(a + step, stop)) for a in range(offset, stop, step)])
        info = cache.checkpoint({"offset": stop})
        print(f"checkpoint {info.id}: offset {stop}, pause {info.pause_s * 1000:.1f} ms",
              flush=True)
        offset = stop
    print("done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="pipeline-counts")
    p.add_argument("--store", default=os.path.join(os.getcwd(), "pipeline-counts.db"))
    p.add_argument("--journal", default=None, help="journal folder (default: per cache)")
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="events per checkpoint")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    return run(a.name, a.store, a.journal or True, a.events, a.every, a.workers)


if __name__ == "__main__":
    sys.exit(main())
