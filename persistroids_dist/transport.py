"""The data path: msgpack frames over Unix (same host) or TCP sockets, served by each shard.

A Ray actor call costs ~850 us on a small machine; a msgpack frame over a Unix socket ~44 us.
So Ray stays the control plane (placement, restarts, discovery) and data goes over these
sockets. Frames are msgpack objects streamed back to back (the msgpack stream delimits them);
a request is ``[op, *args]``, a response ``[0, result]`` or ``[1, pickled exception]``.
Responses come back in request order, which is what lets a client pipeline writes.

Every connection starts with a mutual HMAC-SHA256 challenge over the cache's secret: the server
refuses (and counts) a peer that cannot prove it, and the client refuses a server that cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import AuthenticationError, RemoteError

__all__ = ["Connection", "Op", "ShardServer"]

log = logging.getLogger("persistroids_dist.transport")

_MAGIC = b"PRST1"
_RECV = 1 << 18
_HANDSHAKE_TIMEOUT = 5.0


class Op:
    """Request opcodes (one integer each, to keep frames small)."""

    READ = 1
    READ_MANY = 2
    WRITE = 3
    WRITE_MANY = 4
    UPDATE = 5
    FLUSH = 6
    METRICS = 7
    PING = 8
    LEASE = 9
    RELEASE = 10
    POLL = 11


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 31)


def _recv_obj(sock: socket.socket, unpacker: msgpack.Unpacker) -> Any:
    while True:
        try:
            return next(unpacker)
        except StopIteration:
            data = sock.recv(_RECV)
            if not data:
                raise ConnectionError("connection closed by peer") from None
            unpacker.feed(data)


def encode_error(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
        return data
    except Exception:
        return pickle.dumps(RemoteError(f"{type(exc).__name__}: {exc}"))


class ShardServer:
    """Serves one shard's ``handlers`` on a Unix socket and, optionally, a TCP socket.

    ``handlers`` maps an opcode to a function taking the request's arguments and returning a
    msgpack-encodable result. One thread per connection: the shard's own lock orders them.
    """

    def __init__(self, handlers: dict[int, Callable[..., Any]], secret: bytes, *,
                 unix_path: str | None, tcp_host: str | None = None) -> None:
        self.handlers = handlers
        self.secret = secret
        self.unix_path = unix_path
        self.tcp_host = tcp_host
        self.auth_failures = 0
        self.connections = 0
        self._listeners: list[socket.socket] = []
        self._closed = False

    def start(self) -> dict[str, Any]:
        """Listen and return the address record clients connect with."""
        address: dict[str, Any] = {"host": socket.gethostname(), "unix": None, "tcp": None}
        if self.unix_path:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.unix_path)
            os.chmod(self.unix_path, 0o600)
            s.listen(128)
            self._listeners.append(s)
            address["unix"] = self.unix_path
        if self.tcp_host:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.tcp_host, 0))
            s.listen(128)
            self._listeners.append(s)
            address["tcp"] = [self.tcp_host, s.getsockname()[1]]
        for s in self._listeners:
            threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                             name="persistroids-accept").start()
        return address

    def close(self) -> None:
        self._closed = True
        for s in self._listeners:
            try:
                s.close()
            except OSError:
                pass
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True,
                             name="persistroids-conn").start()

    def _handshake(self, sock: socket.socket, unpacker: msgpack.Unpacker) -> bool:
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        nonce = os.urandom(16)
        sock.sendall(msgpack.packb([_MAGIC, nonce]))
        try:
            proof, client_nonce = _recv_obj(sock, unpacker)
            ok = isinstance(proof, bytes) and isinstance(client_nonce, bytes) and \
                hmac.compare_digest(proof, _mac(self.secret, b"client", nonce, client_nonce))
        except (ValueError, TypeError, OSError, ConnectionError, msgpack.UnpackException):
            ok = False
        if not ok:
            self.auth_failures += 1
            log.warning("refused a connection that did not prove the cache secret")
            return False
        sock.sendall(msgpack.packb(_mac(self.secret, b"server", client_nonce, nonce)))
        sock.settimeout(None)
        return True

    def _serve(self, sock: socket.socket) -> None:
        unpacker = _unpacker()
        try:
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(sock, unpacker):
                return
            self.connections += 1
            handlers = self.handlers
            packb = msgpack.packb
            while True:
                data = sock.recv(_RECV)
                if not data:
                    return
                unpacker.feed(data)
                out = []
                # Answer every complete request received so far with one send.
                for req in unpacker:
                    try:
                        out.append(packb([0, handlers[req[0]](*req[1:])]))
                    except Exception as e:  # the client re-raises it
                        out.append(packb([1, encode_error(e)]))
                sock.sendall(b"".join(out))
        except (OSError, ConnectionError):
            pass
        finally:
            sock.close()


class Connection:
    """A client's authenticated connection to one shard, with pipelining.

    ``send`` queues a request without waiting for its response (at most ``max_unacked`` are in
    flight, which bounds both ends' buffers); ``call`` sends one and waits for its result,
    first consuming earlier responses. An error answering a pipelined request is kept and
    raised by the next ``call`` or ``sync``. Not thread-safe: hold ``lock`` around use.
    """

    def __init__(self, address: dict[str, Any], secret: bytes, *, max_unacked: int = 512,
                 batch_max: int = 512, timeout: float | None = None) -> None:
        self.lock = threading.Lock()
        self.max_unacked = max_unacked
        self.batch_max = batch_max
        self.queue: list[list[Any]] = []  # writes waiting to go out as one WRITE_MANY
        self.unacked = 0
        self.deferred: list[BaseException] = []
        self.known_functions: set[bytes] = set()
        self.closed = False
        if address.get("unix") and address.get("host") == socket.gethostname() \
                and os.path.exists(address["unix"]):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = address["unix"]
        elif address.get("tcp"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = tuple(address["tcp"])
        else:
            raise ConnectionError(f"no reachable address in {address}")
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        sock.connect(target)
        self.sock = sock
        self.unpacker = _unpacker()
        try:
            magic, nonce = _recv_obj(sock, self.unpacker)
            if magic != _MAGIC:
                raise AuthenticationError("peer is not a persistroids shard")
            mine = os.urandom(16)
            sock.sendall(msgpack.packb([_mac(secret, b"client", nonce, mine), mine]))
            proof = _recv_obj(sock, self.unpacker)
        except ConnectionError:
            sock.close()
            raise AuthenticationError("shard refused the connection: wrong cache secret") from None
        if not hmac.compare_digest(proof, _mac(secret, b"server", mine, nonce)):
            sock.close()
            raise AuthenticationError("shard could not prove the cache secret")
        sock.settimeout(timeout)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def queue_write(self, item: list[Any]) -> bool:
        """Queue a ``[kb, ab, vb]`` write (micro-batching); it goes out as part of one
        WRITE_MANY frame when the queue is full, before any other request, or when the owner
        calls ``send_queue`` (a short timer). Returns True if the queue was empty before."""
        queue = self.queue
        queue.append(item)
        if len(queue) >= self.batch_max:
            self.send_queue()
            return False
        return len(queue) == 1

    def send_queue(self) -> None:
        if self.queue:
            items, self.queue = self.queue, []
            self._send(msgpack.packb([Op.WRITE_MANY, items]))

    def send(self, frame: bytes) -> None:
        """Send a request whose response is read later (an error is raised by a later call)."""
        self.send_queue()
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        self.sock.sendall(frame)
        self.unacked += 1
        if self.unacked >= self.max_unacked:
            self._drain(self.max_unacked // 2)

    def _drain(self, keep: int = 0) -> None:
        while self.unacked > keep:
            status, result = _recv_obj(self.sock, self.unpacker)
            self.unacked -= 1
            if status:
                self.deferred.append(pickle.loads(result))

    def sync(self) -> None:
        """Wait until every pipelined request was applied; raise the first deferred error."""
        self.send_queue()
        self._drain()
        self._raise_deferred()

    def _raise_deferred(self) -> None:
        if self.deferred:
            errors, self.deferred = self.deferred, []
            raise errors[0]

    def begin(self, frame: bytes) -> None:
        """Send a request whose answer ``finish`` collects (lets one caller fan out)."""
        self.send_queue()  # queued writes go first: this process reads its own writes
        self.sock.sendall(frame)
        self.unacked += 1

    def finish(self) -> Any:
        """Consume earlier pipelined answers, then return the last request's result."""
        self._drain(1)
        status, result = _recv_obj(self.sock, self.unpacker)
        self.unacked -= 1
        self._raise_deferred()
        if status:
            raise pickle.loads(result)
        return result

    def call(self, frame: bytes) -> Any:
        self.begin(frame)
        return self.finish()
