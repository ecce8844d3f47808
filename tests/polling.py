"""Waiting for a condition in tests without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: Callable[[], T], timeout: float = 20.0, every: float = 0.05) -> T:
    """Call ``what`` every ``every`` s until it returns something true, and return that;
    after ``timeout`` s return its last (false) answer, for the caller's assertion."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)
