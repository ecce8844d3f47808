"""cluster_configs/: a typo fails here, not on a cluster.

Ray cluster launcher configs are checked against the schema the installed Ray ships
(``ray/autoscaler/ray-schema.json``) and by the checks ``ray up`` runs before it launches
anything. KubeRay manifests are checked against the OpenAPI schema of their CustomResource-
Definition (copied to tests/data/kuberay/), made strict: an object that lists its properties
refuses any other key, as the API server's pruning would silently drop it. Then the files are
checked against each other: one Ray version and image, one install line, token authentication
on every node, and a RayJob whose script starts a detached cache. No Ray, no network.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import pytest
import ray
import yaml
from jsonschema.protocols import Validator

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "cluster_configs"
CRD_DIR = REPO / "tests" / "data" / "kuberay"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

LAUNCHER_CONFIGS = ("local.yaml", "aws.yaml", "gcp.yaml")
KUBE_MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
RAY_VERSION = ray.__version__
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
# The one line every node installs the project with (README.md in cluster_configs/).
INSTALL = re.compile(r'pip install -U "ray\[default\]==(?P<ray>[^"]+)" '
                     r'"persistroids-dist @ git\+https://[^"\s]+\.git@[^"\s]+"')
TOKEN_FILE = "~/.ray/auth_token"
# Keys of a Kubernetes object's metadata that a manifest may set (ObjectMeta; the rest is
# written by the API server). CRD schemas leave metadata open, so it is checked here.
OBJECT_META = {"name", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

# libyaml's loader reads the 2 MB of CRDs in about a second; the pure-Python one takes 7.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


@functools.cache
def config(name: str) -> Any:
    """A file of cluster_configs/, parsed once (callers that change it take a deep copy)."""
    return load(CONFIGS / name)


def _where(path) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or "(top level)"


def _schema_errors(validator: Validator, document: Any) -> list[str]:
    return [f"{_where(e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.path)))]


# --- Ray cluster launcher configs ---------------------------------------------------------

@functools.cache
def _ray_schema() -> dict[str, Any]:
    with open(RAY_SCHEMA, encoding="utf-8") as f:
        return json.load(f)


def launcher_errors(cfg: Any) -> list[str]:
    """What is wrong with a cluster launcher config, as `ray up` would find it before it
    starts a node, plus provider keys Ray's schema does not know (it lets any through, for
    external providers; every config here uses a built-in one)."""
    schema = _ray_schema()
    errors = _schema_errors(jsonschema.Draft7Validator(schema), cfg)
    if errors:
        return errors
    known = schema["properties"]["provider"]["properties"]
    errors = [f"provider.{key}: not a key of Ray's provider schema" for key in cfg["provider"]
              if key not in known]
    # ray up: prepare_config (fill defaults, local provider's node type) then validate_config
    # (the schema again, head_node_type, min_workers within max_workers). Internal Ray API,
    # imported here so that only this check breaks if Ray moves it.
    from ray.autoscaler._private.util import prepare_config, validate_config
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # ValueError, RuntimeError, click.ClickException, ValidationError
        errors.append(f"Ray's checks before `ray up` launches: {type(e).__name__}: {e}")
    return errors


# --- KubeRay manifests ----------------------------------------------------------------------

def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 (CRD) schema as a JSON schema that refuses unknown keys.

    Every object schema that lists ``properties`` and says nothing about other keys
    (no ``additionalProperties``, no ``x-kubernetes-preserve-unknown-fields``) gets
    ``additionalProperties: false``: the API server would prune such a key, so in a manifest it
    is a typo. ``nullable`` becomes a "null" type and ``x-kubernetes-int-or-string`` an anyOf;
    other ``x-kubernetes-*`` extensions (list types, CEL validations) are left to the server.
    """
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = strict_schema(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            node[key] = [strict_schema(sub) for sub in node[key]]
    if "properties" in node:
        node["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if ("additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return node


@functools.cache
def _crds() -> dict[str, dict[str, Any]]:
    """KubeRay's CRDs by the kind they define."""
    crds = [load(CRD_DIR / name) for name in CRD_FILES]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


@functools.cache
def _crd_validator(kind: str, version: str) -> Validator:
    (served,) = [v for v in _crds()[kind]["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict_schema(served["schema"]["openAPIV3Schema"]))


def _metadata_errors(metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return [f"metadata: must be a mapping, got {metadata!r}"]
    errors = [f"metadata.{key}: not a key a manifest sets" for key in metadata
              if key not in OBJECT_META]
    name = metadata.get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 label (lowercase letters, "
                      "digits and '-', at most 63)")
    for field in ("labels", "annotations"):
        for key, value in (metadata.get(field) or {}).items():
            if not isinstance(value, str):
                errors.append(f"metadata.{field}.{key}: {value!r} is not a string (quote it)")
    return errors


def manifest_errors(manifest: Any) -> list[str]:
    """What is wrong with a KubeRay manifest: its kind and apiVersion, its metadata, and its
    body against the strict schema of the CRD version it names."""
    if not isinstance(manifest, dict):
        return [f"(top level): a manifest is a mapping, got {type(manifest).__name__}"]
    kind = manifest.get("kind")
    crd = _crds().get(kind)
    if crd is None:
        return [f"kind: {kind!r} is none of KubeRay's {sorted(_crds())}"]
    group, _, version = str(manifest.get("apiVersion")).partition("/")
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if group != crd["spec"]["group"] or version not in versions:
        return [f"apiVersion: {manifest.get('apiVersion')!r} is not one the {kind} CRD serves "
                f"({', '.join(crd['spec']['group'] + '/' + v for v in versions)})"]
    if not versions[version].get("served") or versions[version].get("deprecated"):
        return [f"apiVersion: {group}/{version} is deprecated or not served for {kind}"]
    return (_metadata_errors(manifest.get("metadata"))
            + _schema_errors(_crd_validator(kind, version), manifest))


def config_errors(name: str, document: Any) -> list[str]:
    return launcher_errors(document) if name in LAUNCHER_CONFIGS else manifest_errors(document)


# --- every file is valid ----------------------------------------------------------------------

def test_every_yaml_in_cluster_configs_is_validated():
    here = sorted(p.name for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml"))
    assert here == sorted(LAUNCHER_CONFIGS + KUBE_MANIFESTS)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS + KUBE_MANIFESTS)
def test_config_is_valid(name):
    assert config_errors(name, copy.deepcopy(config(name))) == []


# --- and the validation bites -------------------------------------------------------------

class Breakage(NamedTuple):
    """One mistake made in a copy of a config: the key at ``path`` renamed to ``rename_to``,
    or its value replaced by ``value``."""
    name: str
    path: tuple[str | int, ...]
    rename_to: str | None = None
    value: Any = None

    def apply(self, document: Any) -> Any:
        document = copy.deepcopy(document)
        parent = document
        for step in self.path[:-1]:
            parent = parent[step]
        old = parent[self.path[-1]]  # a KeyError here: the breakage is stale, fix the path
        if self.rename_to is not None:
            del parent[self.path[-1]]
            parent[self.rename_to] = old
        else:
            parent[self.path[-1]] = self.value
        return document

    def expect_in_errors(self) -> str:
        return self.rename_to if self.rename_to is not None else str(self.path[-1])

    def __str__(self) -> str:
        what = f"->{self.rename_to}" if self.rename_to is not None else f"={self.value!r}"
        return f"{self.name}:{_where(self.path)}{what}"


_HEAD = ("spec", "headGroupSpec", "template", "spec", "containers", 0)
_WORKERS = ("spec", "workerGroupSpecs", 0)
BREAKAGES = [
    Breakage("local.yaml", ("max_workers",), rename_to="max_worker"),
    Breakage("local.yaml", ("provider", "worker_ips"), rename_to="worker_ip"),
    Breakage("local.yaml", ("provider", "head_ip"), value=["192.0.2.10"]),
    Breakage("local.yaml", ("idle_timeout_minutes",), value="five"),
    Breakage("local.yaml", ("setup_commands",), value="pip install persistroids-dist"),
    Breakage("aws.yaml", ("available_node_types", "ray.worker.default", "min_workers"),
             rename_to="min_worker"),
    Breakage("aws.yaml", ("docker", "image"), rename_to="imag"),
    Breakage("aws.yaml", ("max_workers",), value="2"),
    Breakage("aws.yaml", ("head_node_type",), value="ray.head.defualt"),
    Breakage("aws.yaml", ("available_node_types", "ray.worker.default", "min_workers"), value=3),
    Breakage("gcp.yaml", ("head_node_type",), rename_to="head_node_typ"),
    Breakage("gcp.yaml", ("auth", "ssh_user"), rename_to="ssh_usr"),
    Breakage("gcp.yaml", ("available_node_types", "ray_head_default", "resources", "CPU"),
             value="2"),
    Breakage("kuberay-raycluster.yaml", ("spec", "headGroupSpec"), rename_to="headGroupSpc"),
    Breakage("kuberay-raycluster.yaml", (*_HEAD, "image"), rename_to="imgae"),
    Breakage("kuberay-raycluster.yaml",
             (*_WORKERS, "template", "spec", "containers", 0, "resources", "limits"),
             rename_to="limit"),
    Breakage("kuberay-raycluster.yaml", (*_WORKERS, "replicas"), value="2"),
    Breakage("kuberay-raycluster.yaml", (*_WORKERS, "rayStartParams"), value={"num-cpus": 2}),
    Breakage("kuberay-raycluster.yaml", ("spec", "authOptions", "mode"), value="tokens"),
    Breakage("kuberay-raycluster.yaml", ("apiVersion",), value="ray.io/v2"),
    Breakage("kuberay-raycluster.yaml", ("apiVersion",), value="ray.io/v1alpha1"),
    Breakage("kuberay-raycluster.yaml", ("kind",), value="RayClustr"),
    Breakage("kuberay-raycluster.yaml", ("metadata", "annotations"), rename_to="anotations"),
    Breakage("kuberay-raycluster.yaml",
             ("metadata", "annotations", "ray.io/overwrite-container-cmd"), value=True),
    Breakage("kuberay-rayjob.yaml", ("spec", "entrypoint"), rename_to="entrypont"),
    Breakage("kuberay-rayjob.yaml", ("spec", "clusterSelector"), value=["persistroids"]),
    Breakage("kuberay-rayjob.yaml", ("spec", "clusterSelector", "ray.io/cluster"), value=1),
    Breakage("kuberay-rayjob.yaml", ("metadata", "name"), value="Persistroids_Demo"),
]


def test_every_config_has_breakages():
    assert {b.name for b in BREAKAGES} == set(LAUNCHER_CONFIGS + KUBE_MANIFESTS)


@pytest.mark.parametrize("breakage", BREAKAGES, ids=str)
def test_a_broken_copy_fails_validation(breakage):
    errors = config_errors(breakage.name, breakage.apply(config(breakage.name)))
    assert errors, f"{breakage} passed validation"
    assert breakage.expect_in_errors() in "\n".join(errors), errors


def test_strict_schema_closes_listed_objects_only():
    schema = strict_schema({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "quantity": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
    }})
    validator = jsonschema.Draft7Validator(schema)
    good = {"open": {"a": "x", "b": 1}, "map": {"k": "v"}, "quantity": "1Gi", "maybe": None}
    assert _schema_errors(validator, good) == []
    assert _schema_errors(validator, {"quantity": 2}) == []
    assert _schema_errors(validator, {"closed": {"b": "x"}})
    assert _schema_errors(validator, {"clossed": {}})
    assert _schema_errors(validator, {"quantity": 1.5})


# --- the files agree with each other -------------------------------------------------------

def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"].get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_one_ray_version_and_image_everywhere():
    for name in LAUNCHER_CONFIGS:
        image = config(name).get("docker", {}).get("image")
        assert image in (None, IMAGE), f"{name}: docker image {image!r}, want {IMAGE}"
    cluster = config("kuberay-raycluster.yaml")
    assert cluster["spec"]["rayVersion"] == RAY_VERSION
    assert [c["image"] for c in _containers(cluster)] == [IMAGE] * len(_containers(cluster))


def test_every_node_installs_the_project_with_the_same_line():
    lines: dict[str, list[str]] = {}
    for name in LAUNCHER_CONFIGS:
        lines[name] = [m.group(0) for cmd in config(name)["setup_commands"]
                       for m in INSTALL.finditer(cmd)]
    cluster = config("kuberay-raycluster.yaml")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for i, container in enumerate(_containers(cluster)):
        args = " ".join(container["args"])
        # Installed before Ray starts, and Ray only starts if the install worked.
        assert "&& $KUBERAY_GEN_RAY_START_CMD" in args, container["name"]
        lines[f"container {i}"] = [m.group(0) for m in INSTALL.finditer(args)]
    assert all(len(found) == 1 for found in lines.values()), lines
    assert len({found[0] for found in lines.values()}) == 1, lines
    assert INSTALL.search(next(iter(lines.values()))[0]).group("ray") == RAY_VERSION


def test_token_authentication_on_every_node():
    for name in LAUNCHER_CONFIGS:
        cfg = config(name)
        assert cfg["file_mounts"].get(TOKEN_FILE) == TOKEN_FILE, name
        starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
                  for c in cfg[key] if "ray start" in c]
        assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts), name
    assert config("kuberay-raycluster.yaml")["spec"]["authOptions"]["mode"] == "token"


def test_rayjob_runs_on_the_raycluster_here():
    job = config("kuberay-rayjob.yaml")["spec"]
    cluster_name = config("kuberay-raycluster.yaml")["metadata"]["name"]
    assert job["clusterSelector"] == {"ray.io/cluster": cluster_name}
    # With rayClusterSpec KubeRay would make a cluster for the job (and may delete it after),
    # taking the detached cache with it.
    assert "rayClusterSpec" not in job


def test_rayjob_script_survives_the_shells_and_starts_a_detached_cache():
    entrypoint = config("kuberay-rayjob.yaml")["spec"]["entrypoint"]
    # KubeRay's submitter runs `ray job submit ... -- <entrypoint>` in a shell; the Ray CLI
    # joins the words with list2cmdline and the job runs that in another shell. shlex does
    # no expansion, so the script must not need any.
    argv = shlex.split(entrypoint)
    assert shlex.split(subprocess.list2cmdline(argv)) == argv
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    script = argv[2]
    assert not set("$`\\") & set(script), "the shells would expand or eat these"
    tree = ast.parse(script)
    calls = {node.func.attr: node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert "init" in calls, "the script starts no cache"
    keywords = {k.arg: k.value for k in calls["init"].keywords}
    assert isinstance(keywords.get("name"), ast.Constant) and keywords["name"].value
    assert isinstance(keywords.get("detached"), ast.Constant) and keywords["detached"].value is True
    assert {"write_many", "read_many"} <= set(calls), "the script writes and reads no keys"
