"""``init`` / ``connect`` / ``ensure_ray``: which Ray cluster they use, named caches found
again, and errors that say what happened (in the library's own types)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import ray

import persistroids_dist as pd
from persistroids_dist.connectors.memory import MemoryConnector
from persistroids_dist.control import _init_options

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(pd.__file__)))


class FlakyMemory(MemoryConnector):
    """In-memory store whose flush fails while a flag file exists (seen by every process)."""

    def __init__(self, flag):
        super().__init__()
        self.flag = str(flag)

    def flush(self, payloads):
        if os.path.exists(self.flag):
            raise OSError("store unavailable (flag file present)")
        super().flush(payloads)


# -- which cluster: the decision, without starting anything ---------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_cluster_env(monkeypatch, tmp_path):
    """No RAY_ADDRESS, and Ray's temp dir (where `ray start` records its cluster) in tmp_path."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return tmp_path


def record_cluster(tmp_path, address):
    """Write what `ray start` writes: the cluster a plain ray.init() joins."""
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)


@pytest.fixture
def answering():
    """The address of something listening, as a running cluster's GCS would be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_with_no_cluster_around_a_small_local_one_is_started(no_cluster_env):
    opts, how = _init_options(None, {})
    assert how == "start"
    assert opts["address"] == "local" and opts["include_dashboard"] is False
    assert opts["num_cpus"] == min(4, os.cpu_count() or 1)


def test_a_recorded_ray_start_cluster_is_joined_without_sizing_arguments(no_cluster_env,
                                                                         answering):
    record_cluster(no_cluster_env, answering)
    opts, how = _init_options(None, {})
    assert how == "recorded"
    # as a plain ray.init(): no address (Ray finds the cluster itself), nothing that sizes one
    assert not {"address", "num_cpus", "include_dashboard", "_node_ip_address"} & set(opts)


def test_a_recorded_cluster_that_does_not_answer_counts_as_none(no_cluster_env):
    record_cluster(no_cluster_env, f"127.0.0.1:{free_port()}")  # crashed, or before a reboot
    with pytest.warns(RuntimeWarning, match="does not answer; starting a local one"):
        opts, how = _init_options(None, {})
    assert how == "start" and opts["address"] == "local"


def test_sizing_arguments_or_address_local_start_a_private_ray_next_to_a_cluster(
        no_cluster_env, answering):
    record_cluster(no_cluster_env, answering)
    opts, how = _init_options(None, {"num_cpus": 2})  # what tests/conftest.py passes
    assert how == "start" and opts["address"] == "local" and opts["num_cpus"] == 2
    opts, how = _init_options("local", {})
    assert how == "start" and opts["address"] == "local"


def test_ray_address_and_an_explicit_address_are_joined(no_cluster_env, monkeypatch):
    opts, how = _init_options("192.0.2.9:6380", {})
    assert how == "address" and opts["address"] == "192.0.2.9:6380"
    assert "num_cpus" not in opts and "include_dashboard" not in opts
    with pytest.raises(ValueError, match="num_cpus.*address='local'"):
        _init_options("192.0.2.9:6380", {"num_cpus": 2})
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.9:6380")
    opts, how = _init_options(None, {})
    assert how == "RAY_ADDRESS" and "address" not in opts and "num_cpus" not in opts
    with pytest.raises(ValueError, match="RAY_ADDRESS='192.0.2.9:6380'.*num_cpus"):
        _init_options(None, {"num_cpus": 2})
    assert _init_options("local", {})[1] == "start"  # "local" is explicit: RAY_ADDRESS waits
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert _init_options(None, {"num_cpus": 2})[0]["num_cpus"] == 2


# -- next to a real `ray start` cluster -----------------------------------------------------

def child_env(tmp: str) -> dict[str, str]:
    """A fresh shell's environment: no RAY_ADDRESS or auth mode inherited from this test
    process's own Ray; Ray's temp dir (and so the recorded cluster) private to the test."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = tmp
    env["PYTHONPATH"] = os.pathsep.join([REPO_DIR, TESTS_DIR])
    return env


