"""The data path: msgpack frames over Unix (same host) or TCP sockets, served by each shard.

A Ray actor call costs ~850 us on a small machine; a msgpack frame over a Unix socket ~44 us.
So Ray stays the control plane (placement, restarts, discovery) and data goes over these
sockets. Frames are msgpack objects streamed back to back (the msgpack stream delimits them);
a request is ``[op, *args]``, a response ``[0, result]`` or ``[1, pickled exception]``.
Responses come back in request order, which is what lets a client pipeline writes.

Every connection starts with a mutual HMAC-SHA256 challenge over the cache's secret: the server
refuses (and counts) a peer that cannot prove it, and the client refuses a server that cannot.

With TLS (``tls.TLSConfig``), a shard's TCP connections run that same handshake, and everything
after it, inside mutual TLS; its Unix socket stays plain (it never leaves the host, and its
folder is 0700). A TLS shard first sends ``[_MAGIC_TLS]`` in the clear, where a plain one
sends its challenge, so each end tells a mismatch at once and says so, instead of both
waiting for the other to speak. Neither end lets that greeting change what it does: a
client set up for TLS never talks plain TCP, and a TLS shard never serves it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from . import protocol
from .codec import _ext_hook
from .errors import AuthenticationError, MovedError, RemoteError, UnacknowledgedWritesError
from .protocol import SEQUENCED, Op
from .tls import TLSConfig, client_context, describe, server_context

__all__ = ["Connection", "LinkError", "Op", "ShardServer"]

_monotonic = time.monotonic

log = logging.getLogger("persistroids_dist.transport")

_MAGIC = b"PRST1"
_MAGIC_TLS = b"PRST1-TLS"  # a TLS shard's greeting, in the clear, before the TLS handshake
_TLS_GREETING = msgpack.packb([_MAGIC_TLS])
_RECV = 1 << 18
_HANDSHAKE_TIMEOUT = 5.0
# What a peer may take of a shard before it proves the secret (see ShardServer).
_HANDSHAKE_MAX_BYTES = 4096  # the client's [proof, nonce] frame is 53 bytes
_MAX_HANDSHAKES = 64  # connections in the handshake at once


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def _unpacker() -> msgpack.Unpacker:
    # ext_hook: answers may carry values inline (see Packed), tuples included.
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 31,
                            ext_hook=_ext_hook)


class LinkError(ConnectionError):
    """The connection to a shard broke. Only the transport raises it, so a caller can tell
    it from an error the shard reported (which may be an OSError of its own, such as a
    store's ConnectionError or a BackpressureError)."""


class Packed(bytes):
    """A handler's result that is msgpack already: the server sends it without packing it
    again, and the client's unpacker decodes it with the frame (no per-value decode)."""


_OK_HEADER = msgpack.packb([0, None])[:2]  # the array header and status of a ``[0, result]``


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


class _Handshake:
    """A connection still proving itself: the nonce it must sign, what it sent so far (at
    most _HANDSHAKE_MAX_BYTES), and when it must be done. ``tls``: its TLS handshake is
    still running (then ``events``: what it waits for, reading or writing)."""

    __slots__ = ("sock", "nonce", "unpacker", "received", "started", "deadline", "tls",
                 "events")

    def __init__(self, sock: socket.socket, limit: float, tls: bool = False) -> None:
        self.sock = sock
        self.tls = tls
        self.events = selectors.EVENT_READ
        self.nonce = os.urandom(16)
        # A declared length over the cap fails at the header, before anything is buffered.
        self.unpacker = msgpack.Unpacker(max_buffer_size=_HANDSHAKE_MAX_BYTES)
        self.received = bytearray()
        self.started = time.monotonic()
        self.deadline = self.started + limit


class ShardServer:
    """Serves one shard's ``handlers`` on a Unix socket and, optionally, a TCP socket.

    ``handlers`` maps an opcode to a function taking the request's arguments and returning a
    msgpack-encodable result. One thread per authenticated connection: the shard's own lock
    orders them.

    Until a peer proves the secret it gets no thread: one accept thread runs every handshake,
    buffers at most _HANDSHAKE_MAX_BYTES of each, and closes a peer that has not finished
    ``handshake_timeout`` seconds after it connected (the whole handshake, however slowly it
    trickles in). At most ``max_handshakes`` run at once; further connections wait in the
    listen backlog until one ends, or until the oldest has taken a tenth of the timeout (a
    real client answers in one round trip), which is then closed to make room and counted in
    ``handshake_refused``. So peers that connect and stall can slow legitimate clients down
    by that tenth, not lock them out, while a burst of real clients is served, not refused.

    With ``tls``, TCP peers go through a TLS handshake first (client certificate required,
    checked against the CA), in the same accept thread, non-blocking: it is part of the
    handshake that the limits above bound, so a peer that starts TLS and stalls takes no
    thread and is closed like one that stalls in the HMAC challenge. (A thread per TLS
    handshake would give every connected, unproven peer a thread again.) The cost is that
    TLS handshakes are computed one after another in that thread, ~1 ms of CPU each.
    """

    def __init__(self, handlers: dict[int, Callable[..., Any]], secret: bytes, *,
                 unix_path: str | None, tcp_host: str | None = None,
                 handshake_timeout: float = _HANDSHAKE_TIMEOUT,
                 max_handshakes: int = _MAX_HANDSHAKES,
                 before_reply: Callable[[], None] | None = None,
                 sessions: Any = None, tls: TLSConfig | None = None) -> None:
        self.handlers = handlers
        # TCP connections only; the files are read here, once.
        self.tls = tls
        self._tls_context = server_context(tls) if tls is not None else None
        # ``session.Sessions``: applies each numbered request of a session once (None: every
        # request is applied as it comes, and SESSION is answered None).
        self.sessions = sessions
        # Runs before the answers of a batch of requests are sent (the shard's journal
        # commit: nothing is acknowledged before it is written).
        self.before_reply = before_reply
        self.secret = secret
        self.unix_path = unix_path
        self.tcp_host = tcp_host
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self._evict_after = handshake_timeout / 10
        self.auth_failures = 0  # peers refused: wrong proof, malformed, oversized, too slow
        self.handshake_refused = 0  # stalled handshakes closed to make room for new ones
        self.connections = 0
        self.tcp_connections = 0  # of ``connections``: from other nodes (or told to use TCP)
        self.tls_connections = 0  # of ``tcp_connections``: over TLS (all of them with ``tls``)
        self._listeners: list[socket.socket] = []
        self._handshakes: dict[socket.socket, _Handshake] = {}  # oldest first
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._closed = False

    @property
    def handshakes(self) -> int:
        """Connections in the handshake now."""
        return len(self._handshakes)

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
            s.setblocking(False)
        self._wake = socket.socketpair()
        threading.Thread(target=self._accept_loop, daemon=True,
                         name="persistroids-accept").start()
        return address

    def close(self) -> None:
        self._closed = True
        if self._wake:
            try:
                self._wake[1].send(b"x")
            except OSError:
                pass
        for s in self._listeners:
            try:
                s.close()
            except OSError:
                pass
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

    def _accept_loop(self) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        sel = selectors.DefaultSelector()
        sel.register(wake, selectors.EVENT_READ)
        pending = self._handshakes
        listening = False
        try:
            while not self._closed:
                now = time.monotonic()
                while pending:  # oldest first: the first one with time left ends the sweep
                    oldest = next(iter(pending.values()))
                    if oldest.deadline > now:
                        break
                    self._refuse(sel, oldest, "did not finish the handshake in time")
                wake_at = next(iter(pending.values())).deadline if pending else None
                accept = len(pending) < self.max_handshakes
                if not accept:
                    evictable_at = next(iter(pending.values())).started + self._evict_after
                    accept = evictable_at <= now
                    if not accept:
                        wake_at = evictable_at  # sooner than any deadline
                if accept != listening:  # full: leave new connections in the backlog
                    for s in self._listeners:
                        if accept:
                            sel.register(s, selectors.EVENT_READ, s)
                        else:
                            sel.unregister(s)
                    listening = accept
                timeout = None if wake_at is None else max(0.0, wake_at - now)
                for key, _ in sel.select(timeout):
                    if key.fileobj is wake:
                        wake.recv(64)
                    elif isinstance(key.data, _Handshake):
                        if pending.get(key.data.sock) is key.data:  # not closed meanwhile
                            self._advance(sel, key.data)
                    elif listening:
                        self._accept(sel, key.data)
        except (OSError, ValueError, KeyError):
            if not self._closed:  # else close() closed a listener under us: done
                raise
        finally:
            sel.close()
            for h in pending.values():
                h.sock.close()
            pending.clear()
            for s in self._wake:
                s.close()

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        pending = self._handshakes
        for _ in range(self.max_handshakes):  # then let the handshakes in progress move on
            evict = None
            if len(pending) >= self.max_handshakes:
                evict = next(iter(pending.values()))
                if time.monotonic() - evict.started < self._evict_after:
                    return  # the rest wait in the backlog
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of file descriptors, say: retry, not in a hot loop
                if not self._closed:
                    log.warning("shard server: accept failed: %s", e)
                    time.sleep(0.05)
                return
            if evict is not None:
                self.handshake_refused += 1
                log.warning("closed a stalled handshake to make room for a new connection")
                self._drop(sel, evict)
            tls = self._tls_context is not None and sock.family != socket.AF_UNIX
            try:
                sock.setblocking(False)
                if sock.family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if tls:
                    # The greeting in the clear (a new socket's buffer takes it whole), then
                    # TLS; the challenge follows once TLS is up (see _advance).
                    if sock.send(_TLS_GREETING) != len(_TLS_GREETING):
                        raise ConnectionError("short send")
                    assert self._tls_context is not None
                    sock = self._tls_context.wrap_socket(sock, server_side=True,
                                                         do_handshake_on_connect=False)
                    h = _Handshake(sock, self.handshake_timeout, tls=True)
                else:
                    h = _Handshake(sock, self.handshake_timeout)
                    hello = msgpack.packb([_MAGIC, h.nonce])
                    if sock.send(hello) != len(hello):  # cannot happen on a new socket
                        raise ConnectionError("short send")
                sel.register(sock, selectors.EVENT_READ, h)
            except OSError:
                sock.close()
                continue
            pending[sock] = h

    def _advance(self, sel: selectors.BaseSelector, h: _Handshake) -> None:
        """Move ``h``'s TLS handshake on, if it runs one; then read what its peer sent, and
        finish its handshake once the whole proof is in."""
        sock = h.sock
        if h.tls:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._wait_for(sel, h, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._wait_for(sel, h, selectors.EVENT_WRITE)
                return
            except ssl.SSLError as e:  # no certificate, one the CA did not sign, not TLS
                self._refuse(sel, h, f"failed the TLS handshake ({describe(e)})")
                return
            except OSError:
                self._refuse(sel, h, "closed the connection during the TLS handshake")
                return
            h.tls = False
            self._wait_for(sel, h, selectors.EVENT_READ)
            hello = msgpack.packb([_MAGIC, h.nonce])
            try:
                if sock.send(hello) != len(hello):  # the buffer holds one TLS flight at most
                    raise ConnectionError("short send")
            except OSError:
                self._refuse(sel, h, "closed the connection after the TLS handshake")
                return
            # On: anything the peer sent already may sit decrypted in the SSL object.
        while True:
            try:
                # Never more than the cap: what the client pipelined behind its proof stays
                # in the socket for the connection's own thread.
                data = sock.recv(_HANDSHAKE_MAX_BYTES - len(h.received))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                return
            except OSError:
                data = b""
            if not data:
                self._refuse(sel, h, "closed the connection during the handshake")
                return
            h.received += data
            try:
                h.unpacker.feed(data)
                frame = next(h.unpacker)
                break
            except StopIteration:
                if len(h.received) >= _HANDSHAKE_MAX_BYTES:
                    self._refuse(sel, h, "sent an oversized handshake")
                    return
                # A TLS socket may hold more decrypted bytes, which select() does not see.
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    return
            except Exception:  # malformed, or declares a length over the cap
                self._refuse(sel, h, "sent a malformed or oversized handshake")
                return
        try:
            proof, client_nonce = frame
            ok = isinstance(proof, bytes) and isinstance(client_nonce, bytes) and \
                hmac.compare_digest(proof, _mac(self.secret, b"client", h.nonce, client_nonce))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            self._refuse(sel, h, "did not prove the cache secret")
            return
        self._drop(sel, h, close=False)
        sock = h.sock
        reply = msgpack.packb(_mac(self.secret, b"server", client_nonce, h.nonce))
        try:
            if sock.send(reply) != len(reply):  # the buffer holds only our hello
                raise ConnectionError("short send")
            sock.setblocking(True)
        except OSError:
            sock.close()
            return
        self.connections += 1
        if sock.family != socket.AF_UNIX:
            self.tcp_connections += 1
            if isinstance(sock, ssl.SSLSocket):
                self.tls_connections += 1
        rest = bytes(h.received[h.unpacker.tell():])  # pipelined behind the proof
        threading.Thread(target=self._serve, args=(sock, rest), daemon=True,
                         name="persistroids-conn").start()

    def _wait_for(self, sel: selectors.BaseSelector, h: _Handshake, events: int) -> None:
        if h.events != events:
            sel.modify(h.sock, events, h)
            h.events = events

    def _refuse(self, sel: selectors.BaseSelector, h: _Handshake, why: str) -> None:
        self.auth_failures += 1  # counted before the peer can see the connection close
        log.warning("refused a connection that %s", why)
        self._drop(sel, h)

    def _drop(self, sel: selectors.BaseSelector, h: _Handshake, close: bool = True) -> None:
        del self._handshakes[h.sock]
        sel.unregister(h.sock)
        if close:
            h.sock.close()

    def _answer(self, req: Any) -> bytes:
        """The answer frame to request ``req``: ``[0, result]`` or ``[1, pickled error]``."""
        try:
            result = self.handlers[req[0]](*req[1:])
            if type(result) is Packed:  # already msgpack: sent as it is
                return _OK_HEADER + result
            return msgpack.packb([0, result])
        except Exception as e:  # the client re-raises it
            return msgpack.packb([1, encode_error(e)])

    def _serve(self, sock: socket.socket, data: bytes) -> None:
        """Answer an authenticated connection's requests, starting with ``data`` (what it sent
        behind its proof), until it closes."""
        unpacker = _unpacker()
        answer = self._answer
        before_reply = self.before_reply
        sessions = self.sessions
        link = None  # this connection's place in its session, once it opened one
        try:
            while True:
                if data:
                    unpacker.feed(data)
                    out = []
                    # Answer every complete request received so far with one send.
                    for req in unpacker:
                        if link is not None and req[0] in SEQUENCED:
                            out.append(sessions.apply(link, answer, req))
                        elif req[0] == Op.SESSION:
                            try:
                                if sessions is None:
                                    last = None
                                else:
                                    link, last = sessions.open(*req[1:])
                                out.append(msgpack.packb([0, last]))
                            except Exception as e:
                                out.append(msgpack.packb([1, encode_error(e)]))
                        else:
                            out.append(answer(req))
                    if before_reply is not None:
                        before_reply()
                    sock.sendall(b"".join(out))
                data = sock.recv(_RECV)
                if not data:
                    return
        except (OSError, ConnectionError):
            pass
        finally:
            sock.close()


class Connection:
    """A client's authenticated connection to one shard, with pipelining and resends.

    ``send`` queues a request without waiting for its response (at most ``max_unacked`` are in
    flight, which bounds both ends' buffers); ``call`` sends one and waits for its result,
    first consuming earlier responses. An error answering a pipelined request is kept and
    raised by the next ``sync``. Not thread-safe: hold ``lock`` around use.

    The connection opens a session (see ``session``) and keeps every request until its
    answer comes. Given ``resolve`` (where the shard listens now, waiting while Ray restarts
    it), a broken connection is dialled again, for up to ``wait_s`` seconds, and every
    unanswered request is sent again: the shard applies each numbered one once. Only when
    that fails does an operation raise LinkError.
    """

    def __init__(self, address: dict[str, Any], secret: bytes, *, max_unacked: int = 512,
                 batch_max: int = 512, linger: float = 0.001,
                 timeout: float | None = None,
                 resolve: Callable[[], dict[str, Any]] | None = None,
                 wait_s: float = 30.0, node_id: str | None = None,
                 tls: TLSConfig | None = None) -> None:
        self.lock = threading.Lock()
        self.max_unacked = max_unacked
        self.batch_max = batch_max
        self.linger = linger
        self.queue: list[list[Any]] = []  # writes waiting to go out as one WRITE_MANY
        self.queued_at = 0.0  # when the first write of ``queue`` was queued
        self.unacked = 0
        # Per request sent and not yet answered: [writes it carries (what is unaccounted
        # for if the connection is lost, see ``unaccounted``), frame, seq or None, None or
        # a function making the frame to resend in its place].
        self.inflight: deque[list[Any]] = deque()
        self.deferred: list[BaseException] = []
        # Pipelined requests a shard refused because the cache was resharded (MovedError:
        # nothing of them applied), in order, as inflight entries; the pool resends them by
        # the new table (``Pool.refresh``). ``moved_epoch``: the newest epoch they named.
        self.moved: list[list[Any]] = []
        self.moved_epoch = 0
        self.known_functions: set[bytes] = set()
        self.closed = False
        self.secret = secret
        self.timeout = timeout
        self.resolve = resolve
        self.wait_s = wait_s
        self.sid = os.urandom(16)
        self.next_seq = 1  # the number of the next SEQUENCED request
        self.redials = 0
        # This process's Ray node: a shard on it is reached over its Unix socket, any other
        # over TCP (``transport`` says which this connection took).
        self.node_id = node_id
        self.transport = ""
        # ``tls``: every TCP connection must be TLS (never plain; Unix sockets stay plain);
        # ``self.tls`` says whether this one is.
        self.tls_config = tls
        self.tls = False
        self._answered: list[Any] = [0]  # the inflight entry of the last answer read
        self.address = address
        try:
            self._dial(address)
        except OSError as e:  # the shard may be restarting, or have moved: see _recover
            if resolve is None:
                raise
            self._recover(e, first=True)

    def _dial(self, address: dict[str, Any]) -> None:
        """Connect to ``address`` (over TLS if it is TCP and this connection has TLS
        settings), prove the secret both ways, open the session."""
        context = None
        if address.get("unix") and self._same_node(address) \
                and os.path.exists(address["unix"]):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = address["unix"]
        elif address.get("tcp"):
            if self.tls_config is not None:  # read once per process (a ValueError if not)
                context = client_context(self.tls_config)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = tuple(address["tcp"])
        else:
            raise ConnectionError(f"no reachable address in {address}")
        secret = self.secret
        unpacker = _unpacker()
        try:
            sock.settimeout(_HANDSHAKE_TIMEOUT)
            sock.connect(target)
            hello = _recv_obj(sock, unpacker)
            if hello == [_MAGIC_TLS]:
                if context is None:
                    raise AuthenticationError(
                        f"the shard at {target} requires TLS and this client has no TLS "
                        f"settings (a handle of a cache made with init(tls=...) has them)")
                sock, unpacker = self._start_tls(sock, context, target), _unpacker()
                hello = self._after_tls(sock, unpacker, target)
            elif context is not None:
                raise AuthenticationError(f"this client requires TLS, but the shard at "
                                          f"{target} serves plain TCP (started without tls)")
            try:
                magic, nonce = hello
            except (TypeError, ValueError):
                magic = nonce = None
            if magic != _MAGIC or not isinstance(nonce, bytes):
                raise AuthenticationError("peer is not a persistroids shard")
            mine = os.urandom(16)
            sock.sendall(msgpack.packb([_mac(secret, b"client", nonce, mine), mine]))
            try:
                proof = _recv_obj(sock, unpacker)
            except ssl.SSLError as e:  # OSError, ConnectionError not
                raise AuthenticationError(f"TLS: the shard at {target} ended the connection "
                                          f"({describe(e)})") from None
            except ConnectionError:
                raise AuthenticationError(
                    "shard refused the connection: wrong cache secret") from None
            if not hmac.compare_digest(proof, _mac(secret, b"server", mine, nonce)):
                raise AuthenticationError("shard could not prove the cache secret")
            first = next((e[2] for e in self.inflight if e[2] is not None), self.next_seq)
            sock.sendall(protocol.session(self.sid, first, self.next_seq))
            status, result = _recv_obj(sock, unpacker)
            if status:
                raise pickle.loads(result)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.unpacker = unpacker
        self.transport = "unix" if sock.family == socket.AF_UNIX else "tcp"
        self.tls = isinstance(sock, ssl.SSLSocket)

    @staticmethod
    def _start_tls(sock: socket.socket, context: ssl.SSLContext, target: Any
                   ) -> ssl.SSLSocket:
        """``sock`` wrapped in TLS, its handshake done (within the socket's timeout)."""
        try:
            # No server_hostname: the shard is reached by its node's IP (see tls._build).
            return context.wrap_socket(sock)
        except ssl.SSLError as e:
            raise AuthenticationError(f"TLS handshake with the shard at {target} failed: "
                                      f"{describe(e)}") from None

    @staticmethod
    def _after_tls(sock: socket.socket, unpacker: msgpack.Unpacker, target: Any) -> Any:
        """The shard's challenge, the first thing it says inside TLS. A shard that refuses
        this client's certificate says so only now (TLS 1.3 ends the client's handshake
        first), as an alert or by closing."""
        try:
            return _recv_obj(sock, unpacker)
        except ssl.SSLError as e:
            raise AuthenticationError(f"TLS: the shard at {target} refused this client's "
                                      f"certificate ({describe(e)})") from None
        except ConnectionError:
            raise AuthenticationError(f"TLS: the shard at {target} closed the connection "
                                      f"after the TLS handshake (does the cache's CA sign "
                                      f"this client's certificate?)") from None

    def _same_node(self, address: dict[str, Any]) -> bool:
        """Whether the shard runs on this process's node: by Ray node id when both are
        known (simulated nodes share a host name and /tmp, real ones may share a name),
        else by host name."""
        if self.node_id and address.get("node_id"):
            return bool(address["node_id"] == self.node_id)
        return bool(address.get("host") == socket.gethostname())

    def _recover(self, error: OSError, first: bool = False) -> None:
        """The connection broke (or, ``first``, could not be opened): dial the shard again,
        where ``resolve`` says it is now, and send every unanswered request again, retrying
        for up to ``wait_s``; else LinkError (its cause: the last failure). A shard that is
        up, where Ray says it is, and refuses the secret three times is not restarting:
        the LinkError's cause is then its AuthenticationError."""
        if not first:
            try:
                self.sock.close()
            except OSError:
                pass
        if self.resolve is None or self.closed:
            raise LinkError(f"connection to the shard broke: {error}") from error
        what = "could not be opened" if first else "broke"
        deadline = _monotonic() + self.wait_s
        delay = 0.01
        refusals = 0
        while True:
            try:
                try:
                    self._dial(self.address)
                except OSError:
                    # The shard moved (Ray restarted it: a new socket) or is restarting (an
                    # AuthenticationError too: a shard closing as it dies).
                    try:
                        self.address = self.resolve()  # waits while Ray restarts it
                    except Exception as e:  # gone for good, or not back in its wait
                        raise LinkError(f"connection to the shard {what} ({error}), and the "
                                        f"shard did not come back: {e}") from e
                    try:
                        self._dial(self.address)
                    except AuthenticationError as e:
                        refusals += 1
                        if refusals >= 3:
                            raise LinkError(f"the shard refused the connection {refusals} "
                                            f"times: {e}") from e
                        raise
                if not first:
                    self.redials += 1
                self.known_functions.clear()  # a new process knows none of them
                if self.inflight:
                    self.sock.sendall(b"".join(e[1] if e[3] is None else e[3]()
                                               for e in self.inflight))
                return
            except LinkError:
                raise
            except OSError as e:
                if hasattr(self, "sock"):
                    try:
                        self.sock.close()
                    except OSError:
                        pass
                if self.closed or _monotonic() >= deadline:
                    raise LinkError(f"connection to the shard {what} ({error}), and it "
                                    f"could not be opened within {self.wait_s:g} s: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def queue_write(self, item: list[Any]) -> bool:
        """Queue a ``[kb, ab, vb]`` write (micro-batching); it goes out as part of one
        WRITE_MANY frame when the queue is full, before any other request, when a write is
        queued ``linger`` seconds or more after the queue's first one (so a busy writer sends
        on time by itself, whether or not the linger thread gets the interpreter), or when
        the owner calls ``send_queue`` (the linger thread, for a writer that went quiet).
        Returns True if the queue was empty before."""
        queue = self.queue
        queue.append(item)
        if len(queue) == 1:
            self.queued_at = _monotonic()
            return True
        if len(queue) >= self.batch_max or _monotonic() - self.queued_at >= self.linger:
            self.send_queue()
        return False

    def send_queue(self) -> None:
        if self.queue:
            items, self.queue = self.queue, []
            self._send(protocol.write_many(items), len(items))

    def send(self, frame: bytes, writes: int = 1,
             resend: Callable[[], bytes] | None = None) -> None:
        """Send a request whose response is read later (an error is raised by a later call).
        ``writes``: how many writes it carries, for ``unaccounted``; ``resend``: makes the
        frame to send in its place after a reconnect (an update with its function, which a
        restarted shard does not know)."""
        self.send_queue()
        self._send(frame, writes, resend)

    def _send(self, frame: bytes, writes: int,
              resend: Callable[[], bytes] | None = None) -> None:
        # Every frame is a msgpack array of fewer than 16 items (a one-byte header), so its
        # opcode is its second byte.
        seq = None
        if frame[1] in SEQUENCED:
            seq = self.next_seq
            self.next_seq = seq + 1
        # First: a send that fails half-way still counts it, and resends it.
        self.inflight.append([writes, frame, seq, resend])
        self.unacked += 1
        self._sendall(frame)
        if self.unacked >= self.max_unacked:
            self._drain(self.max_unacked // 2)

    def _sendall(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as e:
            self._recover(e)  # resends every unanswered frame, this one included

    def _recv_answer(self) -> tuple[int, Any]:
        while True:
            try:
                answer = _recv_obj(self.sock, self.unpacker)
                break
            except OSError as e:  # ConnectionError included
                self._recover(e)
        self.unacked -= 1
        self._answered = self.inflight.popleft()
        return answer

    def _drain(self, keep: int = 0) -> None:
        while self.unacked > keep:
            status, result = self._recv_answer()
            if status:
                error = pickle.loads(result)
                if type(error) is MovedError:  # refused whole: resent by the new table
                    self.moved.append(self._answered)
                    self.moved_epoch = max(self.moved_epoch, error.epoch)
                else:
                    self._defer(error)

    def _defer(self, error: BaseException) -> None:
        deferred = self.deferred
        if type(error) is UnacknowledgedWritesError:  # a refused resend: count its writes
            count = max(1, self._answered[0])
            if deferred and type(deferred[-1]) is UnacknowledgedWritesError \
                    and deferred[-1].shard == error.shard:  # one error for the whole run
                count += deferred.pop().count
            error = UnacknowledgedWritesError(error.shard, count, error.detail)
        deferred.append(error)

    def unaccounted(self) -> int:
        """Writes queued or sent here whose answer never came: after a broken connection,
        each may or may not have been applied."""
        return len(self.queue) + sum(e[0] for e in self.inflight) + \
            sum(e[0] for e in self.moved)

    def sync(self) -> None:
        """Wait until every pipelined request was applied; raise the first deferred error."""
        self.send_queue()
        self._drain()
        self._raise_deferred()

    def _raise_deferred(self) -> None:
        if self.deferred:
            errors, self.deferred = self.deferred, []
            raise errors[0]

    def begin(self, frame: bytes, resend: Callable[[], bytes] | None = None) -> None:
        """Send a request whose answer ``finish`` collects (lets one caller fan out)."""
        self.send_queue()  # queued writes go first: this process reads its own writes
        # Its caller waits for the answer and hears of a failure: 0 writes unaccounted.
        self._send(frame, 0, resend)

    def finish(self) -> Any:
        """Consume earlier pipelined answers, then return the last request's result. An
        error of an earlier pipelined request is kept for ``sync`` (raising it here would
        hide this request's own result, and ``sync`` would then report success)."""
        self._drain(1)
        status, result = self._recv_answer()
        if status:
            raise pickle.loads(result)
        return result

    def call(self, frame: bytes, resend: Callable[[], bytes] | None = None) -> Any:
        self.begin(frame, resend)
        return self.finish()
