"""Backups (``persistroids_dist.replica``): a primary's journal mirrored before every
acknowledgement, and a backup promoted when the primary is lost with its disk.

No Ray: primary and backup are real processes of their own (``python -c``); the primary is
SIGKILLed and its journal folder deleted (its node's disk is gone), the backup promoted, and
a client's connection finds the new primary through its ``resolve`` function, as a Cache's
does through the coordinator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from ray import cloudpickle

from persistroids_dist import protocol
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.replica import Backup, ReplicaDeposedError
from persistroids_dist.tls import make_test_certificates
from persistroids_dist.transport import Connection

SECRET = b"r" * 32
OPTIONS = {"writes_threshold": 10**9, "millis_threshold": 10**9}

# One script for both roles. A primary attaches the backup given in argv; a backup waits
# for "promote" on stdin, then serves as the primary from its copy of the journal.
_NODE = textwrap.dedent("""
    import json, sys, time
    from persistroids_dist.connectors.sqlite import SQLiteConnector
    from persistroids_dist.host import ShardHost
    from persistroids_dist.replica import Backup
    role, db, folder, secret = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
    options = {"writes_threshold": 10**9, "millis_threshold": 10**9, "journal_path": folder}
    if role == "primary":
        host = ShardHost(0, [SQLiteConnector(db)], options, secret)
        host.attach_backup(json.loads(sys.argv[5]))
        print(json.dumps(host.address()), flush=True)
    else:
        backup = Backup(0, folder, "interval", secret, unix_path=folder + ".sock")
        print(json.dumps(backup.address), flush=True)
        assert sys.stdin.readline().strip() == "promote"
        backup.stop()
        host = ShardHost(0, [SQLiteConnector(db)], options, secret)
        print(json.dumps(host.address()), flush=True)
    while True:
        time.sleep(60)