def run(code: str, env: dict[str, str], timeout: float = 240) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_DIR,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.fixture
def ray_start_cluster():
    """A `ray start --head` cluster of 1 CPU in a private temp dir (so other Ray users on this
    machine never see it); yields (its address, env of a fresh shell that would find it).

    Stopped by process group and by its temp dir in the command line, never by `ray stop`
    (which stops every Ray on the machine)."""
    tmp = tempfile.mkdtemp(prefix="pdrs-", dir="/tmp")  # short: Ray's socket paths live here
    env = child_env(tmp)
    port = free_port()
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
           "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={os.path.join(tmp, 'ray')}",
           f"--dashboard-agent-listen-port={free_port()}"]
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    recorded = os.path.join(tmp, "ray", "ray_current_cluster")
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(recorded):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                with open(log.name) as f:
                    pytest.fail(f"`ray start` did not come up:\n{f.read()[-3000:]}")
            time.sleep(0.5)
        time.sleep(0.5)  # the file is written in one go, but let it land
        with open(recorded) as f:
            address = f.read().strip()
        assert address.endswith(f":{port}"), address
        yield address, env
    finally:
        _stop_cluster(proc, tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_cluster(proc: subprocess.Popen, tmp: str) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # `ray start` and what it spawned: its own session
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Anything that left the group (workers): only processes naming this cluster's temp dir.
    for _ in range(20):
        strays = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        strays.append(int(entry))
            except (ValueError, OSError):
                pass
        if not strays:
            return
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)

CREATE_AND_WAIT = """
import sys, ray, persistroids_dist as pd
cache = pd.init(name="next-to-ray-start", init_fn=lambda args: 0, num_shards=2)
cache.write("from-job", 7, wait=True)
print(ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"), flush=True)
print("ready", flush=True)
sys.stdin.read()
cache.shutdown()
"""

CONNECT = """
import ray, persistroids_dist as pd
cache = pd.connect("next-to-ray-start")
print(ray.get_runtime_context().gcs_address, cache.read("from-job"))
"""

PRIVATE = """
import ray, persistroids_dist as pd
pd.ensure_ray(num_cpus=2)
print(ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"))
"""


def test_init_joins_a_running_ray_start_cluster_and_num_cpus_starts_a_private_one(
        ray_start_cluster):
    """As a job and a notebook on one machine: both call plain init/connect (no address) and
    share one cache on the `ray start` cluster; ``ensure_ray(num_cpus=2)`` stays apart."""
    address, env = ray_start_cluster
    job = subprocess.Popen([sys.executable, "-c", CREATE_AND_WAIT], env=env, cwd=REPO_DIR,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        first = job.stdout.readline().split()
        assert job.stdout.readline().strip() == "ready", job.communicate(timeout=60)[1][-3000:]
        assert first == [address, "1.0"]  # the `ray start` cluster (1 CPU), not a new one

        assert run(CONNECT, env) == [address, "7"]  # the notebook finds the job's cache

        gcs, cpus = run(PRIVATE, env)
        assert gcs != address and cpus == "2.0"
    finally:
        _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]


# -- errors that say what happened ----------------------------------------------------------

def test_connect_to_a_missing_name_raises_cache_not_found(ray_session):
    with pytest.raises(pd.CacheNotFoundError) as missing:
        pd.connect("nope")
    assert isinstance(missing.value, LookupError)
    assert str(missing.value) == "no running cache named 'nope'"


DRIVER = """
import sys, persistroids_dist as pd
cache = pd.init(name="left-by-driver", init_fn=lambda args: 0, num_shards=2)
cache.write("k", 1, wait=True)
print("ready", flush=True)
sys.stdin.read()
"""


