"""What a SQLite store file holds, read with sqlite3 itself (not through the cache or a
connector): for tests that check what reached the store."""

from __future__ import annotations

import sqlite3

from persistroids_dist.codec import decode_value


def stored(path) -> dict:
    """The ``kv`` table at ``path``, decoded: ``{key: value}``; ``{}`` before the first flush
    created the table."""
    con = sqlite3.connect(path)
    try:
        return {decode_value(bytes(k)): decode_value(bytes(v))
                for k, v in con.execute("SELECT k, v FROM kv")}
    except sqlite3.OperationalError:  # no table yet: nothing stored
        return {}
    finally:
        con.close()