""")


class Node:
    """A primary or a backup in a process of its own."""

    def __init__(self, role: str, tmp_path, folder: str, backup: dict | None = None) -> None:
        self.folder = str(tmp_path / folder)
        args = [role, str(tmp_path / "store.db"), self.folder, SECRET.hex()]
        if backup is not None:
            args.append(json.dumps(backup))
        self.proc = subprocess.Popen([sys.executable, "-c", _NODE, *args], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.address = self._line()

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the process did not start"
        return json.loads(line)

    def promote(self) -> dict:
        self.proc.stdin.write("promote\n")
        self.proc.stdin.flush()
        self.address = self._line()
        return self.address

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def nodes(tmp_path):
    made: list[Node] = []

    def make(role: str, folder: str, backup: dict | None = None) -> Node:
        n = Node(role, tmp_path, folder, backup)
        made.append(n)
        return n
    yield make
    for n in made:
        n.kill()


BUMP = cloudpickle.dumps(lambda v: (v or 0) + 1)
DIGEST = b"b" * 16


def bump(key: str) -> bytes:
    return protocol.update(encode_key(key), None, DIGEST, BUMP)


def segments(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".journal"):
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = f.read()
    return out


def test_the_backup_holds_the_primary_journal_byte_for_byte_before_each_answer(tmp_path):
    backup = Backup(0, str(tmp_path / "mirror"), "off", SECRET,
                    unix_path=str(tmp_path / "b.sock"))
    host = ShardHost(0, [MemoryConnector()], {**OPTIONS, "journal": str(tmp_path / "j")},
                     SECRET)
    try:
        # Written before the backup came: sent when it attaches.
        c = Connection(host.address(), SECRET)
        c.call(protocol.write(encode_key("early"), None, encode_value(1)))
        assert host.attach_backup(backup.address) == "unix"
        for i in range(50):
            c.call(protocol.write(encode_key(f"k{i}"), None, encode_value(i)))
            # Answered: so the backup already has it, without waiting for anything.
            assert segments(backup.files.directory) == segments(host.journal.directory)
        c.send(protocol.write_many([[encode_key(f"p{i}"), None, encode_value(i)]
                                    for i in range(2000)]), 2000)
        c.sync()
        assert segments(backup.files.directory) == segments(host.journal.directory)
        assert host.metrics()["backed_up"] is True
        # A flush stores everything: both drop the segments it covered.
        before = set(segments(host.journal.directory))
        host.core.flush_count()
        c.call(protocol.write(encode_key("late"), None, encode_value(2)))
        after = segments(host.journal.directory)
        assert not before & set(after) - {max(before)}
        assert segments(backup.files.directory) == after
        c.close()
    finally:
        host.close()
        backup.stop()


def test_a_promoted_backup_serves_every_acknowledged_write_and_resends_apply_once(
        nodes, tmp_path):
    backup = nodes("backup", "mirror")
    primary = nodes("primary", "journal", backup.address)
    where = {"address": primary.address}
    c = Connection(primary.address, SECRET, resolve=lambda: where["address"], wait_s=30)
    c.call(protocol.write(encode_key("w"), None, encode_value("acknowledged")))
    n = 3000
    for i in range(n):  # pipelined: hundreds are unanswered when the primary dies
        c.send(bump("counter"), 1)
        if i == n // 3:
            primary.kill()
            shutil.rmtree(primary.folder)  # its disk went with the node
            where["address"] = backup.promote()
    c.sync()
    assert c.redials >= 1
    assert decode_value(c.call(protocol.read(encode_key("counter"), None))) == n
    assert decode_value(c.call(protocol.read(encode_key("w"), None))) == "acknowledged"
    m = c.call(protocol.METRICS)
    assert m["replayed"] > 0  # it came from the mirrored journal, not from the store
    c.close()


def test_a_lost_backup_is_replaced_and_the_new_one_gets_the_whole_journal(tmp_path):
    first = Backup(0, str(tmp_path / "m1"), "off", SECRET, unix_path=str(tmp_path / "1.sock"))
    host = ShardHost(0, [MemoryConnector()], {**OPTIONS, "journal": str(tmp_path / "j")},
                     SECRET)
    try:
        host.attach_backup(first.address, timeout_s=2)
        c = Connection(host.address(), SECRET)
        c.call(protocol.write(encode_key("a"), None, encode_value(1)))
        first.server.close()
        first.files.close()  # it refuses from now on, as a dead one would stay silent
        # The shard goes on without it (the Ray actor would ask the coordinator first).
        c.call(protocol.write(encode_key("b"), None, encode_value(2)))
        assert host.metrics()["backed_up"] is False
        second = Backup(0, str(tmp_path / "m2"), "off", SECRET,
                        unix_path=str(tmp_path / "2.sock"))
        host.attach_backup(second.address)
        c.call(protocol.write(encode_key("c"), None, encode_value(3)))
        assert segments(second.files.directory) == segments(host.journal.directory)
        assert host.metrics()["backed_up"] is True
        c.close()
        second.stop()
        # Promoted, the second backup has all three.
        promoted = ShardHost(0, [MemoryConnector()], {**OPTIONS,
                             "journal_path": second.files.directory}, SECRET)
        try:
            c = Connection(promoted.address(), SECRET)
            assert [decode_value(c.call(protocol.read(encode_key(k), None)))
                    for k in "abc"] == [1, 2, 3]
            c.close()
        finally:
            promoted.close()
    finally:
        host.close()


def test_a_backup_on_another_node_is_reached_over_tcp_with_tls(tmp_path):
    tls = make_test_certificates(tmp_path / "certs")
    # No Unix socket: as a backup on another node, reached over TCP only.
    backup = Backup(0, str(tmp_path / "mirror"), "off", SECRET, unix_path=None,
                    tcp_host="127.0.0.1", tls=tls)
    host = ShardHost(0, [MemoryConnector()], {**OPTIONS, "journal": str(tmp_path / "j"),
                     "tls": tls}, SECRET)
    try:
        assert host.attach_backup(backup.address) == "tcp"
        assert host.metrics()["backup_transport"] == "tcp+tls"
        assert backup.server.tls_connections == 1
        c = Connection(host.address(), SECRET)
        for i in range(20):
            c.call(protocol.write(encode_key(f"k{i}"), None, encode_value(i)))
        assert segments(backup.files.directory) == segments(host.journal.directory)
        c.close()
    finally:
        host.close()
        backup.stop()


def test_a_deposed_primary_acknowledges_nothing_more(tmp_path):
    # The coordinator promoted the backup (it took the primary's node for dead) while the
    # primary still runs: the backup refuses its appends from then on, and asked whether it
    # may go on alone, the coordinator says no. The primary must not answer a write again.
    backup = Backup(0, str(tmp_path / "mirror"), "off", SECRET,
                    unix_path=str(tmp_path / "b.sock"))
    host = ShardHost(0, [MemoryConnector()], {**OPTIONS, "journal": str(tmp_path / "j")},
                     SECRET)
    asked = []

    def deposed(error: BaseException) -> None:  # what the actor hears from the coordinator
        asked.append(error)
        raise ReplicaDeposedError("deposed")

    host._mirror_lost = deposed
    try:
        host.attach_backup(backup.address)
        c = Connection(host.address(), SECRET)
        c.call(protocol.write(encode_key("before"), None, encode_value(1)))
        backup.stop()  # promoted: refuses appends from now on
        with pytest.raises(ConnectionError):
            c.call(protocol.write(encode_key("after"), None, encode_value(2)))
        assert len(asked) == 1
        # Nor does any other connection get an answer (not even to opening its session).
        with pytest.raises(ConnectionError):
            c2 = Connection(host.address(), SECRET)
            c2.call(protocol.write(encode_key("later"), None, encode_value(3)))
        assert len(asked) == 1  # decided once
    finally:
        host.core.stop()
        host.server.close()


def test_a_primary_notices_a_dead_backup_at_its_next_write(nodes, tmp_path):
    # The backup's process is gone and the kernel has closed its socket: the next send
    # fails at once (EPIPE on a Unix socket) instead of at the wait for the answer. That
    # write must not count as backed up.
    backup = nodes("backup", "mirror")
    host = ShardHost(0, [MemoryConnector()], {**OPTIONS, "journal": str(tmp_path / "j")},
                     SECRET)
    try:
        assert host.attach_backup(backup.address) == "unix"
        c = Connection(host.address(), SECRET)
        c.call(protocol.write(encode_key("a"), None, encode_value(1)))
        assert host.metrics()["backed_up"] is True
        backup.kill()
        time.sleep(0.2)
        c.call(protocol.write(encode_key("b"), None, encode_value(2)))
        assert host.metrics()["backed_up"] is False  # it went on alone, and knows it
        c.close()
    finally:
        host.close()
