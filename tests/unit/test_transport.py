"""The socket data path on its own (no Ray): TCP and Unix, auth, pipelining, errors."""

from __future__ import annotations

import os
import socket
import threading
import time
import tracemalloc

import msgpack
import pytest

from persistroids_dist import AuthenticationError
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.transport import Connection, Op, ShardServer, _mac, _recv_obj

SECRET = b"s" * 32


@pytest.fixture
def host():
    h = ShardHost(0, [MemoryConnector()], {"init_fn": lambda a: 0}, SECRET,
                  tcp_host="127.0.0.1")
    yield h
    h.close()


def tcp_only(address):
    # A different host name makes the client take the TCP address, as across nodes.
    return {**address, "host": "another-node"}


@pytest.mark.parametrize("route", ["unix", "tcp"])
def test_round_trips_and_pipelining_keep_order(host, route):
    address = host.address() if route == "unix" else tcp_only(host.address())
    conn = Connection(address, SECRET)
    kb = encode_key("k")
    for i in range(1000):  # more than max_unacked/2: the client drains as it goes
        conn.send(msgpack.packb([Op.WRITE, kb, None, encode_value(i)]))
    assert decode_value(conn.call(msgpack.packb([Op.READ, kb, None]))) == 999
    big = encode_value(b"x" * 5_000_000)
    conn.call(msgpack.packb([Op.WRITE, encode_key("big"), None, big]))
    assert conn.call(msgpack.packb([Op.READ, encode_key("big"), None])) == big
    conn.close()


def test_tcp_peer_without_the_secret_is_refused_and_counted(host):
    with pytest.raises(AuthenticationError):
        Connection(tcp_only(host.address()), b"wrong" * 7)
    s = socket.create_connection(tuple(host.address()["tcp"]))
    s.recv(100)
    s.sendall(b"\xc1 not msgpack at all")
    assert s.recv(100) == b""
    s.close()
    assert host.metrics()["auth_failures"] == 2


def test_errors_come_back_as_their_own_type_and_the_connection_survives(host):
    conn = Connection(host.address(), SECRET)
    with pytest.raises(KeyError):
        conn.call(msgpack.packb([99]))  # unknown opcode
    conn.send(msgpack.packb([Op.UPDATE, encode_key("k"), None, b"d" * 16, None]))
    with pytest.raises(LookupError, match="unknown update function"):
        conn.sync()
    assert conn.call(msgpack.packb([Op.PING])) == 0
    conn.close()


def test_a_server_that_cannot_prove_the_secret_is_refused():
    # A fake shard that speaks the handshake but does not know the secret.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    import threading

    def fake():
        s, _ = listener.accept()
        s.sendall(msgpack.packb([b"PRST1", b"n" * 16]))
        s.recv(1000)
        s.sendall(msgpack.packb(b"\x00" * 32))
        s.close()

    t = threading.Thread(target=fake)
    t.start()
    with pytest.raises(AuthenticationError, match="could not prove"):
        Connection({"host": "x", "unix": None, "tcp": list(listener.getsockname())}, SECRET)
    t.join()
    listener.close()


# -- what a peer may take before it proves the secret -----------------------------------------

@pytest.fixture
def serve():
    """Start bare ShardServers (TCP only, no shard behind them) with the given limits (and
    ShardServer's other options: ``tls=``)."""
    servers = []

    def start(**limits):
        handlers = {Op.PING: lambda: 0, 99: len}
        server = ShardServer(handlers, SECRET, unix_path=None, tcp_host="127.0.0.1", **limits)
        servers.append(server)
        return server, tcp_only(server.start())

    yield start
    for server in servers:
        server.close()


