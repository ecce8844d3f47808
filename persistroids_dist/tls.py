"""Optional TLS on the shards' TCP data path: settings, validation, and the SSL contexts.

``init(tls=...)`` takes a ``TLSConfig`` (or a dict of its fields), ``True`` (Ray's own TLS
files), ``False`` (off) or ``None`` (the default: Ray's files if Ray's TLS is on, else off).
Only TCP connections are wrapped: a Unix socket never leaves its host and its folder is 0700.

Both ends verify the other against the CA (mutual TLS), with the same certificate and key:
like Ray's own TLS, one certificate per node serves as server and client certificate. Inside
TLS the HMAC handshake over the cache's secret runs unchanged, so a peer needs both a
certificate the CA signed and the cache's secret.

The settings are file paths, and every process that serves or dials TCP reads the files
itself: the paths must exist on every node (as Ray's own TLS files must).
"""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

__all__ = ["TLSConfig", "client_context", "describe", "make_test_certificates", "resolve",
           "server_context"]

_RAY_ENV = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


@dataclass(frozen=True)
class TLSConfig:
    """Where a cache's TLS files are, on every node: PEM files for this node's certificate
    (``cert_file``), its private key (``key_file``) and the CA that signed every node's
    certificate (``ca_file``).

    ``from_ray``: these are Ray's own TLS files (``RAY_TLS_SERVER_CERT``,
    ``RAY_TLS_SERVER_KEY``, ``RAY_TLS_CA_CERT``). Each process then takes the paths from its
    own environment when Ray's TLS is on there (Ray lets each node point to its own files),
    and the paths recorded here (the driver's) otherwise.

    Only paths: the key itself never travels in a handle (see ``CacheSpec.tls``).
    """

    cert_file: str
    key_file: str
    ca_file: str
    from_ray: bool = False

    def effective(self) -> TLSConfig:
        """The files this process uses (differs from ``self`` only with ``from_ray``)."""
        if self.from_ray:
            env = ray_tls_from_env()
            if env is not None:
                return env
        return self


