"""Every manifest under k8s/ validates offline: KubeRay kinds against the CRD schemas in shared/schemas,
core kinds against Kubernetes' own schemas (kubernetes-validate). A manifest a cluster would reject fails here."""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from safemerge_ray.config import parse_config

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}


def _documents():
    return [(path.name, doc) for path in sorted((REPO / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _crd_schema(kind: str, version: str) -> dict:
    if not SCHEMAS.is_dir():
        if os.environ.get("CI"):  # CI has shared/ beside the clone: a missing schema is a failure there
            pytest.fail(f"KubeRay CRD schemas not found at {SCHEMAS}")
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (shared/ is not beside this checkout)")
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def _validate(doc: dict) -> None:
    group_version, kind = doc["apiVersion"], doc["kind"]
    if kind in CRDS:
        assert group_version.startswith("ray.io/")
        schema = _crd_schema(kind, group_version.split("/")[1])
        jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
        _check_containers(doc)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _check_containers(doc: dict) -> None:
    """CRD schemas embed pod templates loosely; check the containers the way the API server would."""
    for template in _pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def _pod_templates(node):
    if isinstance(node, dict):
        if "template" in node and isinstance(node["template"], dict) and "spec" in node["template"]:
            yield node["template"]
        for v in node.values():
            yield from _pod_templates(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pod_templates(v)


DOCS = _documents()


def test_every_kind_is_present():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayJob", "RayCronJob", "RayCluster", "CronJob", "ConfigMap", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}" for n, d in DOCS])
def test_manifest_validates(name, doc):
    _validate(doc)


@pytest.mark.parametrize("kind,breakage", [
    ("RayCronJob", lambda d: d["spec"].pop("schedule")),
    ("RayCronJob", lambda d: d["spec"]["jobTemplate"].__setitem__("shutdownAfterJobFinishes", "yes")),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "two")),
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"].pop("template")),
    ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("imagePullPolicy", 3)),
    ("CronJob", lambda d: d["spec"].__setitem__("schedulee", "0 2 * * *")),
])
def test_validation_catches_a_broken_manifest(kind, breakage):
    doc = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == kind))
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        _validate(doc)


def test_configmap_holds_a_valid_fleet_config():
    (doc,) = [d for _, d in DOCS if d["kind"] == "ConfigMap"]
    config = parse_config(yaml.safe_load(doc["data"]["fleet.yaml"]))
    assert config.output.startswith("s3://") and config.safety_adapter


def test_entrypoints_name_the_job_script():
    script = "jobs/nightly_remerge.py"
    assert (REPO / script).is_file()
    entrypoints = [d["spec"]["entrypoint"] for _, d in DOCS if d["kind"] == "RayJob"]
    entrypoints += [d["spec"]["jobTemplate"]["entrypoint"] for _, d in DOCS if d["kind"] == "RayCronJob"]
    assert entrypoints and all(script in e for e in entrypoints)


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_is_formatted():
    proc = subprocess.run(["terraform", "fmt", "-check", "-recursive", str(REPO / "infra")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
