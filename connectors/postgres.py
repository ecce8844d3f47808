"""PostgreSQL connector (psycopg 3 with a psycopg_pool connection pool per shard).

Default layout: a table ``(k BYTEA PRIMARY KEY, v BYTEA)`` of ``encode_value(args)`` and
``encode_value(value)``, created if absent. ``value_mode="jsonb"`` stores values as JSONB instead
(queryable from SQL; JSON types only: tuples come back as lists, dict keys must be str, no bytes).
``key_columns=[...]`` maps the cache onto an existing table instead: the read arguments are the
values of those columns (a scalar for one column, a tuple for several), so rows written by other
programs are read by the cache and vice versa; the table needs a unique constraint on them.

A flush is one transaction: the rows are COPYed (binary) into a session-local temporary table,
then upserted with ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``. Every statement runs under
``statement_timeout_ms``. After a dropped connection (server restart, ``pg_terminate_backend``)
the pool is rebuilt and the operation is retried once; a flush is an idempotent upsert, so the
retry is safe. Identifiers are validated and quoted; the password never appears in a repr or an
error raised here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from persistroids_dist.codec import decode_value, encode_value
from persistroids_dist.connector import BaseConnector

__all__ = ["DEFAULT_DSN", "ENV_DSN", "PostgresConnector", "PostgresUnavailableError", "mask_dsn"]

ENV_DSN = "PERSISTROIDS_PG_DSN"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_READ_CHUNK = 10000
_T = TypeVar("_T")


class PostgresUnavailableError(ConnectionError):
    """PostgreSQL could not be reached (the message names the server, never the password)."""


def mask_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL or ``key=value`` form)."""
    dsn = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn, flags=re.I)


def _check_ident(what: str, name: Any) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"invalid PostgreSQL {what} {name!r}: use 1 to 63 letters, digits and _, "
                         "not starting with a digit")
    return name


def _is_disconnect(e: psycopg.Error) -> bool:
    # No SQLSTATE: the socket broke; class 08: connection exception; 57P0x: the server shut
    # the session down (pg_terminate_backend, restart). 57014 (statement timeout) is not one.
    state = e.sqlstate
    return state is None or state.startswith("08") or state.startswith("57P")


def _check_json(value: Any, path: str = "value") -> Any:
    """Raise TypeError unless ``value`` can be stored as JSONB without silent changes."""
    t = type(value)
    if value is None or t in (bool, int):
        return value
    if t is float:
        if not math.isfinite(value):
            raise TypeError(f"{path}: JSONB cannot store {value!r}")
        return value
    if t is str:
        if "\x00" in value:
            raise TypeError(f"{path}: PostgreSQL JSONB cannot store NUL characters in strings")
        return value
    if t in (list, tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]")
        return value
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{path}: JSONB object keys must be str, got {k!r}")
            _check_json(k, f"{path} key")
            _check_json(v, f"{path}[{k!r}]")
        return value
    raise TypeError(f"{path}: JSONB mode cannot store a value of type {t.__qualname__} "
                    "(use value_mode='msgpack')")