def _until(fn, timeout=60.0):
    """Call ``fn`` until it raises something other than ConnectionError (the dying shard
    may still answer, or drop a connection, for a moment); return that exception."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fn()
        except ConnectionError:
            pass
        except Exception as e:
            return e
        time.sleep(0.2)
    pytest.fail(f"{fn} kept working for {timeout}s")


def test_a_cache_whose_creating_driver_exited_says_so_and_points_to_detached(ray_session):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=REPO_DIR,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready", driver.communicate()[1][-3000:]
        cache = pd.connect("left-by-driver")
        assert cache.read("k") == 1 and cache._spec["detached"] is False
    finally:
        _, err = driver.communicate(timeout=60)  # closes its stdin: the driver exits
    assert driver.returncode == 0, err[-3000:]

    used = _until(lambda: cache.read("k"))
    assert isinstance(used, pd.CacheClosedError), repr(used)
    assert "driver that created the cache exited" in str(used), str(used)
    assert "init(..., detached=True)" in str(used)
    assert "was the cache shut down" not in str(used)

    with pytest.raises(pd.CacheClosedError, match=r"driver that created it exited.*detached=True"):
        cache.flush_now()

    missing = _until(lambda: pd.connect("left-by-driver"))
    assert isinstance(missing, pd.CacheNotFoundError), repr(missing)
    assert str(missing).startswith("no running cache named 'left-by-driver': the driver that "
                                   "created it exited"), str(missing)
    assert "init(..., detached=True)" in str(missing)


def test_connect_to_a_cache_whose_coordinator_was_killed_says_so(make_cache):
    cache = make_cache(name="coordinator-killed")
    ray.kill(cache._spec["coordinator"])
    gone = _until(lambda: pd.connect("coordinator-killed"))
    assert isinstance(gone, pd.CacheNotFoundError), repr(gone)
    assert str(gone) == ("no running cache named 'coordinator-killed': it was shut down "
                         "(or its coordinator was killed)")
    for shard in cache._spec["shards"]:  # without a coordinator, shutdown() cannot reach them
        ray.kill(shard)


def test_a_failed_flush_raises_a_plain_flush_error(make_cache, tmp_path):
    flag = tmp_path / "down"
    cache = make_cache([FlakyMemory(flag)], millis_threshold=60000)
    cache.write("a", 1)
    flag.touch()
    with pytest.raises(pd.FlushError) as failed:
        cache.flush_now()
    assert type(failed.value) is pd.FlushError  # not RayTaskError(FlushError)
    message = str(failed.value)
    assert "\x1b[" not in message and "Traceback" not in message and "ray::" not in message
    assert message.startswith("shard ") and "store unavailable" in message
    assert isinstance(failed.value.errors["mem"], OSError)
    with pytest.raises(pd.FlushError) as refused:
        cache.shutdown()  # through the coordinator's own ray.get of every shard
    assert not isinstance(refused.value, ray.exceptions.RayError)
    assert "\x1b[" not in str(refused.value) and "Traceback" not in str(refused.value)
    flag.unlink()
    assert cache.flush_now() == 1


def test_a_checkpoint_handler_error_arrives_as_its_own_type(make_cache):
    def handler(state):
        raise KeyError(f"no such checkpoint {state!r}")

    cache = make_cache(checkpoint_handler=handler, millis_threshold=60000)
    cache.write("a", 1)
    with pytest.raises(KeyError) as failed:
        cache.flush_now(checkpoint="c1")
    assert type(failed.value) is KeyError and "c1" in str(failed.value)


# -- get_if_exists --------------------------------------------------------------------------

def test_get_if_exists_returns_the_running_cache_of_that_name(make_cache):
    cache = make_cache(name="rerun-me", init_fn=lambda args: 0)
    cache.write("k", "v", wait=True)
    again = pd.init(name="rerun-me", num_shards=7, get_if_exists=True)  # a re-run cell
    assert again.num_shards == cache.num_shards == 2 and again.read("k") == "v"
    again.write("k2", "v2", wait=True)
    assert cache.read("k2") == "v2"
    with pytest.raises(ValueError, match="'rerun-me' is already running.*get_if_exists"):
        pd.init(name="rerun-me")


def test_get_if_exists_creates_the_cache_when_none_runs(make_cache):
    cache = make_cache(name="made-if-missing", get_if_exists=True)
    cache.write("k", 1, wait=True)
    assert pd.connect("made-if-missing").read("k") == 1


def test_get_if_exists_needs_a_name(ray_session):
    with pytest.raises(ValueError, match="get_if_exists=True needs a name"):
        pd.init(get_if_exists=True)
