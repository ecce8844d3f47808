"""``init`` and ``connect``: create a cache on Ray, or attach to a running one by name."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import control
from .client import Cache, _check_ttl
from .connector import Connector
from .control import ensure_ray
from .errors import CacheNotFoundError
from .journal import FSYNC_MODES
from .tls import TLSConfig
from .tls import resolve as resolve_tls

__all__ = ["connect", "ensure_ray", "init"]

def _check_connector(conn: Any, where: str) -> None:
    for method in ("get_id", "read", "write", "flush"):
        if not callable(getattr(conn, method, None)):
            raise TypeError(f"{where} ({type(conn).__qualname__}) has no {method}() "
                            "method; see persistroids_dist.Connector")


def _check_fn(name: str, fn: Any) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, got {type(fn).__qualname__}")


def _check_functions(functions: Any) -> dict[str, Callable[[Any], Any]]:
    """``init``'s ``functions``, checked: a dict of non-empty names to callables."""
    if functions is None:
        return {}
    if not isinstance(functions, dict):
        raise TypeError("functions must be a dict of name -> update function, got "
                        f"{type(functions).__qualname__}")
    for fname, fn in functions.items():
        if not isinstance(fname, str):
            raise TypeError(f"functions: every name must be a str, got {fname!r} "
                            f"({type(fname).__qualname__})")
        if not fname:
            raise ValueError("functions: a name must not be empty")
        if not callable(fn):
            raise TypeError(f"functions[{fname!r}] must be callable, got "
                            f"{type(fn).__qualname__}")
    return dict(functions)