def ray_tls_from_env() -> TLSConfig | None:
    """Ray's TLS files if Ray's TLS is on in this process's environment (``RAY_USE_TLS`` as
    Ray reads it, and all three paths set), else None."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    paths = [os.environ.get(name) for name in _RAY_ENV]
    if not all(paths):
        missing = [name for name, p in zip(_RAY_ENV, paths) if not p]
        raise ValueError(f"tls: RAY_USE_TLS is on but {', '.join(missing)} is not set")
    return TLSConfig(*(os.path.abspath(p) for p in paths), from_ray=True)  # type: ignore[arg-type]


def resolve(tls: TLSConfig | Mapping[str, Any] | bool | None) -> TLSConfig | None:
    """What ``init(tls=...)`` means, checked: a TLSConfig with absolute paths, or None (off).

    ``None``: Ray's TLS files when Ray's TLS is on here (``RAY_USE_TLS=1``), else off.
    ``False``: off. ``True``: Ray's TLS files, which must be set. A TLSConfig or a mapping
    with ``cert_file``, ``key_file`` and ``ca_file``: those files.

    Raises TypeError for a value of the wrong kind, FileNotFoundError for a file that is not
    there, PermissionError for one that cannot be read, and ValueError for files that do not
    make a working TLS setup (not PEM, a key that is not the certificate's, a certificate the
    CA did not sign); each message says which setting and file.
    """
    if tls is None or tls is False:
        return None if tls is False else _checked(ray_tls_from_env())
    if tls is True:
        config = ray_tls_from_env()
        if config is None:
            raise ValueError("tls=True takes Ray's TLS files, but Ray's TLS is not on here "
                             "(RAY_USE_TLS=1 with RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and "
                             "RAY_TLS_CA_CERT); pass tls={'cert_file': ..., 'key_file': ..., "
                             "'ca_file': ...} instead")
        return _checked(config)
    if isinstance(tls, TLSConfig):
        config = tls
    elif isinstance(tls, Mapping):
        names = [f.name for f in fields(TLSConfig) if f.name != "from_ray"]
        unknown = sorted(set(tls) - set(names))
        missing = [n for n in names if n not in tls]
        if unknown or missing:
            raise TypeError(f"tls needs exactly the keys {names}; "
                            + (f"unknown: {unknown} " if unknown else "")
                            + (f"missing: {missing}" if missing else ""))
        config = TLSConfig(**{n: tls[n] for n in names})
    else:
        raise TypeError(f"tls must be None, True, False, a TLSConfig or a dict with cert_file, "
                        f"key_file and ca_file, got {tls!r}")
    for f in ("cert_file", "key_file", "ca_file"):
        path = getattr(config, f)
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"tls: {f} must be a path, got {path!r}")
    # Absolute: shard processes run in other working directories.
    return _checked(TLSConfig(os.path.abspath(os.fspath(config.cert_file)),
                              os.path.abspath(os.fspath(config.key_file)),
                              os.path.abspath(os.fspath(config.ca_file)), config.from_ray))


def _checked(config: TLSConfig | None) -> TLSConfig | None:
    """``config`` once its files exist, can be read and make contexts that complete a TLS
    handshake with each other (in memory: the certificate chains to the CA)."""
    if config is None:
        return None
    for f in ("cert_file", "key_file", "ca_file"):
        path = getattr(config, f)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tls: {f} {path!r} does not exist or is not a file")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise PermissionError(f"tls: {f} {path!r} cannot be read: {e}") from None
    server = _build(config, server_side=True)
    client = _build(config, server_side=False)
    _handshake_in_memory(server, client, config)
    return config


def _build(config: TLSConfig, *, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        try:
            ctx.load_cert_chain(config.cert_file, config.key_file)
        except ssl.SSLError as e:
            raise ValueError(f"tls: cert_file {config.cert_file!r} and key_file "
                             f"{config.key_file!r} do not make a certificate and its key "
                             f"(not PEM, or the key is not the certificate's): {e}") from None
        try:
            ctx.load_verify_locations(cafile=config.ca_file)
        except ssl.SSLError as e:
            raise ValueError(f"tls: ca_file {config.ca_file!r} holds no PEM certificate: "
                             f"{e}") from None
    except OSError as e:
        # Checked at init on the driver's node; this is another process (a shard, a client)
        # that does not find them. A ValueError: no caller retries it as a network error.
        raise ValueError(f"tls: this process cannot read the cache's TLS files (cert_file "
                         f"{config.cert_file!r}, key_file {config.key_file!r}, ca_file "
                         f"{config.ca_file!r}; they must be at these paths on every node): "
                         f"{e}") from None
    # Both ends present a certificate and verify the other's against the CA alone (no
    # system CAs: only this cluster's CA vouches for a node).
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        ctx.num_tickets = 0  # connections live long and never resume a session
    else:
        # No host name check: clients reach shards by the node IP Ray reports, which node
        # certificates (Ray's own included) rarely name. A peer still needs a certificate
        # the cluster's CA signed, and, inside TLS, the HMAC handshake proves that the
        # shard knows this cache's secret, which is what names the shard.
        ctx.check_hostname = False
    return ctx


def _handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext,
                         config: TLSConfig) -> None:
    """Run a TLS handshake between the two contexts through memory buffers, so a certificate
    the CA did not sign fails at ``init``, not at every connection later."""
    bios = [ssl.MemoryBIO(), ssl.MemoryBIO()]  # client to server, server to client
    c = client.wrap_bio(bios[1], bios[0], server_side=False)
    s = server.wrap_bio(bios[0], bios[1], server_side=True)
    done = [False, False]
    try:
        for _ in range(10):
            for i, end in enumerate((c, s)):
                if not done[i]:
                    try:
                        end.do_handshake()
                        done[i] = True
                    except ssl.SSLWantReadError:
                        pass
            if all(done):
                return
    except ssl.SSLError as e:
        raise ValueError(f"tls: a handshake between two ends using cert_file "
                         f"{config.cert_file!r} and ca_file {config.ca_file!r} fails "
                         f"(is the certificate signed by that CA?): {describe(e)}") from None
    raise ValueError("tls: a test handshake between two ends with these files did not finish")


def describe(error: ssl.SSLError) -> str:
    """The useful part of an SSL error: why a certificate was refused, or OpenSSL's reason."""
    return str(getattr(error, "verify_message", None) or error.reason or error)


def server_context(config: TLSConfig) -> ssl.SSLContext:
    """A shard's SSL context: its certificate, and client certificates required (the CA's)."""
    return _build(config.effective(), server_side=True)


@lru_cache(maxsize=16)
def _client_context(config: TLSConfig) -> ssl.SSLContext:
    return _build(config, server_side=False)


def client_context(config: TLSConfig) -> ssl.SSLContext:
    """A client's SSL context: its certificate, and the shard's verified against the CA.
    Made once per process and settings (the files are read then)."""
    return _client_context(config.effective())


def make_test_certificates(directory: str | os.PathLike[str], name: str = "node"
                           ) -> TLSConfig:
    """For tests and benchmarks only: a throwaway CA and one certificate it signed (EC
    P-256, valid one day), made with the ``openssl`` command in ``directory``. Called again
    with another ``name`` it makes another CA: certificates of different names do not
    verify each other. Never use these keys for anything real."""
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    ca_key, ca = os.path.join(d, f"{name}-ca.key"), os.path.join(d, f"{name}-ca.pem")
    key, csr = os.path.join(d, f"{name}.key"), os.path.join(d, f"{name}.csr")
    cert = os.path.join(d, f"{name}.pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", f"/CN={name} test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "1")
    for path in (ca_key, key):
        os.chmod(path, 0o600)
    return TLSConfig(cert, key, ca)
