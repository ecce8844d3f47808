"""The socket data path on its own (no Ray): TCP and Unix, auth, pipelining, errors."""

from __future__ import annotations

import socket

import msgpack
import pytest

from connectors.memory import MemoryConnector
from persistroids_dist import AuthenticationError
from persistroids_dist.actors import ShardHost
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.transport import Connection, Op

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