def wait_for(condition, timeout):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def closed_by_server(s, timeout):
    """Whether the server closes ``s`` (EOF or reset) within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 16):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_huge_frame_before_the_handshake_is_refused_without_being_buffered(serve):
    server, address = serve()
    size = 200 << 20
    chunk = memoryview(bytes(1 << 20))
    s = socket.create_connection(tuple(address["tcp"]))
    s.recv(100)  # the challenge
    s.settimeout(30)
    tracemalloc.start()
    try:
        sent = 0
        try:
            s.sendall(b"\xc6" + size.to_bytes(4, "big"))  # a bin32 header declaring 200 MiB
            while sent < size:
                sent += s.send(chunk)
        except OSError:  # reset: the server closed the connection
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s.close()
    # Refused at the header: the sender got no further than the sockets' buffers hold, and
    # the process (server included) never held anything near the frame.
    assert sent < size // 4
    assert peak < 16 << 20
    assert server.auth_failures == 1


def test_a_handshake_longer_than_the_cap_is_refused_once_the_cap_is_read(serve):
    server, address = serve()  # the 5 s deadline is far off: the cap refuses it
    s = socket.create_connection(tuple(address["tcp"]))
    s.recv(100)
    # Every declared length is small, but the frame runs past 4 KiB and never completes.
    s.sendall(b"\xdc\x00\x64" + (b"\xc4\xff" + b"z" * 255) * 32)
    assert closed_by_server(s, 2.0)
    s.close()
    assert server.auth_failures == 1


def test_a_peer_trickling_its_handshake_is_cut_at_the_deadline(serve):
    limit = 0.5
    server, address = serve(handshake_timeout=limit)
    s = socket.create_connection(tuple(address["tcp"]))
    start = time.monotonic()
    s.recv(100)
    frame = msgpack.packb([b"p" * 32, b"n" * 16])
    closed = False
    for byte in frame[:-1]:  # a byte every limit/5 s; a per-read timeout never fires
        try:
            s.sendall(bytes([byte]))
        except OSError:
            closed = True
        if closed or closed_by_server(s, limit / 5):
            closed = True
            break
    elapsed = time.monotonic() - start
    s.close()
    assert closed  # before the peer was done, which takes ~10x the limit
    assert elapsed < 3 * limit
    assert server.auth_failures == 1


def test_idle_connections_take_no_thread_and_do_not_lock_clients_out(serve):
    server, address = serve(handshake_timeout=1.0)  # at most 64 handshakes at once
    before = threading.active_count()
    idle = []
    for _ in range(200):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(tuple(address["tcp"]))
        idle.append(s)
    try:
        wait_for(lambda: server.handshakes == server.max_handshakes, 5)
        assert threading.active_count() - before <= 2
        # While they are held, a real client still gets in (the oldest stalled handshake
        # makes room for it) and is served.
        conn = Connection(address, SECRET)
        assert conn.call(msgpack.packb([Op.PING])) == 0
        conn.close()
        assert server.handshakes <= server.max_handshakes
        assert server.handshake_refused > 0
        # Every idle one is closed: to make room, or at the deadline.
        wait_for(lambda: server.auth_failures + server.handshake_refused == 200, 15)
        assert server.handshakes == 0
        assert threading.active_count() - before <= 2
    finally:
        for s in idle:
            s.close()


def burst(address, n, **options):
    """``n`` clients connecting at once (``options``: Connection's, e.g. ``tls=``), each
    pinging once; their answers."""
    results = []

    def client():
        conn = Connection(address, SECRET, **options)
        results.append(conn.call(msgpack.packb([Op.PING])))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_burst_of_clients_beyond_the_limit_all_get_in(serve):
    server, address = serve(max_handshakes=4)
    assert burst(address, 40) == [0] * 40
    assert server.auth_failures == 0


def test_requests_pipelined_behind_the_proof_are_answered_in_order(serve):
    server, address = serve()
    s = socket.create_connection(tuple(address["tcp"]))
    unpacker = msgpack.Unpacker()
    _, nonce = _recv_obj(s, unpacker)
    mine = os.urandom(16)
    # One send: the proof, then more than the handshake cap of requests right behind it.
    s.sendall(msgpack.packb([_mac(SECRET, b"client", nonce, mine), mine])
              + msgpack.packb([99, b"x" * 1_000_000]) + msgpack.packb([Op.PING]))
    assert _recv_obj(s, unpacker) == _mac(SECRET, b"server", mine, nonce)
    assert _recv_obj(s, unpacker) == [0, 1_000_000]
    assert _recv_obj(s, unpacker) == [0, 0]
    s.close()
    assert server.connections == 1 and server.auth_failures == 0