class PostgresConnector(BaseConnector):
    """Persists the cache in a PostgreSQL table.

    ``dsn``: libpq URL or ``key=value`` string; default the environment variable
    ``PERSISTROIDS_PG_DSN``, else ``postgresql://postgres@127.0.0.1:5432/test``.
    ``table`` / ``schema``: the table (``schema`` default: the search path, normally public).
    ``pool_size``: connections per shard (a shard calls its connector from one thread, so 1-2).
    ``statement_timeout_ms``: per-statement limit (0: none).
    ``connect_timeout_s``: how long an operation waits for a connection before
    :class:`PostgresUnavailableError`.
    ``value_mode``: ``"msgpack"`` (BYTEA, any cache value) or ``"jsonb"``.
    ``key_columns`` / ``value_column``: map onto an existing table (see the module docstring);
    default one BYTEA column ``k`` and a value column ``v``.
    ``create_table``: create the default-layout table if absent (not with ``key_columns``).
    """

    flush_process_safe = True  # a server: a child process may flush (flushproc)

    def __init__(self, dsn: str | None = None, table: str = "persistroids_kv", *,
                 id: str | None = None, schema: str | None = None, pool_size: int = 2,
                 statement_timeout_ms: int = 30000, connect_timeout_s: float = 10.0,
                 value_mode: str = "msgpack", key_columns: str | Sequence[str] | None = None,
                 value_column: str = "v", create_table: bool = True) -> None:
        dsn = dsn if dsn is not None else os.environ.get(ENV_DSN) or DEFAULT_DSN
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, got {type(dsn).__qualname__}")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            msg = str(e).replace(dsn, mask_dsn(dsn))
            raise ValueError(f"invalid PostgreSQL DSN {mask_dsn(dsn)!r}: {msg}") from None
        self.table = _check_ident("table name", table)
        self.schema = None if schema is None else _check_ident("schema name", schema)
        if value_mode not in ("msgpack", "jsonb"):
            raise ValueError(f"value_mode must be 'msgpack' or 'jsonb', got {value_mode!r}")
        if isinstance(key_columns, str):
            key_columns = [key_columns]
        if key_columns is not None:
            key_columns = [_check_ident("key column name", c) for c in key_columns]
            if not key_columns:
                raise ValueError("key_columns must name at least one column")
        self.value_column = _check_ident("value column name", value_column)
        if key_columns is not None and value_column in key_columns:
            raise ValueError(f"value_column {value_column!r} is also a key column")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
        if not isinstance(statement_timeout_ms, int) or statement_timeout_ms < 0:
            raise ValueError(
                f"statement_timeout_ms must be an int >= 0, got {statement_timeout_ms!r}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {connect_timeout_s!r}")
        self._dsn = dsn
        self._password = params.get("password") or ""
        self._where = (f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
                       f"/{params.get('dbname', '')}")
        self.mapped = key_columns is not None
        self.key_columns: list[str] = list(key_columns) if key_columns is not None else ["k"]
        self.value_mode = value_mode
        self.create_table = create_table
        self.pool_size = pool_size
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_s = float(connect_timeout_s)
        qualified = f"{self.schema}.{self.table}" if self.schema else self.table
        self.id = id or f"postgres:{qualified}"
        self._pool: ConnectionPool | None = None
        self._ready = False  # table created/checked by connect()
        self._build_sql(qualified)

    # -- SQL, built once from validated identifiers --------------------------------------
    def _build_sql(self, qualified: str) -> None:
        tbl = (sql.Identifier(self.schema, self.table) if self.schema
               else sql.Identifier(self.table))
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key_columns))
        v = sql.Identifier(self.value_column)
        stage = sql.Identifier(
            "persistroids_stage_" + hashlib.sha1(qualified.encode()).hexdigest()[:16])
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %s").format(sql.Identifier(c)) for c in self.key_columns)
        vtype = sql.SQL("jsonb" if self.value_mode == "jsonb" else "bytea")
        self._regclass = (f'"{self.schema}"."{self.table}"' if self.schema
                          else f'"{self.table}"')
        self._sql_create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ({} bytea PRIMARY KEY, {} {} NOT NULL)"
        ).format(tbl, sql.Identifier(self.key_columns[0]), v, vtype)
        self._sql_read = sql.SQL("SELECT {} FROM {} WHERE {}").format(v, tbl, where)
        self._sql_read_many = sql.SQL("SELECT {}, {} FROM {} WHERE {} = ANY(%s)").format(
            sql.Identifier(self.key_columns[0]), v, tbl, sql.Identifier(self.key_columns[0]))
        # JSON travels as text and is cast once in the upsert (the staged column is text).
        staged_v = sql.SQL("{}::text AS {}").format(v, v) if self.value_mode == "jsonb" else v
        self._sql_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS "
            "SELECT {}, {} FROM {} WITH NO DATA").format(stage, keys, staged_v, tbl)
        cols = sql.SQL(", ").join(map(sql.Identifier, [*self.key_columns, self.value_column]))
        self._sql_copy = sql.SQL("COPY {} ({}) FROM STDIN{}").format(
            stage, cols, sql.SQL("" if self.mapped else " (FORMAT BINARY)"))
        cast_v = sql.SQL("{}::jsonb").format(v) if self.value_mode == "jsonb" else v
        self._sql_upsert = sql.SQL(
            "INSERT INTO {} ({}) SELECT {}, {} FROM {} "
            "ON CONFLICT ({}) DO UPDATE SET {} = EXCLUDED.{}"
        ).format(tbl, cols, keys, cast_v, stage, keys, v, v)
        self._copy_types = ["bytea", "text" if self.value_mode == "jsonb" else "bytea"]

    # -- pickling, repr, errors -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # pools and sockets stay in the process that opened them
        state["_ready"] = False
        return state

    def __repr__(self) -> str:
        return (f"PostgresConnector(server={self._where!r}, table={self.table!r}, "
                f"schema={self.schema!r}, value_mode={self.value_mode!r}, id={self.id!r})")

    def _scrub(self, text: str) -> str:
        text = mask_dsn(text)
        return text.replace(self._password, "***") if self._password else text

    def _unavailable(self, e: BaseException) -> PostgresUnavailableError:
        return PostgresUnavailableError(
            f"PostgreSQL at {self._where} is unavailable for {self.id}: "
            f"{type(e).__name__}: {self._scrub(str(e)).strip()}")

    # -- connections ----------------------------------------------------------------------
    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT set_config('statement_timeout', %s, false), "
                     "set_config('client_min_messages', 'warning', false)",
                     [f"{self.statement_timeout_ms}ms"])

    def _open_pool(self) -> ConnectionPool:
        pool = ConnectionPool(
            self._dsn, min_size=1, max_size=self.pool_size, open=False,
            kwargs={"autocommit": True, "application_name": "persistroids",
                    "connect_timeout": max(1, math.ceil(self.connect_timeout_s))},
            configure=self._configure, timeout=self.connect_timeout_s,
            name=f"persistroids-{self.table}")
        pool.open(wait=False)  # connecting happens in the background; calls wait for it
        self._pool = pool
        return pool

    def _reset_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.close(timeout=1.0)
            except Exception:  # closing a pool of dead connections must not mask the error
                pass

    def _run(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``fn`` on a pooled connection; rebuild the pool and retry once if it dropped."""
        for attempt in (0, 1):
            pool = self._pool or self._open_pool()
            try:
                with pool.connection() as conn:
                    return fn(conn)
            except PoolTimeout as e:
                # Nothing connected within connect_timeout_s; a fresh pool next time, so a
                # recovered server is used at once rather than after the pool's backoff.
                self._reset_pool()
                raise self._unavailable(e) from None
            except psycopg.OperationalError as e:
                if not _is_disconnect(e):
                    raise
                self._reset_pool()
                if attempt:
                    raise self._unavailable(e) from None
        raise AssertionError("unreachable")

    def connect(self) -> None:
        """Open the pool and create (or check) the table."""
        if self._ready:
            return
        try:
            self._run(self._setup)
        except BaseException:
            self._reset_pool()  # no pool threads left behind by a connector that failed
            raise
        self._ready = True

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            if self.create_table and not self.mapped:
                # Serialize concurrent CREATEs from several shards (they race on pg_type).
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self._regclass])
                conn.execute(self._sql_create)
            cols = dict(conn.execute(
                "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                [self._regclass]).fetchall())
        if not cols:
            hint = ("key_columns maps onto an existing table" if self.mapped
                    else "create it, or pass create_table=True")
            raise LookupError(f"PostgreSQL table {self._regclass} does not exist at "
                              f"{self._where} ({hint})")
        missing = [c for c in [*self.key_columns, self.value_column] if c not in cols]
        if missing:
            raise LookupError(f"PostgreSQL table {self._regclass} has no column(s) {missing}; "
                              f"its columns are {sorted(cols)}")
        want = "jsonb" if self.value_mode == "jsonb" else "bytea"
        if cols[self.value_column] != want:
            raise TypeError(f"column {self.value_column!r} of {self._regclass} is "
                            f"{cols[self.value_column]}, value_mode={self.value_mode!r} "
                            f"needs {want}")
        if not self.mapped and cols[self.key_columns[0]] != "bytea":
            raise TypeError(f"key column {self.key_columns[0]!r} of {self._regclass} is "
                            f"{cols[self.key_columns[0]]}, not bytea (use key_columns=...)")

    def disconnect(self) -> None:
        """Close the pool (a later call reconnects)."""
        self._reset_pool()
        self._ready = False

    # -- keys and values ------------------------------------------------------------------
    def _key(self, args: Any) -> tuple[Any, ...]:
        if not self.mapped:
            return (encode_value(args),)
        n = len(self.key_columns)
        if n == 1:
            return (args,)
        if not isinstance(args, (tuple, list)) or len(args) != n:
            raise ValueError(f"read arguments {args!r} must be a tuple of {n} values for "
                             f"key_columns {self.key_columns}")
        return tuple(args)

    def _decode(self, v: Any) -> Any:
        return decode_value(v) if self.value_mode == "msgpack" else v

    # -- the connector protocol -----------------------------------------------------------
    def read(self, args: Any) -> Any:
        """The value stored for ``args``, or None."""
        params = self._key(args)
        if not self._ready:
            self.connect()
        row = self._run(lambda conn: conn.execute(self._sql_read, params).fetchone())
        return None if row is None else self._decode(row[0])

    def read_many(self, args_list: Sequence[Any]) -> list[Any]:
        """The values for each of ``args_list`` (None where absent), one query per 10k keys."""
        if self.mapped and len(self.key_columns) > 1:
            return [self.read(a) for a in args_list]
        found = self._fetch_many([self._key(a)[0] for a in args_list])
        return [None if v is None else self._decode(v) for v in found]

    def read_many_encoded(self, encoded: Sequence[bytes]) -> list[bytes | None]:
        """The shard's fast path: stored msgpack bytes for each encoded key (None if absent)."""
        if self.mapped or self.value_mode != "msgpack":
            return [None if v is None else encode_value(v)
                    for v in self.read_many([decode_value(e) for e in encoded])]
        return self._fetch_many(list(encoded))

    def _fetch_many(self, keys: list[Any]) -> list[Any]:
        unique = list(dict.fromkeys(keys))

        def fetch(conn: psycopg.Connection[Any]) -> dict[Any, Any]:
            found: dict[Any, Any] = {}
            for i in range(0, len(unique), _READ_CHUNK):
                found.update(conn.execute(self._sql_read_many,
                                          [unique[i:i + _READ_CHUNK]]).fetchall())
            return found

        if unique and not self._ready:
            self.connect()
        found = self._run(fetch) if unique else {}
        return [found.get(k) for k in keys]

    def write(self, args: Any, value: Any) -> Any:
        # Validate and encode now, so bad input fails the write instead of a later flush.
        key = self._key(args)
        if self.value_mode == "jsonb":
            return (key, json.dumps(_check_json(value), ensure_ascii=False, allow_nan=False))
        return (key, encode_value(value))

    def write_encoded(self, args_bytes: bytes, value_bytes: bytes) -> Any:
        """The shard's fast path: in the default layout rows are the msgpack bytes it holds."""
        if self.mapped or self.value_mode != "msgpack":
            return self.write(decode_value(args_bytes), decode_value(value_bytes))
        return ((args_bytes,), value_bytes)

    def flush(self, payloads: list[Any]) -> None:
        """Upsert ``payloads`` in one transaction (COPY to a temp table, then one upsert)."""
        if not payloads:
            return
        if not self._ready:
            self.connect()
        # One row per key, the later payload winning (ON CONFLICT cannot touch a row twice).
        rows = dict(payloads)

        def op(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(self._sql_stage)
                with conn.cursor().copy(self._sql_copy) as copy:
                    if not self.mapped:
                        copy.set_types(self._copy_types)
                    for key, value in rows.items():
                        copy.write_row((*key, value))
                conn.execute(self._sql_upsert)

        self._run(op)
