"""TLS on the TCP data path, without Ray: real sockets, real certificates (made with the
``openssl`` command), a real ShardHost or ShardServer and Connection."""

from __future__ import annotations

import functools
import os
import pickle
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from test_transport import SECRET, burst, tcp_only, wait_for
from test_transport import serve as plain_serve  # noqa: F401  (a fixture, used below)

from persistroids_dist import AuthenticationError, TLSConfig
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.spec import CacheSpec
from persistroids_dist.tls import make_test_certificates, resolve
from persistroids_dist.transport import Connection, Op

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make certificates")

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The cluster's CA and node certificate, and another CA's (which must not get in)."""
    d = tmp_path_factory.mktemp("certs")
    return make_test_certificates(d, "node"), make_test_certificates(d, "other")


@pytest.fixture
def tls(certs):
    return certs[0]


@pytest.fixture
def host(tls):
    h = ShardHost(0, [MemoryConnector()], {"init_fn": lambda a: 0, "tls": tls}, SECRET,
                  tcp_host="127.0.0.1")
    yield h
    h.close()


@pytest.fixture
def plain_host():
    h = ShardHost(0, [MemoryConnector()], {"init_fn": lambda a: 0}, SECRET,
                  tcp_host="127.0.0.1")
    yield h
    h.close()


def read(conn, key):
    return decode_value(conn.call(msgpack.packb([Op.READ, encode_key(key), None])))


def test_round_trip_over_tls_with_pipelining_and_a_large_value(host, tls):
    conn = Connection(tcp_only(host.address()), SECRET, tls=tls)
    assert (conn.transport, conn.tls) == ("tcp", True)
    assert isinstance(conn.sock, ssl.SSLSocket)
    kb = encode_key("k")
    for i in range(1000):  # pipelined: more than max_unacked/2 in flight
        conn.send(msgpack.packb([Op.WRITE, kb, None, encode_value(i)]))
    assert read(conn, "k") == 999
    big = encode_value(b"x" * 5_000_000)  # many TLS records each way
    conn.call(msgpack.packb([Op.WRITE, encode_key("big"), None, big]))
    assert conn.call(msgpack.packb([Op.READ, encode_key("big"), None])) == big
    conn.close()
    m = host.metrics()
    assert m["tls"] is True
    assert (m["connections"], m["connections_tcp"], m["connections_tls"]) == (1, 1, 1)
    assert m["auth_failures"] == 0


def test_unix_sockets_stay_plain_on_a_tls_shard(host, tls):
    with_tls = Connection(host.address(), SECRET, tls=tls)
    without = Connection(host.address(), SECRET)
    for conn in (with_tls, without):
        assert (conn.transport, conn.tls) == ("unix", False)
        conn.call(msgpack.packb([Op.WRITE, encode_key("u"), None, encode_value(1)]))
        assert read(conn, "u") == 1
        conn.close()
    m = host.metrics()
    assert (m["connections"], m["connections_tcp"], m["connections_tls"]) == (2, 0, 0)


def test_a_plain_client_is_told_the_shard_requires_tls_at_once(host):
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="requires TLS"):
        Connection(tcp_only(host.address()), SECRET)
    assert time.monotonic() - start < 1.0  # no waiting for a timeout


def test_a_tls_client_refuses_a_plain_shard_at_once(plain_host, tls):
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="requires TLS, but the shard .* plain TCP"):
        Connection(tcp_only(plain_host.address()), SECRET, tls=tls)
    assert time.monotonic() - start < 1.0
    assert plain_host.metrics()["connections"] == 0  # it never proved the secret to it


def raw_tls_client(address, context):
    """A TLS connection to a shard made by hand: the greeting, then the TLS handshake."""
    s = socket.create_connection(tuple(address["tcp"]), timeout=5)
    assert s.recv(100) == msgpack.packb([b"PRST1-TLS"])
    return context.wrap_socket(s)


def shard_ends_it(s):
    """Whether the shard ends TLS connection ``s`` (an alert or a close) instead of sending
    its challenge."""
    try:
        return s.recv(100) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_the_shard_requires_a_client_certificate(host, tls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(tls.ca_file)  # trusts the shard, but has no certificate
    try:
        s = raw_tls_client(host.address(), ctx)  # TLS 1.2 fails here, 1.3 at the next read
    except ssl.SSLError:
        pass
    else:
        assert shard_ends_it(s)
        s.close()
    deadline = time.monotonic() + 5
    while host.metrics()["auth_failures"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Counted as the shard closes the peer, which the client may see first.
    wait_for(lambda: host.metrics()["auth_failures"] == 1, 5)
    assert host.metrics()["connections"] == 0


def test_a_client_certificate_of_another_ca_is_refused(host, certs):
    tls, other = certs
    # Trusts the shard's CA, but presents a certificate the shard's CA did not sign.
    stranger = TLSConfig(other.cert_file, other.key_file, tls.ca_file)
    with pytest.raises(AuthenticationError, match="TLS: the shard .* (refused|closed)"):
        Connection(tcp_only(host.address()), SECRET, tls=stranger)
    # Counted as the shard closes the peer, which the client may see first.
    wait_for(lambda: host.metrics()["auth_failures"] == 1, 5)


def test_a_client_of_another_ca_refuses_the_shard(host, certs):
    _, other = certs
    with pytest.raises(AuthenticationError, match="TLS handshake .* failed: .*certificate"):
        Connection(tcp_only(host.address()), SECRET, tls=other)


def test_the_secret_is_still_proved_inside_tls(host, tls):
    with pytest.raises(AuthenticationError, match="wrong cache secret"):
        Connection(tcp_only(host.address()), b"wrong" * 7, tls=tls)
    # Counted as the shard closes the peer, which the client may see first.
    wait_for(lambda: host.metrics()["auth_failures"] == 1, 5)


@pytest.fixture
def serve(plain_serve, tls):  # noqa: F811  (the fixture imported above)
    """Bare TLS ShardServers (TCP only, no shard behind them) with the given limits."""
    return functools.partial(plain_serve, tls=tls)


def client_hello() -> bytes:
    """The first flight of a real TLS client, to send by hand and then stall."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_stalled_tls_handshakes_take_no_thread_and_do_not_lock_clients_out(serve, tls):
    server, address = serve(handshake_timeout=1.0)  # at most 64 handshakes at once
    before = threading.active_count()
    hello = client_hello()
    stalled = []
    for i in range(150):
        s = socket.create_connection(tuple(address["tcp"]))
        if i % 2:  # half start TLS and stop half-way, half never send a byte
            s.sendall(hello[: len(hello) // 2] if i % 4 == 1 else hello)
        stalled.append(s)
    try:
        wait_for(lambda: server.handshakes == server.max_handshakes, 5)
        assert threading.active_count() - before <= 2
        start = time.monotonic()
        conn = Connection(address, SECRET, tls=tls)  # makes room for itself, and is served
        assert conn.tls and conn.call(msgpack.packb([Op.PING])) == 0
        conn.close()
        assert time.monotonic() - start < 1.0
        assert server.handshake_refused > 0
        # Every stalled one is closed, to make room or at the deadline, none served.
        wait_for(lambda: server.auth_failures + server.handshake_refused == 150, 15)
        assert server.handshakes == 0 and server.connections == 1
        assert threading.active_count() - before <= 2
    finally:
        for s in stalled:
            s.close()


def test_a_peer_that_stops_in_the_tls_handshake_is_cut_at_the_deadline(serve, tls):
    server, address = serve(handshake_timeout=0.5)
    s = socket.create_connection(tuple(address["tcp"]))
    s.recv(100)
    s.sendall(client_hello())  # the shard answers, and waits for the rest: never sent
    s.settimeout(3)
    start = time.monotonic()
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionError:
        pass
    assert time.monotonic() - start < 1.5
    s.close()
    wait_for(lambda: server.auth_failures == 1, 5)  # counted as the peer is closed
    # Meanwhile and after, clients got in.
    conn = Connection(address, SECRET, tls=tls)
    assert conn.call(msgpack.packb([Op.PING])) == 0
    conn.close()


def test_a_burst_of_tls_clients_beyond_the_limit_all_get_in(serve, tls):
    server, address = serve(max_handshakes=4)
    assert burst(address, 20, tls=tls) == [0] * 20
    assert server.auth_failures == 0 and server.tls_connections == 20


def test_a_resumed_connection_dials_tls_again(tls):
    # The shard closes (flushing to the store) and another comes up on a new port, as Ray
    # restarts one: the connection resumes over TLS, never over plain TCP.
    store = MemoryConnector()
    options = {"init_fn": lambda a: 0, "tls": tls}
    first = ShardHost(0, [store], dict(options), SECRET, tcp_host="127.0.0.1")
    where = [tcp_only(first.address())]
    conn = Connection(where[0], SECRET, tls=tls, resolve=lambda: where[0], wait_s=10)
    conn.call(msgpack.packb([Op.WRITE, encode_key("r"), None, encode_value(7)]))
    first.close()
    conn.sock.close()  # the shard's process would be gone with its sockets
    second = ShardHost(0, [store], dict(options), SECRET, tcp_host="127.0.0.1")
    where[0] = tcp_only(second.address())
    try:
        assert read(conn, "r") == 7  # from the store, over the new link
        assert conn.tls and conn.redials == 1
        assert second.metrics()["connections_tls"] == 1
    finally:
        conn.close()
        second.close()


# -- init(tls=...) settings, checked ------------------------------------------------------------

def test_settings_are_checked_with_errors_that_name_the_problem(certs, tmp_path):
    tls, other = certs
    good = {"cert_file": tls.cert_file, "key_file": tls.key_file, "ca_file": tls.ca_file}
    assert resolve(good) == resolve(tls) == tls
    assert resolve(False) is None
    with pytest.raises(FileNotFoundError, match="key_file .*nope.key"):
        resolve({**good, "key_file": str(tmp_path / "nope.key")})
    with pytest.raises(ValueError, match="cert_file .* and key_file .* do not make"):
        resolve({**good, "key_file": other.key_file})
    with pytest.raises(ValueError, match="signed by that CA.*unable to get local issuer"):
        resolve({**good, "ca_file": other.ca_file})
    with pytest.raises(ValueError, match="ca_file .* holds no PEM certificate"):
        resolve({**good, "ca_file": tls.key_file})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="cert_file .*junk.pem"):
        resolve({**good, "cert_file": str(junk)})
    with pytest.raises(TypeError, match="missing: \\['ca_file'\\]"):
        resolve({"cert_file": tls.cert_file, "key_file": tls.key_file})
    with pytest.raises(TypeError, match="unknown: \\['password'\\]"):
        resolve({**good, "password": "x"})
    with pytest.raises(TypeError, match="tls must be"):
        resolve("yes")
    with pytest.raises(TypeError, match="cert_file must be a path"):
        resolve({**good, "cert_file": 3})


_UNREADABLE = """
import sys
from persistroids_dist.tls import TLSConfig, resolve
try:
    resolve(TLSConfig(*sys.argv[1:4]))
except PermissionError as e:
    print("PermissionError:", e)
"""


def test_an_unreadable_key_file_is_named(tls, tmp_path):
    key = tmp_path / "locked.key"
    key.write_bytes(open(tls.key_file, "rb").read())
    key.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="key_file .*locked.key.* cannot be read"):
            resolve(TLSConfig(tls.cert_file, str(key), tls.ca_file))
        return
    # Root reads any file: check in a process that runs as root without the capabilities
    # that let it (util-linux's setpriv drops them), as a user without access would.
    run = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                          "--inh-caps=-dac_override,-dac_read_search", sys.executable, "-c",
                          _UNREADABLE, tls.cert_file, str(key), tls.ca_file],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"PermissionError: .*key_file .*locked.key.* cannot be read", run.stdout), \
        run.stdout