def init(
    connectors: Sequence[Connector] | None = None,
    *,
    init_fn: Callable[[Any], Any] | None = None,
    merge_query_fn: Callable[..., Any] | None = None,
    cache_key: Callable[[Any], Any] | None = None,
    writes_threshold: int = 99,
    millis_threshold: float = 1000,
    checkpoint_handler: Callable[[Any], Any] | None = None,
    num_shards: int = 4,
    name: str | None = None,
    max_entries: int = 1_000_000,
    max_bytes: int | None = None,
    ttl_s: float | None = None,
    max_attempts: int = 10,
    max_pending: int | None = 1_000_000,
    max_pending_bytes: int | None = 512 * 2**20,
    backpressure_timeout_s: float = 30.0,
    store_timeout_s: float = 10.0,
    flush_process: bool = True,
    shard_wait_s: float = 30.0,
    journal: str | os.PathLike[str] | bool = True,
    fsync: str = "interval",
    detached: bool = False,
    shard_options: dict[str, Any] | None = None,
    get_if_exists: bool = False,
    address: str | None = None,
    allow_pickle: bool = True,
    functions: dict[str, Callable[[Any], Any]] | None = None,
    placement: str | dict[str, Any] | None = None,
    tcp: bool = True,
    replicas: int = 0,
    tls: TLSConfig | Mapping[str, Any] | bool | None = None,
    checkpoints: bool = False,
    checkpoint_store: Connector | None = None,
    checkpoint_every_s: float | None = None,
    checkpoint_state: Callable[[], Any] | None = None,
    restore: bool = False,
) -> Cache:
    """Start a cache of ``num_shards`` shard actors and return its handle.

    ``connectors``: stores behind the cache, in read order (default: one in-memory store).
    ``init_fn(args)``: value for a key no store has (cached, never persisted).
    ``merge_query_fn(*values)``: combines the stores' reads (default: shallow dict merge).
    ``cache_key(args)``: the cache key of read/write args (default: the args themselves).
    ``writes_threshold`` / ``millis_threshold``: a shard flushes when more keys than this are
    pending, or when its oldest pending write is this many ms old.
    ``checkpoint_handler(state)``: runs after a flush made by a call that passed
    ``checkpoint=state``, in step with the data.
    ``max_entries`` / ``max_bytes``: LRU bounds of each shard's partition.
    ``ttl_s``: how long an entry stays in the cache after it was written or read from a
    store (None: until evicted); an expired entry is read from the stores again. A store
    that expires keys itself (``RedisConnector(ttl_s=...)``) makes this at most its own.
    ``name``: lets other drivers ``connect(name)``; ``detached`` keeps the cache alive after
    the driver that created it exits (else it ends with that driver).
    ``max_attempts``: a write a store refuses on its own (while it stores the others) is
    retried, with backoff, this many times, then set aside as a dead letter
    (``cache.dead_letters()``) so the rest keeps flowing; 0 retries forever.
    ``max_pending`` / ``max_pending_bytes``: bound of each shard's write buffer (keys, and
    their key and value bytes; None: unbounded). A write to a full buffer waits for a flush
    up to ``backpressure_timeout_s`` (0: not at all), then raises BackpressureError.
    ``store_timeout_s``: how long a read of a key the cache does not hold waits for the
    stores (queued behind a running flush, or a store that is down) before it raises
    StoreUnavailableError. Stores are never called under the lock that serves cached keys:
    those reads, writes and ``metrics()`` go on while a store is slow or down.
    ``flush_process``: each shard stores its flushes of 1,000 payloads or more through a
    child process of its own, for every connector that allows it (``flush_process_safe``:
    PostgreSQL, Redis, SQLite files), so a flush's CPU (building 100k rows) never holds the
    interpreter lock the shard serves reads with. False: flushes run on the shard's store
    thread.
    ``shard_wait_s``: how long a call waits for a shard that Ray is restarting before it
    raises ShardUnavailableError.
    ``journal``: every shard appends each buffered write to a journal before acknowledging
    it, and replays it when Ray restarts the shard (shards restart by default) or a later
    ``init`` uses the same name: True (default) keeps it in a per-cache folder (see
    ``journal_directory``), a path puts it there, False turns it off. ``fsync``: when the
    journal reaches the disk: "always" (before every acknowledgement), "interval" (every
    ~100 ms, the default) or "off" (when the OS decides); a SIGKILL loses nothing in any mode.
    ``get_if_exists``: with ``name``, return the running cache of that name if there is one
    (the other arguments are then ignored), so re-running a notebook cell is harmless;
    without it, an existing name raises ValueError.
    ``shard_options``: extra Ray actor options for the shards.
    ``placement``: where the shards run. ``"spread"``: one per node as far as they go (the
    default on a cluster of more than one node); ``"pack"``: Ray's default, filling a node
    before the next (the default on one node); ``{"labels": {"key": "value", ...}}``: only
    on nodes with those Ray node labels; ``{"resources": {"name": amount}}``: only on nodes
    that have that custom resource (each shard takes ``amount``). The coordinator prefers the
    node of the process that calls ``init``. Clients reach a shard on their own node over
    its Unix socket and the others over TCP (``metrics()`` tells each shard's ``node_id``).
    ``tcp``: shards also listen on TCP on their node's address (authenticated; encrypted
    with ``tls``); False keeps them to their Unix socket, for clients on their node only.
    ``tls``: mutual TLS on those TCP connections (Unix sockets stay plain): a
    ``TLSConfig(cert_file, key_file, ca_file)`` or a dict of those three paths, which must
    exist on every node; ``True``: Ray's own TLS files (``RAY_TLS_SERVER_CERT``,
    ``RAY_TLS_SERVER_KEY``, ``RAY_TLS_CA_CERT``); ``False``: off. The default, None, is
    Ray's files when Ray's TLS is on in this process (``RAY_USE_TLS=1``), else off. The
    files are checked here (FileNotFoundError, PermissionError, or ValueError naming the
    setting and file: not PEM, a key that is not the certificate's, a certificate the CA
    did not sign). Every handle's TCP connections then use TLS too.
    ``replicas=1``: every shard keeps a backup on another node: each journal write reaches
    the backup before the write is acknowledged, and when a primary's node dies its backup
    takes over (Ray must first report the node dead, which takes it some seconds: calls to
    that shard wait, up to ``shard_wait_s``); the coordinator then places a new backup. Needs
    the journal, and a second node (or ``placement="pack"``: backups beside their primary,
    which survives a lost process, not a lost node). ``replicas=0`` (default): a node's loss
    loses its shards' unflushed writes (their journal was on its disk).
    ``address``: the Ray cluster to use if Ray is not initialized (see ``ensure_ray``):
    by default RAY_ADDRESS, else the running ``ray start`` cluster, else a small local one;
    ``"local"`` always starts a private one.
    ``functions``: update functions by name, shipped to the shards once, through Ray (like
    the connectors): ``update(args, "name")`` runs ``functions["name"]``.
    ``allow_pickle=False``: the shards unpickle nothing sent over their sockets: ``update``
    takes only a registered name (not a function) and ``checkpoint=`` is refused, both with
    PicklingRefusedError (see the README's "Trust model").
    ``checkpoints=True``: writes reach the stores only as part of a checkpoint
    (``cache.checkpoint(state)``: a consistent cut across the shards, recorded with
    ``state``); between checkpoints they are staged in the journals (which it needs).
    ``checkpoint_store``: the connector that records them (default: a SQLite file in the
    cache's journal folder). ``checkpoint_every_s``: also take one that often, with
    ``checkpoint_state()``'s state (at most one at a time). ``restore=True`` (with a
    ``name``): start from the last complete checkpoint: every write after it is dropped,
    in a running cache of that name too (``cache.last_checkpoint()`` tells its state, say
    the input offset to replay from). Without it, a restarted checkpointed cache keeps
    every acknowledged write, as any other.
    """
    if connectors is None:
        from .connectors.memory import MemoryConnector
        connectors = [MemoryConnector()]
    connectors = list(connectors)
    for i, conn in enumerate(connectors):
        _check_connector(conn, f"connectors[{i}]")
    ids = [c.get_id() for c in connectors]
    if len(set(ids)) != len(ids):
        raise ValueError(f"connector ids must be unique, got {ids}")
    for fname, fn in (("init_fn", init_fn), ("merge_query_fn", merge_query_fn),
                      ("cache_key", cache_key), ("checkpoint_handler", checkpoint_handler)):
        _check_fn(fname, fn)
    functions = _check_functions(functions)
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be True or False, got {allow_pickle!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not isinstance(writes_threshold, int) or writes_threshold < 0:
        raise ValueError(f"writes_threshold must be an int >= 0, got {writes_threshold!r}")
    if not isinstance(millis_threshold, (int, float)) or millis_threshold <= 0:
        raise ValueError(f"millis_threshold must be > 0, got {millis_threshold!r}")
    if not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if name is not None and (not isinstance(name, str) or not name or ":" in name):
        raise ValueError(f"name must be a non-empty string without ':', got {name!r}")
    if ttl_s is not None:
        _check_ttl(ttl_s)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 0:
        raise ValueError(f"max_attempts must be an int >= 0 (0: never give up), got "
                         f"{max_attempts!r}")
    for what, bound in (("max_pending", max_pending), ("max_pending_bytes", max_pending_bytes)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                  or bound < 1):
            raise ValueError(f"{what} must be a positive int or None, got {bound!r}")
    if isinstance(backpressure_timeout_s, bool) or not isinstance(
            backpressure_timeout_s, (int, float)) or backpressure_timeout_s < 0:
        raise ValueError(f"backpressure_timeout_s must be a number >= 0, got "
                         f"{backpressure_timeout_s!r}")
    for what, seconds in (("store_timeout_s", store_timeout_s), ("shard_wait_s", shard_wait_s)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"{what} must be a number of seconds > 0, got {seconds!r}")
    if not isinstance(journal, (bool, str, os.PathLike)):
        raise TypeError(f"journal must be True, False or a directory, got {journal!r}")
    if fsync not in FSYNC_MODES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
    control.check_placement(placement)
    if not isinstance(tcp, bool):
        raise TypeError(f"tcp must be True or False, got {tcp!r}")
    if not isinstance(flush_process, bool):
        raise TypeError(f"flush_process must be True or False, got {flush_process!r}")
    if isinstance(replicas, bool) or replicas not in (0, 1):
        raise ValueError(f"replicas must be 0 or 1 (one backup per shard), got {replicas!r}")
    if replicas and journal is False:
        raise ValueError("replicas=1 needs the journal (a backup is a copy of it): drop "
                         "journal=False")
    if replicas and not tcp and placement != "pack":
        raise ValueError("replicas=1 with tcp=False: a backup on another node is reached "
                         "over TCP; keep tcp=True or use placement='pack'")
    if not tcp and tls is not None and tls is not False:
        raise ValueError("tls applies to TCP connections, and tcp=False turns TCP off")
    tls_config = resolve_tls(tls) if tcp else None
    if get_if_exists and name is None:
        raise ValueError("get_if_exists=True needs a name: only a named cache can be found")
    if not isinstance(checkpoints, bool) or not isinstance(restore, bool):
        raise TypeError("checkpoints and restore must be True or False")
    if checkpoints and journal is False:
        raise ValueError("checkpoints=True needs the journal (writes between checkpoints are "
                         "staged there): drop journal=False")
    if (checkpoint_store is not None or checkpoint_every_s is not None
            or checkpoint_state is not None or restore) and not checkpoints:
        raise ValueError("checkpoint_store, checkpoint_every_s, checkpoint_state and restore "
                         "need checkpoints=True")
    if restore and name is None:
        raise ValueError("restore=True needs the name of the cache to restore")
    if checkpoint_every_s is not None and (isinstance(checkpoint_every_s, bool) or not
                                           isinstance(checkpoint_every_s, (int, float))
                                           or not checkpoint_every_s > 0):
        raise ValueError(f"checkpoint_every_s must be a number of seconds > 0, got "
                         f"{checkpoint_every_s!r}")
    if checkpoint_store is not None:
        _check_connector(checkpoint_store, "checkpoint_store")
    _check_fn("checkpoint_state", checkpoint_state)

    ensure_ray(address)
    name = name or f"anon-{uuid.uuid4().hex[:12]}"
    running = control.find_coordinator(name)
    if running is not None and restore:  # a restarted job restores the cache it left
        cache = Cache(control.spec_of(running))
        cache.restore()
        return cache
    if running is not None:
        if get_if_exists:
            return Cache(control.spec_of(running))
        raise ValueError(f"a cache named {name!r} is already running; use connect({name!r}) "
                         "or init(..., get_if_exists=True)")
    options = dict(init_fn=init_fn, merge_query_fn=merge_query_fn,
                   writes_threshold=writes_threshold, millis_threshold=millis_threshold,
                   max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s,
                   max_attempts=max_attempts, max_pending=max_pending,
                   max_pending_bytes=max_pending_bytes,
                   backpressure_timeout_s=float(backpressure_timeout_s),
                   store_timeout_s=float(store_timeout_s), flush_process=flush_process,
                   checkpoint_handler=checkpoint_handler,
                   allow_pickle=allow_pickle, functions=functions,
                   journal=journal_directory(journal, name), fsync=fsync, listen_tcp=tcp,
                   tls=tls_config, staged=checkpoints)
    return Cache(control.start_cache(
        name, num_shards, connectors, options, cache_key=cache_key,
        checkpoint_handler=checkpoint_handler, detached=detached, shard_options=shard_options,
        shard_wait_s=float(shard_wait_s), placement=placement, replicas=replicas,
        checkpoints=None if not checkpoints else {
            "store": checkpoint_store, "every_s": checkpoint_every_s,
            "state": checkpoint_state, "restore": restore}))


def journal_directory(journal: str | os.PathLike[str] | bool, name: str) -> str | None:
    """Where the shards of cache ``name`` journal (each in ``shard<i>`` below it), or None.

    ``True``: ``$PERSISTROIDS_JOURNAL_DIR/<name>``, else ``<tmp>/persistroids-<uid>/journal/
    <name>``. A directory: ``<directory>/<name>``. The same name finds the same journal, so
    a shard restarted by Ray, or a later ``init`` with that name, recovers what it holds.
    """
    if journal is False:
        return None
    if journal is True:
        root = os.environ.get("PERSISTROIDS_JOURNAL_DIR") or os.path.join(
            tempfile.gettempdir(), f"persistroids-{os.getuid()}", "journal")
    else:
        root = os.fspath(journal)
    return os.path.join(os.path.abspath(root), name)


def connect(name: str, *, address: str | None = None) -> Cache:
    """Return a handle on the running cache ``name`` (from any driver, task or notebook).

    Raises CacheNotFoundError (a LookupError) if no cache of that name runs; ``address`` is
    as for ``init``."""
    ensure_ray(address)
    coordinator = control.find_coordinator(name)
    if coordinator is None:
        why = control.why_gone(name)
        raise CacheNotFoundError(f"no running cache named {name!r}"
                                 + (f": {why}" if why else ""))
    return Cache(control.spec_of(coordinator))
