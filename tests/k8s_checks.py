"""The manifests checked against the code they run: each check returns its problems (an empty list: none).
tests/test_k8s.py runs them on every rendering and breaks a copy once per check to see it notice."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import PurePosixPath
from urllib.parse import urlparse

import yaml

from k8s_manifests import (
    APP_ROOT,
    AUTH_KEY,
    AUTH_SECRET,
    CONFIGMAP,
    DEV_ONLY_IMAGES,
    IMAGE,
    OUT_OF_BAND_SECRETS,
    REPO,
    VERSION,
    cluster_spec,
    containers_of,
    cpu_request,
    doc_name,
    fleet_config_raw,
    gpu_request,
    job_spec,
    overlay_of,
    pod_specs,
    quantity,
)
from safemerge_ray.cli import build_parser
from safemerge_ray.fleet.config import parse_config

# --------------------------------------------------------------------------- checks (each returns its problems)


def check_entrypoints(render: str, docs: list[dict]) -> list[str]:
    """(a) RayJob/RayCronJob entrypoints run a script of this repo, and its arguments parse as `fleet`."""
    problems, script_source = [], {}
    jobs = [(d, job_spec(d)) for d in docs if job_spec(d) is not None]
    if not jobs:
        problems.append("no RayJob or RayCronJob")
    for doc, job in jobs:
        argv = shlex.split(job["entrypoint"])
        if len(argv) < 2 or argv[0] not in ("python", "python3"):
            problems.append(f"{doc_name(doc)}: entrypoint is not `python SCRIPT ...`: {job['entrypoint']!r}")
            continue
        script = PurePosixPath(argv[1])
        try:
            local = REPO / script.relative_to(APP_ROOT)
        except ValueError:
            problems.append(f"{doc_name(doc)}: {script} is not under {APP_ROOT} (the repo's place in the image)")
            continue
        if not local.is_file():
            problems.append(f"{doc_name(doc)}: {script} -> {local} does not exist")
            continue
        source = script_source.setdefault(local, local.read_text())
        if 'main(["fleet", *sys.argv[1:]])' not in source:
            problems.append(f"{local.relative_to(REPO)} no longer runs `fleet` with its arguments")
        try:
            args = build_parser().parse_args(["fleet", *argv[2:]])
        except SystemExit:
            problems.append(f"{doc_name(doc)}: `fleet {' '.join(argv[2:])}` does not parse")
            continue
        if args.command != "fleet":
            problems.append(f"{doc_name(doc)}: parsed as {args.command}")
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
            problems.append(f"{doc_name(doc)}: runs {command[:3]}, not a console script of this package "
                            f"{sorted(scripts)}")
            continue
        try:
            args = build_parser().parse_args(command[1:])
        except SystemExit:
            problems.append(f"{doc_name(doc)}: `{' '.join(command)}` does not parse")
            continue
        if args.command != "submit":
            problems.append(f"{doc_name(doc)}: runs `{args.command}`, not `submit`")
            continue
        address = urlparse(args.address or "")
        if address.port != 8265 or address.hostname not in {f"{c}-head-svc" for c in clusters}:
            problems.append(f"{doc_name(doc)}: --address {args.address} is not a RayCluster head service here "
                            f"({sorted(clusters)}) on the job API port 8265")
        deadline = doc["spec"]["jobTemplate"]["spec"].get("activeDeadlineSeconds")
        if args.timeout is None or deadline is None or args.timeout >= deadline:
            problems.append(f"{doc_name(doc)}: --timeout {args.timeout} must be set and below activeDeadlineSeconds "
                            f"{deadline}, so the job is stopped and reported rather than killed")
    return problems


def check_fleet_config(render: str, docs: list[dict]) -> list[str]:
    """(c) The fleet config parses, and its `ray` section fits the worker groups it runs on."""
    raw = fleet_config_raw(docs)
    try:
        config = parse_config(copy.deepcopy(raw), source=f"{render}:{CONFIGMAP}")
    except Exception as exc:  # the message is the finding
        return [f"fleet.yaml does not parse: {exc}"]
    problems = []
    ray = raw.get("ray") or {}
    for doc in docs:
        spec = cluster_spec(doc)
        if spec is None:
            continue
        for group in spec.get("workerGroupSpecs", []):
            (container,) = group["template"]["spec"]["containers"]
            gpus, where = gpu_request(container), f"{doc_name(doc)} group {group['groupName']}"
            if (group.get("minReplicas", 0) == 0 or overlay_of(render) == "prod") and \
                    (ray.get("gpus_per_actor", "auto") == "auto" or ray.get("actors", "auto") == "auto"):
                problems.append(f"{where}: starts without workers or is prod, so ray.gpus_per_actor and ray.actors "
                                f"must be explicit (auto reads the resources present at start); got {ray}")
            if (gpus > 0) != (config.device == "cuda") or (gpus > 0) != bool(config.gpus_per_actor):
                problems.append(f"{where}: {gpus} GPU(s) per pod but ray.device={config.device}, "
                                f"gpus_per_actor={config.gpus_per_actor}")
            pod_cpus = cpu_request(container)
            if config.cpus_per_actor is not None and config.cpus_per_actor > pod_cpus:
                problems.append(f"{where}: ray.cpus_per_actor={config.cpus_per_actor} but a pod has {pod_cpus} CPUs: "
                                "the actors could never be placed")
            if config.actors is not None:
                capacity = group["maxReplicas"] * (gpus / config.gpus_per_actor if config.gpus_per_actor else 1)
                if config.actors > capacity:
                    problems.append(f"{where}: ray.actors={config.actors} exceeds what the group can place "
                                    f"({capacity:g}: one scoring actor per pod)")
    endpoint = raw.get("s3", {}).get("endpoint_url")
    if overlay_of(render) == "prod" and endpoint is not None:
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
        for role, pod in pod_specs(doc):
            for container in containers_of(pod):
                image = container.get("image", "")
                exempt = DEV_ONLY_IMAGES.get(overlay_of(render))
                if exempt is not None and exempt.match(image):
                    continue
                match = ours.match(image)
                if not match or match["tag"] != VERSION:
                    problems.append(f"{doc_name(doc)} {role}/{container['name']}: image {image!r} is not "
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
    aligned = fleet_config_raw(docs)["aligned_model"].lower()
    for doc in docs:
        spec = cluster_spec(doc)
        for group in (spec or {}).get("workerGroupSpecs", []):
            where = f"{doc_name(doc)} group {group['groupName']}"
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
            store = quantity(group.get("rayStartParams", {}).get("object-store-memory", 0))
            need = HEADROOM * worker_memory(model, adapters, rank, gpu_request(container) > 0) + store
            resources = container.get("resources", {})
            request = quantity(resources.get("requests", {}).get("memory", 0))
            limit = quantity(resources.get("limits", {}).get("memory", 0))
            if not need <= request <= 2 * need:
                problems.append(f"{where}: memory request {request / GiB:.2f} GiB outside [{need / GiB:.2f}, "
                                f"{2 * need / GiB:.2f}] GiB (formula for {model}, N={adapters}, r={rank})")
            if limit != request:
                problems.append(f"{where}: memory limit {limit / GiB:.2f} GiB != request (Ray budgets by the limit)")
            shm = [v for v in group["template"]["spec"].get("volumes", [])
                   if v.get("emptyDir", {}).get("medium") == "Memory"]
            if store and (not shm or quantity(shm[0]["emptyDir"].get("sizeLimit", 0)) < store):
                problems.append(f"{where}: /dev/shm smaller than the object store ({store / GiB:.2f} GiB)")
    return problems


def check_config_mount(render: str, docs: list[dict]) -> list[str]:
    """(f) Where a pod is told --config PATH, PATH is a key of the fleet ConfigMap mounted there."""
    problems = []
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        uses = []
        job = job_spec(doc)
        if job is not None:  # the entrypoint runs on the head pod
            uses.append((cluster_spec(doc)["headGroupSpec"]["template"]["spec"], 0, shlex.split(job["entrypoint"])))
        if doc["kind"] == "CronJob":
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            uses.append((pod, 0, pod["containers"][0].get("command", []) + pod["containers"][0].get("args", [])))
        for pod, index, argv in uses:
            if "--config" not in argv:
                problems.append(f"{doc_name(doc)}: no --config")
                continue
            path = PurePosixPath(argv[argv.index("--config") + 1])
            mounts = {PurePosixPath(m["mountPath"]): m["name"]
                      for m in pod["containers"][index].get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            volume = volumes.get(mounts.get(path.parent, ""), {})
            cm = configmaps.get(volume.get("configMap", {}).get("name", ""))
            if cm is None or path.name not in cm.get("data", {}):
                problems.append(f"{doc_name(doc)}: --config {path}, but no ConfigMap with key {path.name} is mounted "
                                f"at {path.parent} in that container")
    return problems


def check_references(render: str, docs: list[dict]) -> list[str]:
    """Every Secret and ConfigMap a pod names is rendered here (or is one of the documented out-of-band Secrets),
    and every pod runs as the rendered ServiceAccount."""
    problems = []
    have = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Secret", "ConfigMap")}
    outside = OUT_OF_BAND_SECRETS.get(overlay_of(render), set())
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        for role, pod in pod_specs(doc):
            where = f"{doc_name(doc)} {role}"
            if doc["kind"] != "Deployment" and pod.get("serviceAccountName") not in accounts:
                problems.append(f"{where}: serviceAccountName {pod.get('serviceAccountName')!r} "
                                f"not in {sorted(accounts)}")
            refs = [("ConfigMap", v["configMap"]["name"], None) for v in pod.get("volumes", []) if "configMap" in v]
            refs += [("Secret", v["secret"]["secretName"], None) for v in pod.get("volumes", []) if "secret" in v]
            for container in containers_of(pod):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        refs.append(("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
                    if "configMapKeyRef" in ref:
                        refs.append(("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
            spec = cluster_spec(doc)
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
        spec = cluster_spec(doc)
        if spec is not None and spec.get("authOptions") != {"mode": "token", "secretName": AUTH_SECRET}:
            problems.append(f"{doc_name(doc)}: authOptions {spec.get('authOptions')} (want token from {AUTH_SECRET})")
        if spec is None and doc["kind"] != "CronJob":
            continue
        for role, pod in pod_specs(doc):
            for container in pod["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
                if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or \
                        (token.get("name"), token.get("key")) != (AUTH_SECRET, AUTH_KEY):
                    problems.append(f"{doc_name(doc)} {role}/{container['name']}: RAY_AUTH_MODE=token and "
                                    f"RAY_AUTH_TOKEN from Secret {AUTH_SECRET}/{AUTH_KEY} are not both set")
    return problems


def check_credentials(render: str, docs: list[dict]) -> list[str]:
    """prod holds no credentials: S3 through IRSA only. Anywhere, a RayJob applied by `kubectl apply` is parked."""
    problems = []
    for doc in docs:
        if doc["kind"] == "RayJob" and not doc["spec"].get("suspend"):
            problems.append(f"{doc_name(doc)}: not suspended, so `kubectl apply -k` would start (or re-applying "
                            "would not stop) a run; runs are created from it as copies")
    if overlay_of(render) != "prod":
        return problems
    text = yaml.safe_dump_all(docs)
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_access_key_id"):
        if word in text:
            problems.append(f"prod manifests mention {word}")
    problems += [f"prod renders {doc_name(d)}" for d in docs if d["kind"] == "Secret"]
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
        job = job_spec(doc)
        if job is None or job.get("clusterSelector"):
            continue  # a RayJob on an existing cluster never deletes it
        where = doc_name(doc)
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
    rules = [doc_name(d) for d in docs if d["kind"] == "PrometheusRule"]
    metrics = fleet_config_raw(docs).get("metrics") or {}
    if rules and not metrics.get("pushgateway"):
        return [f"{', '.join(rules)} alerts on the runs' metrics, but the fleet config pushes none (no "
                "metrics.pushgateway): SafeMergeNoRecentSuccess would fire a day after it is applied"]
    return []


CHECKS = [check_entrypoints, check_cronjob_command, check_fleet_config, check_images, check_worker_memory,
          check_config_mount, check_references, check_ray_auth, check_credentials, check_cluster_cleanup,
          check_monitoring]


