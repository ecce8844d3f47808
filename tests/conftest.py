"""Shared fixtures. tests/unit runs without Ray or servers, tests/store needs PostgreSQL and
Redis, tests/cluster runs on one local Ray instance for the whole session (torn down at the
end)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import ray

import persistroids_dist as pd

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Shard journals of this session's caches go to a folder of its own (removed at the end), so
# a cache name reused by a later run never replays what a crashed test left behind.
_JOURNALS = tempfile.mkdtemp(prefix="persistroids-test-journals-")
os.environ["PERSISTROIDS_JOURNAL_DIR"] = _JOURNALS


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_JOURNALS, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    # Ray workers must import test modules that define connectors and functions they run.
    folders = [os.path.join(TESTS_DIR, d) for d in ("unit", "cluster", "store")]
    paths = [TESTS_DIR, *folders, os.path.dirname(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not ray.is_initialized():
        pd.ensure_ray(num_cpus=2)
    yield
    leftover = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == "persistroids"] if ray.is_initialized() else []
    ray.shutdown()
    assert not leftover, f"tests left cache actors running: {leftover}"


@pytest.fixture
def make_cache(ray_session):
    """Factory for caches that are shut down after the test even if it fails."""
    made: list[pd.Cache] = []

    def make(*args, **kwargs) -> pd.Cache:
        kwargs.setdefault("num_shards", 2)
        cache = pd.init(*args, **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        try:
            cache.shutdown()
        except pd.CacheClosedError:
            pass
        except Exception:
            # A test that left a failing store: force the actors away so the session ends clean.
            for actor in ray.get(cache._spec["coordinator"].shards.remote()):
                ray.kill(actor)
            ray.kill(cache._spec["coordinator"])


def services_required() -> bool:
    return os.environ.get("PERSISTROIDS_REQUIRE_SERVICES") == "1"
