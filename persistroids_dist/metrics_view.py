"""``Metrics``: what ``Cache.metrics()`` and ``Cache.shutdown()`` return.

It is the plain ``{"total": {...}, "shards": [...]}`` dict those calls always returned (a
``dict`` subclass, so every caller that indexes, compares or serializes it keeps working),
with two additions for notebooks: ``_repr_html_`` (Jupyter renders the counters as tables)
and ``to_frame()`` (the per-shard records as a pandas DataFrame).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is optional: imported by to_frame() only
    import pandas

__all__ = ["Metrics"]

#: The counters shown in the summary and per-shard tables, in this order: reads, writes, the
#: flushes that carry writes to the stores, and what each shard holds.
ALWAYS = ("lookup", "hits", "misses", "read", "write", "updates", "flush", "flush_calls",
          "pending", "entries", "bytes")
#: Shown after those only where they are not 0, so that a healthy cache's tables stay narrow:
#: deletes, evictions, what went wrong, and shards Ray restarted.
IF_NONZERO = ("deletes", "evictions", "flush_errors", "read_errors", "write_errors",
              "dead_letters_held", "unwritten", "restarts")


class Metrics(dict[str, Any]):
    """The metrics of a cache: ``{"total": {counter: sum over shards}, "shards": [...]}``.

    A ``dict`` with the keys and values ``Cache.metrics()`` documents; ``total`` and each
    record in ``shards`` are plain dicts. Jupyter renders it as a summary of ``total`` with
    the hit rate (``hits / lookup``), a table with one row per shard, and every counter of
    ``total`` in a collapsed list; ``repr()`` and ``print()`` show the dict as before.
    """

    @property
    def total(self) -> dict[str, Any]:
        """The counters summed over the shards (``self["total"]``; empty if absent)."""
        return self.get("total") or {}

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The per-shard records (``self["shards"]``; empty if absent)."""
        return list(self.get("shards") or [])

    def to_frame(self) -> pandas.DataFrame:
        """The per-shard records as a pandas DataFrame: one row per shard, indexed by shard
        number, one column per metric. Raises ImportError if pandas is not installed."""
        try:
            import pandas
        except ImportError as e:
            raise ImportError("Metrics.to_frame() needs pandas, which is not installed: "
                              "pip install pandas (or persistroids-dist[notebooks])") from e
        rows = self.shards
        frame = pandas.DataFrame.from_records(rows) if rows else pandas.DataFrame()
        if "shard" in frame.columns:
            frame = frame.set_index("shard")
        return frame

    def _repr_html_(self) -> str:
        total, shards = self.total, self.shards
        parts = ["<div>"]
        if total:
            head = _columns([total])
            parts.append(f"<p><b>Cache metrics</b>, summed over {len(shards)} shard(s):</p>")
            parts.append(_table(["hit rate", *head],
                                [[_hit_rate(total), *(total[k] for k in head)]]))
        if shards:
            cols = _columns(shards)
            if any(m.get("role", "primary") != "primary" for m in shards):
                cols.append("role")  # a backup that took over, or one not promoted yet
            rows = [[m.get("shard", i), _hit_rate(m), _short(m.get("node_id")),
                     str(m.get("pid", "")), *(m.get(k, "") for k in cols)]
                    for i, m in enumerate(shards)]
            parts.append("<p>Per shard:</p>")
            parts.append(_table(["shard", "hit rate", "node", "pid", *cols], rows))
        if total:
            rest = sorted(total.items())
            parts.append(f"<details><summary>All {len(rest)} counters of total</summary>"
                         + _table(["counter", "value"], [list(kv) for kv in rest]) + "</details>")
        parts.append("</div>")
        return "\n".join(parts)


def _columns(records: list[dict[str, Any]]) -> list[str]:
    """The counters of ALWAYS that any record has, then those of IF_NONZERO that any record
    has with a value other than 0."""
    return ([k for k in ALWAYS if any(k in m for m in records)]
            + [k for k in IF_NONZERO if any(m.get(k) for m in records)])


def _hit_rate(counters: Mapping[str, Any]) -> str:
    """``hits / lookup`` as a percentage ('' before the first read)."""
    lookups = counters.get("lookup") or 0
    return f"{100 * (counters.get('hits') or 0) / lookups:.1f}%" if lookups else ""


def _short(node_id: Any) -> str:
    # Ray node ids are 56 hex digits; 8 tell the nodes of a cluster apart.
    return node_id[:8] if isinstance(node_id, str) else ""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return html.escape(str(value))


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    # No styling of its own: Jupyter's stylesheet formats plain tables.
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
