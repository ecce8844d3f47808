"""PostgreSQL connector: the contract against a real server, plus its specific behaviour."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from persistroids_dist.connectors.postgres import (
    DEFAULT_DSN,
    ENV_DSN,
    PostgresConnector,
    PostgresUnavailableError,
    mask_dsn,
)
from persistroids_dist.connectors.testing import (
    ConnectorContract,
    Outage,
    TcpProxy,
    require_service,
)
from persistroids_dist.shard import ShardCore

DSN = os.environ.get(ENV_DSN) or DEFAULT_DSN
_params = conninfo_to_dict(DSN)
HOST, PORT = str(_params.get("host", "127.0.0.1")), int(_params.get("port", 5432))
SECRET = "s3cret-pw-7731"


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(DSN, autocommit=True)


def _drop(*tables: str) -> None:
    try:
        with _admin() as c:
            for t in tables:
                c.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))
    except psycopg.Error:
        pass


@pytest.fixture(autouse=True)
def _need_postgres() -> None:
    require_service("PostgreSQL", HOST, PORT)


@pytest.fixture
def table() -> Iterator[str]:
    import uuid
    name = f"pt_{uuid.uuid4().hex[:12]}"
    yield name
    _drop(name)


class TestPostgresContract(ConnectorContract):
    duplicate_keys_in_batch = True

    def make_connector(self) -> PostgresConnector:
        return PostgresConnector(DSN, table=self.name, connect_timeout_s=2)

    def make_down_connector(self) -> PostgresConnector:
        return PostgresConnector(f"postgresql://postgres:{SECRET}@127.0.0.1:1/test",
                                 table=self.name, connect_timeout_s=1)

    def make_outage(self) -> Outage:
        proxy = TcpProxy(HOST, PORT).start()
        self.on_teardown(proxy.stop)
        dsn = make_conninfo(DSN, host="127.0.0.1", port=str(proxy.port))
        return Outage(PostgresConnector(dsn, table=self.name, connect_timeout_s=1), proxy.down)

    def secret_strings(self) -> list[str]:
        return [SECRET]

    def cleanup(self) -> None:
        _drop(self.name)


def test_jsonb_mode(table: str) -> None:
    conn = PostgresConnector(DSN, table=table, value_mode="jsonb")
    conn.connect()
    conn.flush([conn.write("u1", {"name": "Ada", "tags": ("a", "b"), "n": 1.5}),
                conn.write(("u", 2), [1, None, True])])
    assert conn.read("u1") == {"name": "Ada", "tags": ["a", "b"], "n": 1.5}  # JSON: a list
    assert conn.read_many([("u", 2), "nope"]) == [[1, None, True], None]
    with _admin() as c:  # the point of jsonb: queryable from SQL
        q = sql.SQL("SELECT v->>'name' FROM {} WHERE v ? 'name'").format(sql.Identifier(table))
        assert c.execute(q).fetchall() == [("Ada",)]
    for bad, match in ((b"bytes", "type bytes"), ({1: 2}, "keys must be str"),
                       ("a\x00b", "NUL"), (float("nan"), "cannot store nan")):
        with pytest.raises(TypeError, match=match):
            conn.write("k", bad)
    conn.disconnect()
    with pytest.raises(TypeError, match="needs bytea"):  # same table, wrong mode
        PostgresConnector(DSN, table=table).connect()


def test_maps_onto_an_existing_table(table: str) -> None:
    with _admin() as c:
        c.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text, profile jsonb)")
                  .format(sql.Identifier(table)))
        c.execute(sql.SQL("INSERT INTO {} VALUES (1, 'ada', '{{\"x\": 1}}')")
                  .format(sql.Identifier(table)))
    conn = PostgresConnector(DSN, table=table, key_columns=["id"], value_column="profile",
                             value_mode="jsonb")
    core = ShardCore([conn])
    assert core.get(1) == {"x": 1}  # a row written by another program
    core.put(1, {"x": 2})
    core.put(2, {"y": [1]})
    core.flush()
    assert conn.read_many([2, 1, 3]) == [{"y": [1]}, {"x": 2}, None]
    core.close(disconnect=True)
    with _admin() as c:  # other columns are left alone
        rows = c.execute(sql.SQL("SELECT id, name, profile FROM {} ORDER BY id")
                         .format(sql.Identifier(table))).fetchall()
    assert rows == [(1, "ada", {"x": 2}), (2, None, {"y": [1]})]


def test_maps_onto_a_composite_key(table: str) -> None:
    with _admin() as c:
        c.execute(sql.SQL("CREATE TABLE {} (tenant text, id bigint, data bytea NOT NULL, "
                          "PRIMARY KEY (tenant, id))").format(sql.Identifier(table)))
    conn = PostgresConnector(DSN, table=table, key_columns=["tenant", "id"],
                             value_column="data")
    conn.connect()
    conn.flush([conn.write(("acme", 1), (1, b"x")), conn.write(("acme", 2), "two")])
    assert conn.read(("acme", 1)) == (1, b"x")
    assert conn.read_many([("acme", 2), ("acme", 3)]) == ["two", None]
    with pytest.raises(ValueError, match="must be a tuple of 2 values"):
        conn.read("acme")
    conn.disconnect()


def test_mapping_errors_name_the_problem(table: str) -> None:
    with pytest.raises(LookupError, match="does not exist"):
        PostgresConnector(DSN, table=table, key_columns=["id"]).connect()
    with _admin() as c:
        c.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)")
                  .format(sql.Identifier(table)))
    with pytest.raises(LookupError, match=r"no column\(s\) \['nope'\]"):
        PostgresConnector(DSN, table=table, key_columns=["nope"]).connect()
    with pytest.raises(TypeError, match="is text"):
        PostgresConnector(DSN, table=table, key_columns=["id"]).connect()


def test_reconnects_after_backend_is_terminated(table: str) -> None:
    conn = PostgresConnector(DSN, table=table, pool_size=1)
    conn.connect()
    conn.flush([conn.write("a", 1)])
    pid = conn._run(lambda c: c.info.backend_pid)
    with _admin() as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
    time.sleep(0.1)
    assert conn.read("a") == 1  # retried once on a fresh connection
    new_pid = conn._run(lambda c: c.info.backend_pid)
    assert new_pid != pid
    pid = new_pid
    with _admin() as c:
        c.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.1)
    conn.flush([conn.write("b", 2)])  # a flush is retried too
    assert conn.read_many(["a", "b"]) == [1, 2]
    conn.disconnect()


def test_statement_timeout(table: str) -> None:
    conn = PostgresConnector(DSN, table=table, statement_timeout_ms=200)
    conn.connect()
    with _admin() as locker, locker.transaction():
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE")
                       .format(sql.Identifier(table)))
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            conn.read("k")
        assert time.monotonic() - start < 1.5  # not retried: a timeout is not a disconnect
    assert conn.read("k") is None  # the connection is still usable
    conn.disconnect()


def test_concurrent_first_connect_creates_the_table_once(table: str) -> None:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            c = PostgresConnector(DSN, table=table)
            c.connect()
            c.disconnect()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_schema_option(table: str) -> None:
    schema = table + "_s"
    with _admin() as c:
        c.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        conn = PostgresConnector(DSN, table="kv", schema=schema)
        conn.connect()
        conn.flush([conn.write("k", "v")])
        assert conn.read("k") == "v"
        assert conn.get_id() == f"postgres:{schema}.kv"
        conn.disconnect()
    finally:
        with _admin() as c:
            c.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.parametrize("kwargs, match", [
    ({"table": "kv; DROP TABLE x"}, "invalid PostgreSQL table name"),
    ({"table": "a" * 64}, "invalid PostgreSQL table name"),
    ({"schema": 'pub"lic'}, "invalid PostgreSQL schema name"),
    ({"key_columns": ["ok", "no-pe"]}, "invalid PostgreSQL key column name"),
    ({"key_columns": []}, "at least one column"),
    ({"value_column": "v v"}, "invalid PostgreSQL value column name"),
    ({"value_mode": "xml"}, "value_mode"),
    ({"pool_size": 0}, "pool_size"),
    ({"statement_timeout_ms": -1}, "statement_timeout_ms"),
])
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PostgresConnector(DSN, **kwargs)


def test_credentials_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql://bob:{SECRET}@127.0.0.1:1/db"
    assert SECRET not in mask_dsn(url)
    assert SECRET not in mask_dsn(f"host=x password={SECRET} port=1")
    assert SECRET not in mask_dsn(f"host=x password='{SECRET} x' port=1")
    conn = PostgresConnector(url, connect_timeout_s=0.5)
    assert SECRET not in repr(conn)
    with pytest.raises(PostgresUnavailableError) as info:
        conn.connect()
    assert "127.0.0.1:1/db" in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN") as bad:
        PostgresConnector(f"host=x password={SECRET} nonsense")
    assert SECRET not in str(bad.value)
    monkeypatch.setenv(ENV_DSN, f"postgresql://bob:{SECRET}@10.1.2.3:6543/envdb")
    from_env = PostgresConnector()
    assert "10.1.2.3:6543/envdb" in repr(from_env) and SECRET not in repr(from_env)
