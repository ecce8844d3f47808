"""Resends after a reconnect are applied once (sessions, ``persistroids_dist.session``).

No Ray: each shard here is a real process of its own (``python -c``), killed with SIGKILL,
and a new one started on the same journal, as Ray's restart does. The client's connection
finds the new process through its ``resolve`` function, as a Cache's does through Ray.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
from ray import cloudpickle

from persistroids_dist import UnacknowledgedWritesError, protocol
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.journal import REQUEST, SESSIONS, Journal
from persistroids_dist.transport import Connection, Op

SECRET = b"q" * 32

_SHARD = textwrap.dedent("""
    import json, sys, time
    from persistroids_dist.connectors.sqlite import SQLiteConnector
    from persistroids_dist.host import ShardHost
    db, journal, secret = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    options = {"writes_threshold": 10**9, "millis_threshold": 10**9}
    if journal != "-":
        options["journal"] = journal
    host = ShardHost(0, [SQLiteConnector(db)], options, secret)
    print(json.dumps(host.address()), flush=True)
    while True:
        time.sleep(60)
""")


class ShardProcess:
    """A shard in a process of its own; ``restart`` SIGKILLs it and starts another on the
    same store and journal."""

    def __init__(self, tmp_path, journal: bool = True) -> None:
        self.args = [str(tmp_path / "store.db"),
                     str(tmp_path / "journal") if journal else "-", SECRET.hex()]
        self.proc: subprocess.Popen | None = None
        self.address: dict = {}
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SHARD, *self.args],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, "the shard process did not start"
        self.address = json.loads(line)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def shard_process(tmp_path):
    made = []

    def make(journal: bool = True) -> ShardProcess:
        s = ShardProcess(tmp_path, journal)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


# A lambda: pickled by value, as the shard process cannot import this module.
BUMP = cloudpickle.dumps(lambda v: v + 1)
DIGEST = b"d" * 16
KEY = encode_key("counter")


def update_frame(blob: bytes | None = BUMP) -> bytes:
    return protocol.update(KEY, None, DIGEST, blob)


def read(address: dict, kb: bytes = KEY):
    c = Connection(address, SECRET)
    try:
        return decode_value(c.call(protocol.read(kb, None)))
    finally:
        c.close()


def metrics(address: dict) -> dict:
    c = Connection(address, SECRET)
    try:
        return c.call(protocol.METRICS)
    finally:
        c.close()


def applied_all(address: dict, n: int) -> None:
    deadline = time.monotonic() + 30
    while read(address) != n:
        assert time.monotonic() < deadline, f"the shard never applied {n} updates"
        time.sleep(0.01)


def lose_answers(conn: Connection) -> None:
    """Break the client's connection with the answers of everything it sent unread (as if
    the shard had died after applying them, before it could answer)."""
    conn.sock.close()


def test_a_resent_update_is_answered_not_applied_again_by_the_same_shard(shard_process):
    shard = shard_process()
    conn = Connection(shard.address, SECRET, resolve=lambda: shard.address, wait_s=10)
    conn.call(protocol.write(KEY, None, encode_value(0)))
    for i in range(100):  # pipelined: nothing is read back yet
        conn.send(update_frame(BUMP if i == 0 else None), 1,
                  lambda: update_frame(BUMP))
    applied_all(shard.address, 100)
    lose_answers(conn)
    assert decode_value(conn.call(update_frame(None))) == 101  # resends 100, then this
    conn.sync()
    assert read(shard.address) == 101
    m = metrics(shard.address)
    assert conn.redials == 1
    assert m["sessions_resumed"] == 1 and m["resends_answered"] == 100


def killed_after_applying(shard: ShardProcess, n: int) -> Connection:
    """Pipeline ``n`` updates (the function sent with the first only), wait until the shard
    applied them all, then SIGKILL it and start another on its journal, the answers unread
    and lost with the connection; the connection, ready to resume."""
    conn = Connection(shard.address, SECRET, resolve=lambda: shard.address, wait_s=30)
    conn.call(protocol.write(KEY, None, encode_value(0)))
    for i in range(n):
        conn.send(update_frame(BUMP if i == 0 else None), 1, lambda: update_frame(BUMP))
    applied_all(shard.address, n)
    shard.restart()
    lose_answers(conn)
    return conn


def test_a_shard_killed_after_applying_replays_the_session_and_answers_the_resends(
        shard_process):
    shard = shard_process()
    conn = killed_after_applying(shard, 300)  # the journal has all 300
    # The new process knows none of the functions: the resends carry theirs.
    assert decode_value(conn.call(update_frame(None), lambda: update_frame(BUMP))) == 301
    conn.sync()
    assert read(shard.address) == 301
    m = metrics(shard.address)
    assert m["resends_answered"] == 300 and m["replayed"] >= 301


def test_a_resend_answered_from_the_table_still_registers_its_function(shard_process):
    shard = shard_process()
    conn = killed_after_applying(shard, 50)
    conn.sync()  # every resend answered from the replayed table, none applied again
    assert metrics(shard.address)["resends_answered"] == 50
    # The client now takes the new process to know the function (its resends carried
    # it), and sends the digest alone: the process must have registered it.
    assert decode_value(conn.call(update_frame(None))) == 51


def test_updates_in_flight_when_the_shard_is_killed_apply_exactly_once(shard_process):
    # Kills land at arbitrary points of a stream: some updates applied and answered, some
    # applied and unanswered, some never read. Every one counts exactly once.
    shard = shard_process()
    conn = Connection(shard.address, SECRET, resolve=lambda: shard.address, wait_s=30)
    conn.call(protocol.write(KEY, None, encode_value(0)))
    sent = kills = 0
    restarter = None
    for i in range(6000):
        conn.send(update_frame(None if sent else BUMP), 1, lambda: update_frame(BUMP))
        sent += 1
        if i % 2000 == 1000:  # Ray's part: restart the killed shard, while the client waits
            restarter = threading.Thread(target=shard.restart)
            restarter.start()
            kills += 1
        if i % 2000 == 1999:
            restarter.join()
    conn.sync()
    assert read(shard.address) == sent
    assert kills == 3 and conn.redials >= 1


def test_without_a_journal_resends_are_refused_not_applied_twice(shard_process):
    shard = shard_process(journal=False)
    conn = Connection(shard.address, SECRET, resolve=lambda: shard.address, wait_s=30)
    conn.call(protocol.write(KEY, None, encode_value(0)))
    for i in range(50):
        conn.send(update_frame(BUMP if i == 0 else None), 1, lambda: update_frame(BUMP))
    applied_all(shard.address, 50)
    shard.restart()  # no journal: the updates and the session are gone with the process
    lose_answers(conn)
    with pytest.raises(UnacknowledgedWritesError) as refused:
        conn.sync()
    assert refused.value.count == 50 and "not applied again" in str(refused.value)
    assert conn.call(protocol.write(KEY, None, encode_value(7))) is None  # the session goes on
    assert read(shard.address) == 7
    assert metrics(shard.address)["resends_refused"] == 50


def test_the_session_table_outlives_released_segments(tmp_path):
    # A request's REQUEST record goes with its segment once a flush stored it; the table is
    # said again at the start of each new segment, so a restart still knows the session.
    host = ShardHost(0, [MemoryConnector()], {"journal": str(tmp_path), "writes_threshold":
                                               10**9, "millis_threshold": 10**9}, SECRET)
    try:
        conn = Connection(host.address(), SECRET)
        conn.call(protocol.write(KEY, None, encode_value(1)))
        conn.call(protocol.write(KEY, None, encode_value(2)))
        host.journal.rotate()  # what a flush does: a new segment...
        host.core.flush_count()
        kinds = [r[0] for r in Journal(str(tmp_path / "shard0"), "off").recovered()]
        assert REQUEST not in kinds and kinds.count(SESSIONS) >= 1  # ...the old ones gone
        sid = conn.sid
        host.sessions._table.clear()
        for record in Journal(str(tmp_path / "shard0"), "off").recovered():
            if record[0] in (REQUEST, SESSIONS):  # a segment also starts with the slot map
                host.sessions.replayed(record)
        assert host.sessions._table[sid].last == 2
    finally:
        host.close()


def test_malformed_sessions_are_refused_with_a_clear_error():
    host = ShardHost(0, [MemoryConnector()], {}, SECRET)
    try:
        conn = Connection(host.address(), SECRET)
        for bad in ([Op.SESSION, "not bytes", 1, 1], [Op.SESSION, b"s", 3, 2],
                    [Op.SESSION, b"s", 0, 1], [Op.SESSION, b"s"]):
            with pytest.raises((ValueError, TypeError), match="SESSION|argument"):
                conn.call(msgpack.packb(bad))
        assert conn.call(msgpack.packb([Op.PING])) == 0
    finally:
        host.close()


def test_a_connection_without_resolve_reports_a_broken_link(shard_process):
    shard = shard_process()
    conn = Connection(shard.address, SECRET)
    conn.send(protocol.write(KEY, None, encode_value(1)))
    shard.kill()
    lose_answers(conn)
    with pytest.raises(ConnectionError):
        conn.sync()
    assert conn.unaccounted() == 1
