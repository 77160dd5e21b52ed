"""The loop against a real S3 server (SeaweedFS on 127.0.0.1): train-safety reads its model and data from
S3 and writes Ray Train's checkpoints, the adapter and its manifest there; the fleet's gate and `eval`
read adapters and prompt files from S3."""

from __future__ import annotations

import io
import json
import uuid

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import upload_dir
from safemerge_ray.cli import main
from safemerge_ray.io import S3Dir, S3Settings, load_adapter, sha256_of
from safemerge_ray.synthetic import SynthSpec, build_fixture, write_loop_data


@pytest.fixture(scope="module")
def s3_loop(tmp_path_factory, s3_client):
    root = tmp_path_factory.mktemp("s3-loop")
    build_fixture(root, SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=41), n_finetunes=2)
    data = write_loop_data(root)
    run = uuid.uuid4().hex[:6]
    uris = {"unaligned": upload_dir(s3_client, root / "unaligned", "models", f"{run}/base"),
            "aligned": upload_dir(s3_client, root / "aligned", "models", f"{run}/chat"),
            "safety": upload_dir(s3_client, root / "safety", "adapters", f"{run}/safety"),
            "domains": f"s3://adapters/{run}/domains/", "evals": upload_dir(s3_client, data["harmful"].parent,
                                                                             "evals", f"{run}/data"),
            "run": run}
    for d in sorted((root / "finetuned").iterdir()):
        upload_dir(s3_client, d, "adapters", f"{run}/domains/{d.name}")
    for bucket in ("trained", "merged"):
        if bucket not in {b["Name"] for b in s3_client.list_buckets()["Buckets"]}:
            s3_client.create_bucket(Bucket=bucket)
    return root, uris


def test_train_safety_on_s3(s3_loop, s3_endpoint, tmp_path, ray_local):
    root, uris = s3_loop
    output = f"s3://trained/{uris['run']}/safety-v1/"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "aligned_model": uris["aligned"], "data": f"{uris['evals']}safety.jsonl", "output": output,
        "like": f"{uris['domains']}gsm8k/", "max_steps": 4, "save_steps": 2, "learning_rate": 0.01,
        "s3": {"endpoint_url": s3_endpoint}}))
    assert main(["train-safety", "--config", str(config), "--quiet"]) == 0
    out = S3Dir(output, S3Settings(endpoint_url=s3_endpoint))
    manifest = json.loads(out.read("manifest.json"))
    for key, entry in manifest["objects"].items():
        assert sha256_of(out.read(key)) == entry["sha256"]
    assert manifest["steps"] == 4 and manifest["checkpoints"] == f"{output}checkpoints/{manifest['run_id']}"
    checkpoints = {k.split("/")[2] for k in out.walk(f"checkpoints/{manifest['run_id']}/") if k.count("/") > 2}
    assert len(checkpoints) == 2  # Ray Train wrote them to S3 itself (steps 2 and 4, and the final adapter's)
    assert load_adapter(out, "trained").uri == f"{output}{manifest['adapter']}/"  # the version merge and fleet read


def test_the_gate_and_eval_on_s3(s3_loop, s3_endpoint, tmp_path, ray_local, capsys):
    root, uris = s3_loop
    output = f"s3://merged/{uris['run']}/fleet/"
    gate = {"eval": {"harmful_prompts": f"{uris['evals']}harmful.txt", "task_prompts": f"{uris['evals']}task.jsonl",
                     "max_new_tokens": 8, "limit": 3},
            "max_harmful_rate": 1.0, "max_task_drop": 1.0}
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "unaligned_model": uris["unaligned"], "aligned_model": uris["aligned"], "safety_adapter": uris["safety"],
        "finetuned": [{"prefix": uris["domains"]}], "output": output, "s3": {"endpoint_url": s3_endpoint},
        "gate": gate}))
    assert main(["fleet", "--config", str(config), "--quiet"]) == 0
    out = S3Dir(output, S3Settings(endpoint_url=s3_endpoint))
    record = json.loads(out.read("status/last_run.json"))
    assert record["counts"]["committed"] == 2 and record["held"] == {}
    summary = json.loads(out.read(f"runs/{record['run_id']}/eval.json"))
    assert set(summary["adapters"]) == {"gsm8k", "medqa"}
    assert summary["adapters"]["gsm8k"]["repaired"].startswith(f"{output}runs/{record['run_id']}/gsm8k")

    evals = tmp_path / "eval.yaml"
    evals.write_text(yaml.safe_dump({"fleet_output": output, "harmful_prompts": f"{uris['evals']}harmful.txt",
                                     "max_new_tokens": 8, "limit": 2, "output": f"s3://trained/{uris['run']}/evals/",
                                     "s3": {"endpoint_url": s3_endpoint}}))
    assert main(["eval", "--config", str(evals), "--quiet"]) == 0
    evals_out = S3Dir(f"s3://trained/{uris['run']}/evals/", S3Settings(endpoint_url=s3_endpoint))
    table = pq.read_table(io.BytesIO(evals_out.read("eval.parquet")))
    assert table.num_rows == (1 + 2 * 2) * 2
    assert json.loads(evals_out.read("eval.json"))["aligned_model"] == uris["aligned"]
