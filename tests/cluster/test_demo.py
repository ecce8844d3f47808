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
