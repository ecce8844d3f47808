"""`make demo` in small: its counts are exact in the cache and in SQLite (it exits non-zero
otherwise). Speed is for `make bench`; nothing here asserts it."""

from __future__ import annotations

import os
import subprocess
import sys

import persistroids_dist


def test_the_demo_counts_exactly():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(persistroids_dist.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    out = subprocess.run(
        [sys.executable, "-m", "persistroids_dist.demo", "--workers", "2", "--increments",
         "2000", "--keys", "5", "--no-postgres"],
        capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "exact: yes" in out.stdout
    assert "persisted exactly: yes" in out.stdout


def test_the_cluster_demo_loses_nothing_when_a_node_goes():
    # `make cluster-demo` in small: three simulated nodes, replicas=1, one node lost while
    # tasks write and count; it exits non-zero if anything acknowledged is missing.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(persistroids_dist.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    out = subprocess.run([sys.executable, "-m", "persistroids_dist.cluster_demo", "--keys",
                          "1500"], capture_output=True, text=True, timeout=600, cwd=repo,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "nothing acknowledged was lost" in out.stdout
    assert "failovers: 1" in out.stdout