def test_relative_paths_become_absolute(tls, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tls.cert_file))
    config = resolve({"cert_file": os.path.basename(tls.cert_file),
                      "key_file": os.path.basename(tls.key_file),
                      "ca_file": os.path.basename(tls.ca_file)})
    assert config == tls  # shards run in other working directories


def test_rays_tls_settings_are_the_default_when_rays_tls_is_on(tls, monkeypatch):
    for name in ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
        monkeypatch.delenv(name, raising=False)
    assert resolve(None) is None
    with pytest.raises(ValueError, match="Ray's TLS is not on"):
        resolve(True)
    monkeypatch.setenv("RAY_USE_TLS", "1")
    with pytest.raises(ValueError, match="RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY"):
        resolve(None)
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", tls.cert_file)
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", tls.key_file)
    monkeypatch.setenv("RAY_TLS_CA_CERT", tls.ca_file)
    config = resolve(None)
    assert config == resolve(True) == TLSConfig(tls.cert_file, tls.key_file, tls.ca_file,
                                                from_ray=True)
    assert resolve(False) is None  # off, whatever Ray does


def test_rays_settings_follow_each_process_environment(certs, monkeypatch):
    tls, other = certs
    recorded = TLSConfig(tls.cert_file, tls.key_file, tls.ca_file, from_ray=True)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    assert recorded.effective() is recorded  # Ray's TLS off here: the driver's paths
    monkeypatch.setenv("RAY_USE_TLS", "true")
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", other.cert_file)
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", other.key_file)
    monkeypatch.setenv("RAY_TLS_CA_CERT", other.ca_file)
    assert recorded.effective() == TLSConfig(other.cert_file, other.key_file, other.ca_file,
                                             from_ray=True)
    assert TLSConfig(tls.cert_file, tls.key_file, tls.ca_file).effective().cert_file == \
        tls.cert_file  # explicit settings never follow Ray's


def test_a_handle_carries_paths_never_key_material(tls):
    spec = CacheSpec(name="c", secret=SECRET, num_shards=1, addresses=[], tls=tls)
    text = repr(spec)
    assert tls.key_file in text and "PRIVATE KEY" not in text
    assert SECRET.decode() not in text
    assert b"PRIVATE KEY" not in pickle.dumps(spec)
