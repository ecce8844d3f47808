"""Exclusive leases at the protocol level, without Ray: an in-process shard host and two
client pools (two owners) in one test process, so message order can be forced."""

from __future__ import annotations

import threading

import msgpack
import pytest

from persistroids_dist import LeaseLostError
from persistroids_dist.client import Cache
from persistroids_dist.codec import decode_value, encode_key, encode_value
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.host import ShardHost
from persistroids_dist.pool import Pool
from persistroids_dist.transport import Connection, Op

SECRET = b"L" * 32


@pytest.fixture
def host():
    h = ShardHost(0, [MemoryConnector()], {"init_fn": lambda a: 0}, SECRET)
    yield h
    h.close()


def spec_for(host: ShardHost) -> dict:
    return {"name": "lease-proto", "secret": SECRET, "num_shards": 1,
            "addresses": [host.address()], "shards": [None], "cache_key": None}


class _OwnPool(Cache):
    """A Cache handle with a pool of its own: a second "process" in this one."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self._pool = Pool(spec)


def test_a_recall_never_releases_a_lease_whose_writes_are_still_on_their_way(host):
    # Bug: the owner's exit RELEASE (with its writes) was in flight when the recall came; the
    # poller sent an empty RELEASE for the key, the shard dropped the lease, the waiting reader
    # saw the old value, and the owner's real RELEASE was then refused: an acknowledged
    # write lost although the owner had read it back.
    owner, other = _OwnPool(spec_for(host)), _OwnPool(spec_for(host))
    own = owner._pool.leases
    owner.lease("kept").acquire()  # keeps this shard's lease poller running
    lease = owner.lease("k").acquire()
    owner.write("k", "written under the lease")
    assert owner.read("k") == "written under the lease"
    with own.lock:
        del own.wanted[encode_key("k")]
    lease.held = False
    pushes = own.take([encode_key("k")])  # the exit RELEASE, taken but not yet sent

    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(other.read("k")))
    reader.start()
    reader.join(0.5)  # the recall reaches the poller, which holds nothing for "k"
    assert reader.is_alive(), f"the reader went ahead of the owner's RELEASE and saw {seen}"

    own.push(pushes)  # the RELEASE lands
    reader.join(10)
    assert seen == ["written under the lease"]
    assert other.read("k") == "written under the lease"
    owner._pool.close()
    other._pool.close()


def _call(conn: Connection, *req):
    return conn.call(msgpack.packb(list(req)))


def test_a_late_release_of_an_earlier_grant_leaves_the_newer_grant_alone(host):
    # Bug: RELEASE carried no lease identity, so a late RELEASE for a grant that had ended
    # deleted the newer grant of the same owner; owner and shard then disagreed.
    conn = Connection(host.address(), SECRET)
    kb, me = encode_key("g"), b"o" * 16
    gen1, [v0] = _call(conn, Op.LEASE, [kb], me, 5000.0)
    assert decode_value(v0) == 0
    _call(conn, Op.RELEASE, me, [], [[kb, gen1]])
    gen2, _ = _call(conn, Op.LEASE, [kb], me, 5000.0)
    assert gen2 != gen1
    _call(conn, Op.RELEASE, me, [], [[kb, gen1]])  # late, names the old grant
    assert host.metrics()["leased_keys"] == 1
    # Writes under the old grant are refused; under the current one they apply.
    with pytest.raises(LeaseLostError, match="lost"):
        _call(conn, Op.RELEASE, me, [[kb, None, encode_value("old"), gen1]], [])
    assert _call(conn, Op.RELEASE, me, [[kb, None, encode_value("new"), gen2]],
                 [[kb, gen2]]) == 1
    assert host.metrics()["leased_keys"] == 0
    assert decode_value(_call(conn, Op.READ, kb, None)) == "new"
    conn.close()


def test_a_renewal_renews_only_the_grants_it_names(host):
    conn = Connection(host.address(), SECRET)
    kb, me = encode_key("r"), b"p" * 16
    gen, _ = _call(conn, Op.LEASE, [kb], me, 300.0)
    short = host._leases[kb].expires
    # A poll naming another generation does not keep this grant alive...
    assert _call(conn, Op.POLL, me, 60_000.0, 0.0, [[kb, gen + 1000]]) == []
    assert host._leases[kb].expires == short
    # ...one naming it does.
    _call(conn, Op.POLL, me, 60_000.0, 0.0, [[kb, gen]])
    assert host._leases[kb].expires > short + 10
    conn.close()
