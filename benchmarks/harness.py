"""The benchmark harness: what every case module shares.

A case is a function ``fn(ctx)`` in its own module (``b1_seed_loop.py`` ... ``k1_keys.py``),
registered with ``@case("B1")``. It reads its sizes from ``ctx.pick(full, quick)``, runs its
rounds with ``rounds(ctx, n)`` (timed blocks under ``no_gc()``), appends its table lines to
``ctx.rows`` as :class:`Row` and its raw figures to ``ctx.details[name]``, and registers what it
creates (``ctx.pg_table``, ``ctx.caches``, Redis keys under ``ctx.rprefix``, files under
``ctx.tmpdir``) so that :func:`cleanup` removes it. ``benchmarks/run.py`` is the command line;
its docstring says how to read the table.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import ray
import redis

import persistroids_dist as pd

pc = time.perf_counter
pc_ns = time.perf_counter_ns


# -- results ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the results table."""

    case: str
    what: str
    anchor: str
    anchor_value: float | None
    ours: float | None
    unit: str
    target: str = "-"
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.anchor_value and self.ours is not None:
            return self.ours / self.anchor_value
        return None


@dataclass
class Ctx:
    """Settings and shared resources of one run."""

    quick: bool
    tag: str
    pg_dsn: str
    redis_url: str
    tmpdir: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    pg_tables: list[str] = field(default_factory=list)
    caches: list[pd.Cache] = field(default_factory=list)
    _shared: pd.Cache | None = None
    _redis: redis.Redis | None = None

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def budget_s(self) -> float:
        """Wall-clock budget of one case's rounds (at least one round always runs)."""
        return self.pick(75.0, 9.0)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=30)
        return self._redis

    @property
    def rprefix(self) -> str:
        return f"pdbench:{self.tag}:"

    def pg_table(self, name: str) -> str:
        table = f"pdbench_{self.tag}_{name}"
        self.pg_tables.append(table)
        return table

    def shared_cache(self) -> pd.Cache:
        """One in-memory-backed cache of 4 shards for B2-B5 (distinct keys per case)."""
        if self._shared is None:
            self._shared = pd.init(init_fn=zero, num_shards=4, name=f"bench-{self.tag}")
            self.caches.append(self._shared)
        return self._shared


def zero(args: Any) -> int:
    """init_fn of every benchmark cache: a missing key counts from 0."""
    return 0


# -- registry ---------------------------------------------------------------------------------
CaseFn = Callable[[Ctx], None]
CASES: dict[str, CaseFn] = {}  # case name -> function, in the order the modules register


def case(name: str) -> Callable[[CaseFn], CaseFn]:
    """Register the decorated function as case ``name`` (run.py runs them in that order)."""

    def register(fn: CaseFn) -> CaseFn:
        if name in CASES:
            raise ValueError(f"case {name} registered twice ({CASES[name]!r}, {fn!r})")
        CASES[name] = fn
        return fn

    return register


# -- measuring helpers ------------------------------------------------------------------------
@contextmanager
def no_gc() -> Iterator[None]:
    """Collect, then keep the cyclic GC off for the timed block only."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def pctl(samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``samples``."""
    s = sorted(samples)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))
    return s[i]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounds(ctx: Ctx, n: int) -> Iterator[int]:
    """Round numbers 0..n-1, stopping early (after one round) once the case budget is spent."""
    start = pc()
    for r in range(n):
        if r and pc() - start > ctx.budget_s:
            print(f"    (budget of {ctx.budget_s:.0f}s spent: {r} of {n} rounds)", flush=True)
            return
        yield r


def fmt(value: float | None, unit: str) -> str:
    """A figure with its unit, compactly."""
    if value is None or value != value:
        return "n/a"
    if unit == "/s":
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= div:
                return f"{value / div:.3g}{suffix}/s"
        return f"{value:.3g}/s"
    if unit == "us":
        return f"{value:.3g} us" if value < 100 else f"{value:.0f} us"
    if unit == "B":
        return f"{value:.1f} B"
    return f"{value:.3g} {unit}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def lat_summary(ns: list[int]) -> dict[str, float]:
    us = [x / 1000 for x in ns]
    return {"p50_us": pctl(us, 50), "p99_us": pctl(us, 99), "mean_us": statistics.fmean(us),
            "samples": len(us)}


def pg_connect(ctx: Ctx) -> psycopg.Connection[Any]:
    return psycopg.connect(ctx.pg_dsn, autocommit=True, connect_timeout=5)


# -- reports and cleanup ----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem / 2**30, 1)
            if mem else None, "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__}


def table_lines(rows: list[Row], markdown: bool = False) -> list[str]:
    head = ["case", "what", "anchor", "anchor fig.", "ours", "ratio", "target", "met"]
    body = []
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        body.append([r.case, r.what, r.anchor, fmt(r.anchor_value, r.unit), fmt(r.ours, r.unit),
                     fmt_ratio(r.ratio), r.target, met])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(b) + " |" for b in body]
        return out
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return out


def cleanup(ctx: Ctx) -> None:
    """Shut down caches, drop tables, delete Redis keys, remove temporary files."""
    for cache in list(ctx.caches):
        try:
            cache.shutdown()
        except Exception as e:
            print(f"cleanup: shutdown of {cache!r} failed: {e!r}", file=sys.stderr)
    ctx.caches.clear()
    if ctx.pg_tables:
        try:
            with pg_connect(ctx) as pg:
                for t in ctx.pg_tables:
                    pg.execute(f'DROP TABLE IF EXISTS "{t}"')  # our own generated names
        except Exception as e:
            print(f"cleanup: dropping PostgreSQL tables failed: {e!r}", file=sys.stderr)
    try:
        r = ctx.redis
        keys = list(r.scan_iter(match=ctx.rprefix + "*", count=10_000))
        for i in range(0, len(keys), 10_000):
            r.delete(*keys[i:i + 10_000])
        r.close()
    except Exception as e:
        print(f"cleanup: deleting Redis keys failed: {e!r}", file=sys.stderr)
    shutil.rmtree(ctx.tmpdir, ignore_errors=True)


def markdown_report(result: dict[str, Any], rows: list[Row]) -> str:
    """The results as a markdown page (run.py's docstring says how to read it)."""
    m = result["machine"]
    out = [
        "# persistroids-dist benchmark results",
        "",
        f"Run of {result['started']} ({'quick' if result['quick'] else 'full'} run, "
        f"{result['seconds']:.0f} s), `python -m benchmarks.run"
        f"{' --quick' if result['quick'] else ''}`.",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['memory_gb']} GB RAM, {m['platform']}, "
        f"Python {m['python']}, Ray {m['ray']}. PostgreSQL and Redis local (127.0.0.1). "
        f"1-minute load average at start / end: {m['loadavg_1m_start_end'][0]} / "
        f"{m['loadavg_1m_start_end'][1]} (other work shared the machine when above ~0.5).",
        "",
        "ratio = ours / anchor (throughput: higher is better; latency and memory: lower is "
        "better). Throughputs are medians over rounds, latencies p50 over all samples.",
        "",
        *table_lines(rows, markdown=True),
        "",
        "## Notes",
        "",
    ]
    out += [f"- **{r.case}** {r.what} vs {r.anchor}: {r.note}" for r in rows if r.note]
    met = [r for r in rows if r.met is not None]
    out += ["", f"Targets met: {sum(bool(r.met) for r in met)} of {len(met)}.", ""]
    return "\n".join(out)
