"""A reusable contract suite for connectors, plus helpers for tests that need real services.

Run the contract against your own connector by subclassing :class:`ConnectorContract` in a
pytest module and providing ``make_connector()``::

    from persistroids_dist.connectors.testing import ConnectorContract

    class TestMyStore(ConnectorContract):
        def make_connector(self):
            # Every call within one test must return a NEW instance on the SAME store;
            # self.name and self.tmp_path are unique per test.
            return MyConnector(namespace=self.name)

        def cleanup(self):  # optional: drop what the test created
            drop_namespace(self.name)

Optional hooks: ``make_down_connector()`` (a store that is down from the start),
``make_outage()`` (a connector plus a context manager that takes its store away for a while),
``secret_strings()`` (text that must never appear in a repr or an error message) and the class
attributes below. A hook left undefined skips the tests that need it.

Connector methods may be coroutine functions; the suite runs them on an event loop of its own,
as ``ShardCore`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import inspect
import os
import pickle
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import pytest
except ImportError as e:  # a connector author's test helper, not a runtime dependency
    raise ImportError("persistroids_dist.connectors.testing needs pytest: "
                      "pip install 'persistroids-dist[test]'") from e

from persistroids_dist.codec import decode_value
from persistroids_dist.errors import FlushError
from persistroids_dist.shard import ShardCore

__all__ = ["ConnectorContract", "Outage", "PrivatePostgres", "PrivateRedis", "TcpProxy",
           "free_port", "pg_bin_dir", "require_service", "values_equal"]

#: Values every connector must round-trip exactly (None is excluded: it means "absent").
SAMPLE_VALUES: list[Any] = [
    0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 3.5, -0.25, 1e300, float("inf"),
    True, False, "", "text", "ünïcødé ✓ 🔑 \x00 nul", b"", b"\x00\xff\xfe binary",
    [], [1, "a", None, 2.5], {}, {"a": 1, "b": [1, 2]}, (1, 2), ("a", (1, (2, 3)), [4]),
    {"nested": {"deep": [(1, b"x"), {"k": None}]}}, {1: "int key", "s": 2},
]

#: Keys (read arguments) of different shapes; 1, 1.0, True and "1" must be distinct keys.
SAMPLE_KEYS: list[Any] = [
    "plain", "ключ 🔑", "../../etc/passwd", "a/b\\c:d*?", b"\x00\xff", b"", "",
    ("tuple", 1, (2.5, b"x")), 1, 1.0, True, "1", None, -5, ("a",), ["list", "args"],
]


def values_equal(a: Any, b: Any) -> bool:
    """Equality that also compares types: ``(1,) != [1]``, ``True != 1``, ``1.0 != 1``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def require_service(name: str, host: str, port: int, timeout_s: float = 1.0) -> None:
    """Return if ``host:port`` accepts TCP connections, else skip the test.

    With the environment variable ``PERSISTROIDS_REQUIRE_SERVICES=1`` a missing service fails
    the test instead, so CI cannot pass by silently skipping everything.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        message = f"{name} is not reachable at {host}:{port} ({e})"
    if os.environ.get("PERSISTROIDS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}; PERSISTROIDS_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(f"{message}; set PERSISTROIDS_REQUIRE_SERVICES=1 to fail instead")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the caller's own on a free port, stopped and started at will (for
    outage tests; never the shared server). With ``appendonly``, what it stored survives a
    stop (SIGTERM writes the append-only file out); without, it comes back empty."""

    def __init__(self, directory: str | os.PathLike[str], appendonly: bool = False) -> None:
        self.port = free_port()
        self.dir = os.fspath(directory)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @property
    def up(self) -> bool:
        """Whether this server is running (started and not stopped since)."""
        return self.proc is not None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        os.makedirs(self.dir, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else \
            ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # our own process, by its pid
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None


def pg_bin_dir() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl."""
    def version(path: str) -> tuple[int, ...]:
        v = path.split(os.sep)[-2]
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.access(os.path.join(d, "initdb"), os.X_OK)
             and os.access(os.path.join(d, "pg_ctl"), os.X_OK)]
    return max(found, key=version) if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of the caller's own (trust auth, 127.0.0.1, its own port; never the
    shared server), run as the user postgres when the caller runs as root (initdb refuses
    root). ``initdb()``, then ``start()``/``stop()`` at will; ``cleanup()`` stops it and
    removes its folder."""

    def __init__(self, bin_dir: str) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.as_root = os.getuid() == 0
        self.root = tempfile.mkdtemp(prefix="persistroids-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        if self.as_root:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False

    def _run(self, *argv: str, timeout: float = 60) -> None:
        cmd = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = ""
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    log = f.read()[-2000:]
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}\n{log}")

    def initdb(self) -> None:
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def start(self) -> None:
        opts = (f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c shared_buffers=16MB -c max_connections=30")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60",
                  "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
            self.running = False

    def cleanup(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self.running = True  # stop whatever is left, even after a failed start
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class TcpProxy:
    """A small TCP forwarder to simulate a network store going down and coming back.

    ``stop()`` refuses new connections and cuts the live ones, as a server restart would;
    ``start()`` listens again on the same port. Point the connector at ``self.port``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        lsock.settimeout(0.05)  # the accept loop polls, so stop() never waits on accept()
        self.port = lsock.getsockname()[1]
        self._listener = lsock
        threading.Thread(target=self._accept_loop, args=(lsock,), daemon=True).start()
        return self

    def stop(self) -> None:
        lsock, self._listener = self._listener, None
        if lsock is not None:
            lsock.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Within the block the proxied service is unreachable."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while self._listener is lsock:
            try:
                client, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._socks.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@dataclass
class Outage:
    """A connector on the test's store, and ``down()``: a context manager during which that
    store is unreachable (or refuses writes) for the connector."""

    connector: Any
    down: Callable[[], AbstractContextManager[Any]]


class ConnectorContract:
    """Base class of contract tests; subclass it (name starting with ``Test``) in a test module.

    Attributes a subclass may set:

    - ``values``: the values to round-trip (default :data:`SAMPLE_VALUES`).
    - ``keys``: the read arguments to use as keys (default :data:`SAMPLE_KEYS`).
    - ``huge_value_bytes``: size of the large-value case (default 5 MB; 0 skips it).
    - ``duplicate_keys_in_batch``: also require that a batch holding one key twice stores the
      later payload (ShardCore never does this; default False).
    """

    values: list[Any] = SAMPLE_VALUES
    keys: list[Any] = SAMPLE_KEYS
    huge_value_bytes: int = 5 * 1024 * 1024
    duplicate_keys_in_batch: bool = False

    # -- hooks ----------------------------------------------------------------------------
    def make_connector(self) -> Any:
        """Return a new, not yet connected connector on this test's store."""
        raise NotImplementedError("ConnectorContract subclasses must define make_connector()")

    def make_down_connector(self) -> Any:
        """Return a connector whose store is unreachable (e.g. a closed port)."""
        pytest.skip(f"{type(self).__name__} defines no make_down_connector()")

    def make_outage(self) -> Outage:
        """Return an :class:`Outage` on this test's store."""
        pytest.skip(f"{type(self).__name__} defines no make_outage()")

    def secret_strings(self) -> list[str]:
        """Strings (passwords) that must never appear in a repr or an error message."""
        return []

    def cleanup(self) -> None:
        """Remove what the test created in the store (called after each test)."""

    # -- fixture and helpers --------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _contract_setup(self, tmp_path: Path) -> Iterator[None]:
        self.name = f"t{uuid.uuid4().hex[:12]}"  # unique per test: table, prefix, ...
        self.tmp_path = tmp_path
        self._loop = asyncio.new_event_loop()
        self._opened: list[Any] = []
        self._teardown: list[Callable[[], Any]] = []
        try:
            yield
        finally:
            for conn in reversed(self._opened):
                with contextlib.suppress(Exception):
                    self.call(getattr(conn, "disconnect", lambda: None))
            for fn in reversed(self._teardown):
                with contextlib.suppress(Exception):
                    fn()
            self._loop.close()
            self.cleanup()

    def on_teardown(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` after the test (before ``cleanup()``)."""
        self._teardown.append(fn)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a connector method, running it to completion if it is a coroutine."""
        result = fn(*args)
        if inspect.isawaitable(result):
            result = self._loop.run_until_complete(result)
        return result

    def connected(self, conn: Any = None) -> Any:
        """``conn`` (default: a new connector), connected; disconnected after the test."""
        conn = self.make_connector() if conn is None else conn
        connect = getattr(conn, "connect", None)
        if connect is not None:
            self.call(connect)
        self._opened.append(conn)
        return conn

    def store(self, conn: Any, items: list[tuple[Any, Any]]) -> None:
        """Write ``(args, value)`` items through ``conn`` and flush them as one batch."""
        payloads = []
        for args, value in items:
            p = self.call(conn.write, args, value)
            if p is not None:
                payloads.append(p)
        self.call(conn.flush, payloads)

    def core(self, conn: Any = None) -> ShardCore:
        """A ShardCore over ``conn`` that flushes only when asked to."""
        conn = self.make_connector() if conn is None else conn
        return ShardCore([conn], writes_threshold=10**9, millis_threshold=1e9)

    def assert_no_secrets(self, text: str) -> None:
        for secret in self.secret_strings():
            assert secret not in text, f"a secret leaked into: {text[:300]!r}"

    # -- the contract ---------------------------------------------------------------------
    def test_round_trip_of_each_value_type(self) -> None:
        conn = self.connected()
        items = [(("value", i), v) for i, v in enumerate(self.values)]
        self.store(conn, items)
        fresh = self.connected()  # a second instance proves the values were persisted
        for reader in (conn, fresh):
            for args, v in items:
                got = self.call(reader.read, args)
                assert values_equal(got, v), f"{args}: stored {v!r}, read back {got!r}"

    def test_missing_key_reads_none(self) -> None:
        conn = self.connected()
        assert self.call(conn.read, "never-written") is None
        self.store(conn, [("written", 1)])
        assert self.call(conn.read, "never-written") is None
        assert self.call(conn.read, ("never", "written")) is None

    def test_keys_of_every_shape_are_distinct(self) -> None:
        conn = self.connected()
        items = [(k, {"i": i, "key": repr(k)}) for i, k in enumerate(self.keys)]
        self.store(conn, items)
        fresh = self.connected()
        for args, v in items:
            assert values_equal(self.call(fresh.read, args), v), f"key {args!r}"

    def test_coalesced_writes_store_the_last_value(self) -> None:
        conn = self.connected()
        # What ShardCore does: a later payload for a key replaces the earlier one.
        buffered: dict[Any, Any] = {}
        for v in ("first", "second", "third"):
            buffered["k"] = self.call(conn.write, "k", v)
        self.call(conn.flush, [p for p in buffered.values() if p is not None])
        assert self.call(self.connected().read, "k") == "third"
        core = self.core(self.make_connector())
        core.put("c", 1)
        core.put("c", 2)
        core.put("d", [1])
        assert core.metrics()["pending"] == 2
        core.flush()
        core.close(disconnect=True)
        reader = self.connected()
        assert self.call(reader.read, "c") == 2
        assert self.call(reader.read, "d") == [1]

    def test_repeated_flushes_last_one_wins(self) -> None:
        conn = self.connected()
        reader = self.connected()
        for i in range(5):
            self.store(conn, [("counter", i), (("other", i), i)])
            assert self.call(reader.read, "counter") == i
            assert self.call(conn.read, "counter") == i
        for i in range(5):
            assert self.call(reader.read, ("other", i)) == i

    def test_duplicate_keys_in_one_batch(self) -> None:
        if not self.duplicate_keys_in_batch:
            pytest.skip("duplicate_keys_in_batch is False")
        conn = self.connected()
        self.store(conn, [("dup", 1), ("x", 0), ("dup", 2)])
        assert self.call(self.connected().read, "dup") == 2

    def test_empty_flush(self) -> None:
        conn = self.connected()
        self.call(conn.flush, [])
        core = self.core(self.make_connector())
        assert core.flush() == 0
        core.close(disconnect=True)

    def test_huge_value(self) -> None:
        if not self.huge_value_bytes:
            pytest.skip("huge_value_bytes is 0")
        big = os.urandom(self.huge_value_bytes)
        big_list = ["x" * 1000] * (self.huge_value_bytes // 1000)
        conn = self.connected()
        self.store(conn, [("big", big), ("big-list", big_list), ("small", 1)])
        fresh = self.connected()
        assert self.call(fresh.read, "big") == big
        assert self.call(fresh.read, "big-list") == big_list
        assert self.call(fresh.read, "small") == 1

    def test_two_instances_on_one_store_at_once(self) -> None:
        a, b = self.connected(), self.connected()
        errors: list[BaseException] = []

        def writer(conn: Any, tag: str) -> None:
            # Each instance is driven by its own thread, as each shard drives its own.
            loop = asyncio.new_event_loop()
            try:
                for batch in range(10):
                    payloads = []
                    for i in range(20):
                        p = conn.write((tag, batch, i), f"{tag}-{batch}-{i}")
                        if inspect.isawaitable(p):
                            p = loop.run_until_complete(p)
                        payloads.append(p)
                    r = conn.flush([p for p in payloads if p is not None])
                    if inspect.isawaitable(r):
                        loop.run_until_complete(r)
            except BaseException as e:  # reported by the main thread
                errors.append(e)
            finally:
                loop.close()

        threads = [threading.Thread(target=writer, args=(c, t)) for c, t in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for reader in (a, b):
            for tag in ("a", "b"):
                for batch in (0, 9):
                    assert self.call(reader.read, (tag, batch, 19)) == f"{tag}-{batch}-19"

    def test_disconnect_then_connect_again(self) -> None:
        conn = self.connected()
        self.store(conn, [("before", 1)])
        disconnect = getattr(conn, "disconnect", None)
        connect = getattr(conn, "connect", None)
        if disconnect is not None:
            self.call(disconnect)
        if connect is not None:
            self.call(connect)
        assert self.call(conn.read, "before") == 1
        self.store(conn, [("after", 2)])
        assert self.call(self.connected().read, "after") == 2

    def test_pickled_before_and_after_connect(self) -> None:
        conn = self.make_connector()
        copy1 = pickle.loads(pickle.dumps(conn))  # shipped to a shard before it connects
        self.connected(conn)
        copy2 = pickle.loads(pickle.dumps(conn))  # connections must not be pickled
        self.store(conn, [("shipped", "yes")])
        for copy in (copy1, copy2):
            assert self.call(self.connected(copy).read, "shipped") == "yes"

    def test_read_many_matches_read(self) -> None:
        conn = self.connected()
        if not hasattr(conn, "read_many"):
            pytest.skip("no read_many()")
        items = [(k, i) for i, k in enumerate(self.keys)]
        self.store(conn, items)
        args = [k for k, _ in items] + ["absent", ("absent", 2)]
        got = self.call(conn.read_many, args)
        assert isinstance(got, list) and len(got) == len(args)
        for a, g in zip(args, got):
            assert values_equal(g, self.call(conn.read, a)), a
        assert self.call(conn.read_many, []) == []

    def test_read_many_encoded_matches_read(self) -> None:
        conn = self.connected()
        if not hasattr(conn, "read_many_encoded"):
            pytest.skip("no read_many_encoded()")
        from persistroids_dist.codec import encode_value
        items = [(("renc", i), v) for i, v in enumerate(self.values)]
        self.store(conn, items)
        keys = [encode_value(a) for a, _ in items] + [encode_value(("renc", "absent"))]
        got = self.call(conn.read_many_encoded, keys)
        assert got[-1] is None
        for (args, v), raw in zip(items, got[:-1]):
            assert raw is not None, f"{args}: nothing read"
            assert values_equal(decode_value(raw), v), f"{args}: {v!r} came back changed"

    def test_write_encoded_matches_write(self) -> None:
        conn = self.connected()
        if not hasattr(conn, "write_encoded"):
            pytest.skip("no write_encoded()")
        from persistroids_dist.codec import encode_value
        for i, v in enumerate(self.values):
            args = ("enc", i, self.keys[i % len(self.keys)])
            fast = self.call(conn.write_encoded, encode_value(args), encode_value(v))
            assert fast == self.call(conn.write, args, v), f"payloads differ for {v!r}"

    def test_delete_removes_a_persisted_key(self) -> None:
        from persistroids_dist.codec import decode_value, encode_key, encode_value
        core = self.core()
        kb = encode_key(("del", 1))
        core.write(kb, None, encode_value({"v": 1}))
        core.flush()
        core.delete(kb)
        assert decode_value(core.read(kb)) is None  # at once, before any flush
        assert core.read_stored(kb) is None
        core.flush()
        fresh = self.core()  # a new shard over the same store: the key is gone there too
        assert fresh.read_stored(kb) is None
        assert decode_value(fresh.read(kb)) is None

    def test_deletes_and_writes_of_a_key_apply_in_order(self) -> None:
        from persistroids_dist.codec import encode_key, encode_value
        core = self.core()
        a, b, c = (encode_key(("order", i)) for i in range(3))
        core.write(a, None, encode_value("first"))
        core.delete(a)  # a delete after a write wins
        core.delete(b)
        core.write(b, None, encode_value("again"))  # a write after a delete wins
        core.delete(c)  # a key no store has
        core.flush()
        fresh = self.core()
        assert fresh.read_stored(a) is None
        assert fresh.read_stored(b) == encode_value("again")
        assert fresh.read_stored(c) is None

    def test_repr_has_no_secrets(self) -> None:
        conn = self.make_connector()
        self.assert_no_secrets(repr(conn))
        self.assert_no_secrets(repr(self.connected(conn)))

    def test_values_survive_a_new_shard_core(self) -> None:
        core = self.core()
        core.put("k1", {"a": (1, 2)})
        core.put(("k", 2), [b"bytes", 1.5])
        assert core.get("k1") == {"a": (1, 2)}
        core.close(disconnect=True)
        core2 = self.core()
        assert values_equal(core2.get("k1"), {"a": (1, 2)})
        assert values_equal(core2.get(("k", 2)), [b"bytes", 1.5])
        assert core2.get("absent") is None
        core2.close(disconnect=True)

    def test_down_store_gives_a_clear_error(self) -> None:
        conn = self.make_down_connector()
        self.assert_no_secrets(repr(conn))
        errors: list[BaseException] = []
        for step in ("connect", "read", "flush"):
            try:
                if step == "connect":
                    connect = getattr(conn, "connect", None)
                    if connect is not None:
                        self.call(connect)
                elif step == "read":
                    self.call(conn.read, "k")
                else:
                    self.call(conn.flush, [self.call(conn.write, "k", 1)])
            except Exception as e:
                errors.append(e)
                if step == "connect":
                    break  # a connector may refuse to start on a down store
            else:
                assert step == "connect", f"{step}() succeeded on a store that is down"
        assert errors
        for e in errors:
            text = f"{type(e).__name__}: {e}"
            assert str(e).strip(), f"empty error message: {e!r}"
            self.assert_no_secrets(text)
            self.assert_no_secrets(repr(e))

    def test_outage_flush_raises_then_recovers(self) -> None:
        outage = self.make_outage()
        conn = self.connected(outage.connector)
        self.store(conn, [("before", 1)])
        with outage.down():
            with pytest.raises(Exception) as info:
                self.store(conn, [("during", 2)])
            assert str(info.value).strip()
            self.assert_no_secrets(str(info.value))
        self.store(conn, [("during", 2)])
        assert self.call(conn.read, "during") == 2
        assert self.call(conn.read, "before") == 1

    def test_outage_through_shard_core_keeps_payloads_buffered(self) -> None:
        outage = self.make_outage()
        core = self.core(outage.connector)
        self.on_teardown(lambda: core.close(disconnect=True))
        core.put("a", 1)
        with outage.down():
            core.put("b", [2])
            with pytest.raises(FlushError):
                core.flush()
            assert core.metrics()["pending"] == 2
            assert core.get("b") == [2]  # still served from the cache
        core.put("c", 3)
        assert core.flush() == 3
        assert core.metrics()["pending"] == 0
        reader = self.connected()
        assert [self.call(reader.read, k) for k in ("a", "b", "c")] == [1, [2], 3]
