"""The fleet job and `merge` against a real S3 server (SeaweedFS on 127.0.0.1), on a real local Ray."""

import hashlib
import json
import shutil
import uuid

import pytest
import yaml

from conftest import upload_dir
from safemerge_ray.core import MergeSettings
from safemerge_ray.engine import merge_to_dir
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.io import Checkpoint, S3Dir, S3Settings
from safemerge_ray.synthetic import SynthSpec, build_fixture


@pytest.fixture(scope="module")
def s3_fleet(tmp_path_factory, s3_client):
    """Models, safety adapter and 3 domain adapters uploaded to their own buckets, as a platform keeps them."""
    root = tmp_path_factory.mktemp("s3-fleet")
    build_fixture(root, SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=31, max_shard_size="40KB"),
                  n_finetunes=3)
    run = uuid.uuid4().hex[:6]
    uris = {
        "unaligned": upload_dir(s3_client, root / "unaligned", "models", f"{run}/base"),
        "aligned": upload_dir(s3_client, root / "aligned", "models", f"{run}/chat"),
        "safety": upload_dir(s3_client, root / "safety", "adapters", f"{run}/safety-v3"),
        "domains": f"s3://adapters/{run}/domains/",
        "output": f"s3://merged/{run}/fleet-a/",
    }
    for d in sorted((root / "finetuned").iterdir()):
        upload_dir(s3_client, d, "adapters", f"{run}/domains/{d.name}")
    s3_client.create_bucket(Bucket="merged") if "merged" not in {
        b["Name"] for b in s3_client.list_buckets()["Buckets"]} else None
    return root, uris


def _config(tmp_path, uris, endpoint, **extra):
    raw = {"unaligned_model": uris["unaligned"], "aligned_model": uris["aligned"], "safety_adapter": uris["safety"],
           "finetuned": [{"prefix": uris["domains"]}], "output": uris["output"],
           "merge": {"tau": 0.35, "weights": [0.8, 0.2], "method": "linear"},
           "s3": {"endpoint_url": endpoint}, **extra}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_fleet_commits_to_s3_and_equals_local_merge(s3_fleet, s3_endpoint, s3_client, tmp_path, ray_local, capsys):
    root, uris = s3_fleet
    config = load_config(_config(tmp_path, uris, s3_endpoint))
    report = run_fleet(config, progress=False)
    assert report.exit_code == ExitStatus.OK and report.by_status("committed") == ["gsm8k", "legal", "medqa"]
    out = S3Dir(uris["output"], config.s3)
    manifest = json.loads(out.read(f"runs/{report.run_id}/manifest.json"))
    for name in ("gsm8k", "legal", "medqa"):
        pointer = json.loads(out.read(f"latest/{name}.json"))
        assert pointer["run_id"] == report.run_id
        for key, meta in manifest["adapters"][name]["objects"].items():
            assert hashlib.sha256(out.read(key)).hexdigest() == meta["sha256"]
        local = tmp_path / f"local-{name}"
        merge_to_dir(unaligned=str(root / "unaligned"), aligned=str(root / "aligned"),
                     safety_adapter=str(root / "safety"), finetuned=str(root / "finetuned" / name),
                     out=str(local), settings=MergeSettings(), progress=False)
        assert out.read(f"{pointer['path']}adapter_model.safetensors") == \
            (local / "adapter_model.safetensors").read_bytes()
    # Committed objects no longer carry the staged tag that the bucket's lifecycle rule expires.
    for key in manifest["adapters"]["gsm8k"]["objects"]:
        tags = s3_client.get_object_tagging(Bucket="merged", Key=f"{uris['output'][len('s3://merged/'):]}{key}")
        assert tags["TagSet"] == [], key
    # Incremental: a second run changes nothing in the bucket but its run record.
    prefix = uris["output"][len("s3://merged/"):]

    def listing():
        objects = s3_client.list_objects_v2(Bucket="merged", Prefix=prefix)["Contents"]
        return sorted((o["Key"], o["ETag"]) for o in objects if not o["Key"].startswith(f"{prefix}status/"))

    before = listing()
    again = run_fleet(config, progress=False)
    assert again.run_id is None and listing() == before
    assert json.loads(out.read("status/last_run.json"))["counts"]["unchanged"] == 3
    # Credentials come from the standard chain and appear in no output and no report.
    secret = "safemerge-test-secret"
    assert all(secret.encode() not in s3_client.get_object(Bucket="merged", Key=key)["Body"].read()
               for key, _ in before if key.endswith(".json"))
    assert secret not in capsys.readouterr().out


def test_tensor_reads_are_ranged_gets(s3_fleet, s3_endpoint):
    """Reading one tensor from S3 transfers that tensor's bytes, never the whole shard."""
    _, uris = s3_fleet
    d = S3Dir(uris["aligned"], S3Settings(endpoint_url=s3_endpoint))
    ranges = []
    d.client.meta.events.register("before-send.s3.GetObject",
                                  lambda request, **kw: ranges.append(request.headers.get("Range")))
    ckpt = Checkpoint(d, "aligned model")
    assert len(ckpt.shards) > 1
    ranges.clear()
    key = "model.layers.1.mlp.down_proj.weight"
    tensor = ckpt.read(key)
    info = ckpt.info(key)
    assert tensor.shape == (32, 64)
    assert ranges == [f"bytes={info.offset}-{info.offset + info.nbytes - 1}".encode()] or \
        ranges == [f"bytes={info.offset}-{info.offset + info.nbytes - 1}"]


