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
deleted however the job ends, the alerts have metrics to read (the checks: tests/k8s_checks.py; infra/ against
all of it: tests/test_k8s_infra.py). Each check is a function returning its problems;
`test_each_check_catches_its_breakage` breaks a copy of the manifests once per check and requires the check
to notice.
"""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_checks import (
    CHECKS,
    GiB,
    check_cluster_cleanup,
    check_config_mount,
    check_credentials,
    check_cronjob_command,
    check_entrypoints,
    check_fleet_config,
    check_images,
    check_monitoring,
    check_ray_auth,
    check_references,
    check_worker_memory,
    worker_memory,
)
from k8s_manifests import (
    CONFIGMAP,
    DOCS,
    IMAGE,
    K8S,
    KUBECTL,
    RAY_KINDS,
    RENDERS,
    VERSION,
    cluster_spec,
    containers_of,
    doc_name,
    job_spec,
    kuberay_admission,
    missing_tool,
    pod_specs,
    validate_manifest,
)

# --------------------------------------------------------------------------- tests: rendering and schemas


def test_overlays_render():
    if KUBECTL is None:
        missing_tool("kubectl (renders the kustomize overlays)")
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


@pytest.mark.parametrize("render,doc", DOCS, ids=[f"{r}:{doc_name(d)}" for r, d in DOCS])
def test_rendered_document_validates(render, doc):
    validate_manifest(doc)
    if doc["kind"] in RAY_KINDS:
        assert kuberay_admission(doc) == []


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
        missing_tool("kubectl")
    doc = _first(kind)
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_manifest(doc)


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
    job = job_spec(doc)
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished"):
        job.pop(key, None)
    job["deletionStrategy"] = {"deletionRules": copy.deepcopy(LEAK_FREE_RULES if rules is None else rules)}
    job.update(fields)
    return job


def test_deletion_rules_that_name_a_failed_deployment_are_an_accepted_alternative():
    """The rules of LEAK_FREE_RULES instead of shutdownAfterJobFinishes validate, pass the operator's admission and
    the clean-up check; the same rules keyed on jobStatus alone fail the check."""
    if KUBECTL is None:
        missing_tool("kubectl")
    doc = _first("RayCronJob")
    _with_rules(doc)
    validate_manifest(doc)
    assert kuberay_admission(doc) == [] and check_cluster_cleanup("prod", [doc]) == []
    _with_rules(doc, rules=JOB_STATUS_ONLY_RULES)
    assert kuberay_admission(doc) == [] and check_cluster_cleanup("prod", [doc])


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
        missing_tool("kubectl")
    doc = _first(kind)
    assert kuberay_admission(doc) == []
    breakage(doc)
    assert kuberay_admission(doc)


# --------------------------------------------------------------------------- tests: drift from the code


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("render", sorted(RENDERS) or ["(none)"])
def test_manifests_agree_with_the_code(check, render):
    if KUBECTL is None:
        missing_tool("kubectl")
    assert check(render, RENDERS[render]) == []


def _workers(docs):
    return [g for d in docs if cluster_spec(d) for g in cluster_spec(d).get("workerGroupSpecs", [])]


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
    return next(job_spec(d) for d in docs if job_spec(d) is not None)


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
     lambda docs: cluster_spec(next(d for d in docs if job_spec(d)))["headGroupSpec"]["template"]["spec"][
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
        missing_tool("kubectl")
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
            for _, pod in (pod_specs(doc) if isinstance(doc, dict) and "kind" in doc else []):
                for container in containers_of(pod):
                    if IMAGE in container["image"]:
                        assert container["image"] == IMAGE, f"{path}: {container['image']} (put these in images:)"


