"""TLS through Ray: ``init(tls=...)`` checks its files, the shards serve TCP over mutual TLS,
and a client that takes itself for a process on another node (so it dials TCP, as the N1
benchmark's reader does) reads and writes over TLS; the transport is checked on both ends."""

from __future__ import annotations

import shutil
import uuid

import pytest
import ray

import persistroids_dist as pd
from persistroids_dist.tls import make_test_certificates

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command to make certificates")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_certificates(tmp_path_factory.mktemp("certs"))


# max_calls=1: the worker exits after the task, so no later test's task runs in a process
# that takes itself for another node.
@ray.remote(num_cpus=0, max_calls=1, max_retries=0)
def from_another_node(cache, keys, plain=False):
    from persistroids_dist import control

    control._NODE_ID[:] = ["another-node"]  # what a process on another node sees
    if plain:  # a connection without the TLS settings: must be refused, not served
        from persistroids_dist.transport import Connection

        spec = cache._spec
        try:
            Connection(spec.addresses[0], spec.secret, node_id=control.local_node_id())
        except pd.AuthenticationError as e:
            return str(e)
        return "served"
    seen = [cache.read(k) for k in keys]
    for k in keys:
        cache.update(k, lambda v: v + 1)
    cache.write("from-task", "over tls", wait=True)
    links = sorted({(c.transport, c.tls) for c in cache._pool.conns if c is not None})
    return seen, links


def test_a_client_on_another_node_reads_and_writes_over_tls(make_cache, certs):
    name = f"tls-{uuid.uuid4().hex[:8]}"
    cache = make_cache(init_fn=lambda a: 0, name=name,
                       tls={"cert_file": certs.cert_file, "key_file": certs.key_file,
                            "ca_file": certs.ca_file})
    assert cache._spec.tls == certs
    keys = [f"k{i}" for i in range(8)]  # both shards
    assert len({cache.shard_of(k) for k in keys}) == 2
    for i, k in enumerate(keys):
        cache.write(k, i)
    cache.sync()
    seen, links = ray.get(from_another_node.remote(cache, keys), timeout=120)
    assert seen == list(range(8))
    assert links == [("tcp", True)]  # every connection of the task: TCP inside TLS
    assert cache.read_many(keys) == [i + 1 for i in range(8)]
    assert cache.read("from-task") == "over tls"
    # The driver is on the shards' node: Unix sockets, plain.
    assert {(c.transport, c.tls) for c in cache._pool.conns if c is not None} == {
        ("unix", False)}
    shards = cache.metrics()["shards"]
    assert all(m["tls"] for m in shards)
    assert [m["connections_tls"] for m in shards] == [1, 1]
    assert [m["connections_tcp"] for m in shards] == [1, 1]
    assert sum(m["auth_failures"] for m in shards) == 0
    # A handle from connect() has the settings too (they are in the spec).
    assert pd.connect(name)._spec.tls == certs
    # Without them, TCP to these shards is refused, saying why.
    refused = ray.get(from_another_node.remote(cache, keys, plain=True), timeout=120)
    assert "requires TLS" in refused


def test_plain_shards_by_default_report_no_tls(make_cache):
    cache = make_cache(num_shards=1)
    assert cache._spec.tls is None
    assert cache.metrics()["shards"][0]["tls"] is False


def test_init_names_what_is_wrong_with_tls_settings(make_cache, certs, tmp_path):
    good = {"cert_file": certs.cert_file, "key_file": certs.key_file,
            "ca_file": certs.ca_file}
    other = make_test_certificates(tmp_path, "other")
    with pytest.raises(FileNotFoundError, match="ca_file .*missing.pem"):
        make_cache(tls={**good, "ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ValueError, match="key_file .* do not make a certificate and its key"):
        make_cache(tls={**good, "key_file": other.key_file})
    with pytest.raises(ValueError, match="signed by that CA"):
        make_cache(tls={**good, "ca_file": other.ca_file})
    with pytest.raises(TypeError, match="tls must be"):
        make_cache(tls="on")
    with pytest.raises(ValueError, match="tcp=False"):
        make_cache(tls=good, tcp=False)