def test_merge_cli_reads_and_writes_s3(s3_fleet, s3_endpoint, monkeypatch, tmp_path, capsys):
    from safemerge_ray.cli import main

    _, uris = s3_fleet
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the standard way to point boto3 at an endpoint
    out = f"s3://merged/{uuid.uuid4().hex[:6]}/single/"
    code = main(["merge", "--unaligned", uris["unaligned"], "--aligned", uris["aligned"], "--safety-adapter",
                 uris["safety"], "--finetuned", f"{uris['domains']}gsm8k/", "--out", out, "--quiet"])
    assert code == 0, capsys.readouterr().err
    d = S3Dir(out, S3Settings(endpoint_url=s3_endpoint))
    assert sorted(d.list()) == ["adapter_config.json", "adapter_model.safetensors", "decisions.parquet",
                                "summary.json"]
    assert json.loads(d.read("summary.json"))["adapter"] == "gsm8k"


def test_missing_bucket_and_prefix_are_clear_errors(s3_fleet, s3_endpoint, tmp_path, ray_local):
    from safemerge_ray.errors import SafeMergeError

    _, uris = s3_fleet
    bad = dict(uris, aligned="s3://no-such-bucket-xyz/chat/")
    with pytest.raises(SafeMergeError, match="no such bucket|nothing under"):
        run_fleet(load_config(_config(tmp_path, bad, s3_endpoint)), progress=False)
    bad = dict(uris, domains=uris["domains"] + "nothing-here/")
    with pytest.raises(SafeMergeError, match="nothing under"):
        run_fleet(load_config(_config(tmp_path, bad, s3_endpoint)), progress=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_uncommitted_objects_carry_the_staged_tag_until_unstaged(s3_endpoint, s3_client):
    """What a crashed run leaves behind is tagged, so the bucket's lifecycle rule can expire it."""
    from safemerge_ray.io import STAGED_TAG

    out = S3Dir(f"s3://merged/{uuid.uuid4().hex[:6]}/fleet/", S3Settings(endpoint_url=s3_endpoint))
    out.write("runs/r1/a/adapter_model.safetensors", b"weights", staged=True)
    key = f"{out.prefix}runs/r1/a/adapter_model.safetensors"
    tags = s3_client.get_object_tagging(Bucket="merged", Key=key)["TagSet"]
    assert [f"{t['Key']}={t['Value']}" for t in tags] == [STAGED_TAG]
    out.unstage("runs/r1/a/adapter_model.safetensors")
    assert s3_client.get_object_tagging(Bucket="merged", Key=key)["TagSet"] == []
    assert out.read("runs/r1/a/adapter_model.safetensors") == b"weights"


def test_bytes_changed_in_the_bucket_are_found_and_redone(s3_fleet, s3_endpoint, s3_client, tmp_path, ray_local,
                                                          monkeypatch, capsys):
    """A published adapter overwritten in place (same size) has a new ETag: verify says so, a rerun redoes it."""
    from safemerge_ray.cli import main

    _, uris = s3_fleet
    output = f"s3://merged/{uuid.uuid4().hex[:6]}/fleet-v/"
    config = load_config(_config(tmp_path, dict(uris, output=output), s3_endpoint))
    assert run_fleet(config, progress=False).exit_code == ExitStatus.OK
    out = S3Dir(output, config.s3)
    pointer = json.loads(out.read("latest/medqa.json"))
    key = f"{out.prefix}{pointer['path']}adapter_model.safetensors"
    data = bytearray(s3_client.get_object(Bucket="merged", Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3_client.put_object(Bucket="merged", Key=key, Body=bytes(data))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert main(["verify", output]) == 1
    assert "BAD  medqa" in capsys.readouterr().out
    again = run_fleet(config, progress=False)
    assert again.by_status("committed") == ["medqa"] and again.by_status("unchanged") == ["gsm8k", "legal"]
    assert main(["verify", output]) == ExitStatus.OK
    # medqa's first copy is needed by no pointer now: gc removes that run's medqa objects with the run only
    # when no other pointer needs the run; here gsm8k and legal still do, so the run stays, verified.
    s3_client.put_object(Bucket="merged", Key=f"{out.prefix}runs/20200101T000000Z-dead00/gsm8k/x", Body=b"half")
    assert main(["gc", output, "--keep", "0"]) == ExitStatus.OK
    printed = capsys.readouterr().out
    assert "removed run 20200101T000000Z-dead00 (uncommitted)" in printed and "removed 1 object(s)" in printed
    listing = s3_client.list_objects_v2(Bucket="merged", Prefix=f"{out.prefix}runs/")["Contents"]
    assert not any("dead00" in o["Key"] for o in listing)
    assert main(["verify", output]) == ExitStatus.OK
