"""The pipeline example (``examples/pipeline.py``) under real kills: its driver (a
subprocess), a shard or the cache's coordinator is SIGKILLed at a random moment, the driver
is started again until it finishes, and every counter must end exact, in the cache and in
the store. Randomized runs (seeds printed); ``PERSISTROIDS_PIPELINE_RUNS`` sets how many
(20 in CI, more in a long run)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
import ray
from sqlite_rows import stored

import persistroids_dist as pd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))
import pipeline  # noqa: E402

RUNS = int(os.environ.get("PERSISTROIDS_PIPELINE_RUNS", "20"))
EVENTS, EVERY = 1200, 200  # a batch takes ~70 ms here: most kills land inside one


def start_driver(name: str, store: str, journal: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "examples", "pipeline.py"), "--name", name,
         "--store", store, "--journal", journal, "--events", str(EVENTS), "--every",
         str(EVERY)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def victim_pid(rng: random.Random, name: str, driver: subprocess.Popen) -> tuple[str, int]:
    what = rng.choice(["driver", "shard", "coordinator"])
    if what == "driver":
        return what, driver.pid
    try:
        cache = pd.connect(name)
    except pd.CacheNotFoundError:  # the driver has not made it yet
        return "driver", driver.pid
    if what == "shard":
        return what, rng.choice([m["pid"] for m in cache.metrics()["shards"]])
    return what, ray.get(cache._pool.spec.coordinator.pid.remote())


@pytest.mark.parametrize("run", range(RUNS))
def test_the_pipeline_counts_exactly_once_through_random_kills(ray_session, tmp_path, run):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    store, journal = str(tmp_path / "store.db"), str(tmp_path / "journal")
    kills, starts = [], 0
    log = []
    try:
        while True:
            driver = start_driver(name, store, journal)
            starts += 1
            lines: list[str] = []
            if len(kills) < 2:  # at most two kills a run, then it must finish
                # Killed mid-run: after a random number of checkpoints, a random moment
                # into the next batch (or the checkpoint that ends it).
                after = rng.randrange(EVENTS // EVERY)
                for line in driver.stdout:
                    lines.append(line)
                    if line.startswith("checkpoint ") or line.startswith("resuming"):
                        after -= 1
                        if after < 0:
                            break
                time.sleep(rng.uniform(0.0, 0.06))
                if driver.poll() is None:
                    what, pid = victim_pid(rng, name, driver)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(what)
                    except ProcessLookupError:
                        pass
            out, _ = driver.communicate(timeout=300)
            out = "".join(lines) + out
            log.append(out[-2000:])
            if driver.returncode == 0 and "done" in out.splitlines():
                break
            assert starts < 8, f"seed {seed}: no finish after {starts} starts: {log[-1]}"
        cache = pd.connect(name)
        want = pipeline.expected(EVENTS)
        keys = sorted(want)
        assert cache.read_many(keys) == [want[k] for k in keys], (seed, kills)
        assert cache.last_checkpoint().state == {"offset": EVENTS}
        deadline = time.monotonic() + 30
        while stored(store) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stored(store) == want, (seed, kills)
        print(f"seed {seed}: kills {kills}, {starts} driver start(s)")
    finally:
        try:
            pd.connect(name).shutdown()
        except Exception:
            pass
