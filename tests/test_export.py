"""`safemerge-ray export`: published adapters under versioned names for serving (vLLM's filesystem resolver,
`--lora-modules`, LoRAX on S3). One fleet run for the module; what a test changes, it changes in a copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.store import split_versioned_name, versioned_name
from safemerge_ray.synthetic import write_fleet_config

ADAPTERS = ["gsm8k", "legal", "medqa", "support"]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def published(fleet_source, tmp_path_factory, ray_local):
    """A fleet with its four adapters published by one run (the module's only run but one)."""
    root = tmp_path_factory.mktemp("export") / "fleet"
    shutil.copytree(fleet_source, root)
    write_fleet_config(root)
    report = run_fleet(load_config(root / "fleet.yaml"), progress=False)
    assert report.by_status("committed") == ADAPTERS
    return root


@pytest.fixture
def output_copy(published, tmp_path):
    """A private copy of the published output (no Ray), for a test that damages it."""
    out = tmp_path / "merged"
    shutil.copytree(published / "merged", out)
    return out


def _pointer(out: Path, name: str) -> dict:
    return json.loads((out / "latest" / f"{name}.json").read_text())


def _version(out: Path, name: str) -> str:
    return versioned_name(name, _pointer(out, name)["run_id"])


def _manifest_hashes(out: Path, name: str) -> dict[str, str]:
    """{file name: sha256} of an adapter's published files, as its run's manifest records them."""
    pointer = _pointer(out, name)
    objects = json.loads((out / pointer["manifest"]).read_text())["adapters"][name]["objects"]
    return {key.rsplit("/", 1)[1]: meta["sha256"] for key, meta in objects.items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _visible(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))


def _loads_with_peft(fleet: Path, adapter_dir: Path) -> None:
    """The directory loads with PEFT on the fleet's aligned model, with exactly the published tensors."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(load_config(fleet / "fleet.yaml").aligned_model,
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    loaded, written = get_peft_model_state_dict(model), load_file(adapter_dir / "adapter_model.safetensors")
    assert set(loaded) == set(written)
    assert all(torch.equal(loaded[k].float(), written[k].float()) for k in written)


def test_versioned_names_are_derived_and_parsed():
    assert versioned_name("gsm8k", "20261122T035715Z-3f2a9c") == "gsm8k@20261122T035715Z-3f2a9c"
    assert split_versioned_name("gsm8k@20261122T035715Z-3f2a9c") == ("gsm8k", "20261122T035715Z-3f2a9c")
    for name in ("gsm8k", "gsm8k@latest", "@20261122T035715Z-3f2a9c", "../x@20261122T035715Z-3f2a9c"):
        assert split_versioned_name(name) is None


def test_status_shows_each_adapters_versioned_name(published, capsys):
    out = published / "merged"
    assert main(["status", str(out)]) == ExitStatus.OK
    table = capsys.readouterr().out
    assert all(_version(out, name) in table for name in ADAPTERS)
    assert main(["status", str(out), "--format", "json"]) == ExitStatus.OK
    states = {a["adapter"]: a for a in json.loads(capsys.readouterr().out)["adapters"]}
    assert {n: s["version"] for n, s in states.items()} == {n: _version(out, n) for n in ADAPTERS}


def test_export_writes_loadable_versions_and_moving_names_once(published, tmp_path, capsys):
    out, dest = published / "merged", tmp_path / "loras"
    assert main(["export", str(out), "--to", str(dest)]) == ExitStatus.OK
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == [f"exported       {_version(out, n)}" for n in ADAPTERS]
    assert printed[-1] == f"4 exported, 0 already there, 0 failed, 0 old version(s) removed in {dest}"
    assert _visible(dest) == sorted(ADAPTERS + [_version(out, n) for n in ADAPTERS] + ["index.json"])
    assert json.loads((dest / "index.json").read_text())["adapters"] == {n: _version(out, n) for n in ADAPTERS}
    for name in ADAPTERS:
        version_dir, link = dest / _version(out, name), dest / name
        assert {f: _sha(version_dir / f) for f in FILES} == _manifest_hashes(out, name)  # the published bytes
        assert os.readlink(link) == _version(out, name)  # relative: the volume may be mounted elsewhere
    _loads_with_peft(published, dest / _version(out, "gsm8k"))
    _loads_with_peft(published, dest / "legal")  # the moving name, as vLLM's resolver opens it

    before = {p.relative_to(dest).as_posix(): p.lstat().st_mtime_ns for p in dest.rglob("*")}
    assert main(["export", str(out), "--to", str(dest)]) == ExitStatus.OK
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == [f"already there  {_version(out, n)}" for n in ADAPTERS]
    after = {p.relative_to(dest).as_posix(): p.lstat().st_mtime_ns for p in dest.rglob("*")}
    assert {k: v for k, v in after.items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}  # nothing rewritten but the index


def test_a_new_run_moves_the_name_keeps_the_old_version_until_keep(published, tmp_path, capsys):
    fleet = tmp_path / "fleet"
    shutil.copytree(published, fleet)
    out, dest = fleet / "merged", tmp_path / "loras"
    assert main(["export", str(out), "--to", str(dest)]) == ExitStatus.OK
    old = _version(out, "gsm8k")
    raw = yaml.safe_load((fleet / "fleet.yaml").read_text())
    raw["overrides"] = {"gsm8k": {"tau": 0.5}}
    (fleet / "fleet.yaml").write_text(yaml.safe_dump(raw))
    assert "gsm8k" in run_fleet(load_config(fleet / "fleet.yaml"), progress=False).by_status("committed")
    new = _version(out, "gsm8k")
    assert new != old
    capsys.readouterr()

    assert main(["export", str(out), "--to", str(dest), "--only", "gsm8k"]) == ExitStatus.OK
    assert f"exported       {new}" in capsys.readouterr().out
    assert os.readlink(dest / "gsm8k") == new and (dest / old / FILES[1]).is_file()  # the old one is kept
    index = json.loads((dest / "index.json").read_text())["adapters"]
    assert index["gsm8k"] == new and set(index) == set(ADAPTERS)  # --only keeps the others' entries
    _loads_with_peft(fleet, dest / "gsm8k")

    assert main(["export", str(out), "--to", str(dest), "--keep", "1"]) == ExitStatus.OK
    printed = capsys.readouterr().out
    assert f"removed        {old}" in printed and not (dest / old).exists()
    assert os.readlink(dest / "gsm8k") == new and (dest / new / FILES[1]).is_file()
    assert all((dest / _version(out, n)).is_dir() for n in ADAPTERS)  # current versions are never removed
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # nothing hidden left behind
    assert main(["export", str(out), "--to", str(dest), "--keep", "0"]) == ExitStatus.USAGE


def _slow_write_bytes(real):
    """Path.write_bytes in two halves with a pause between: a reader of a file written in place would see it
    half written (what the export must never let a reader of a visible name see)."""
    import time

    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(0.02)
            f.write(data[len(data) // 2:])
        return len(data)
    return write_bytes


def test_a_reader_polling_the_export_never_sees_a_partial_adapter(published, tmp_path, monkeypatch):
    out, dest = published / "merged", tmp_path / "loras"
    dest.mkdir()
    expected = {n: _manifest_hashes(out, n) for n in ADAPTERS}
    seen, problems, done = set(), [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            for entry in _visible(dest):
                if entry == "index.json":
                    json.loads((dest / entry).read_text())  # whole, or not yet there
                    continue
                adapter = (split_versioned_name(entry) or (entry,))[0]
                try:
                    hashes = {f: _sha(dest / entry / f) for f in FILES}
                except FileNotFoundError as exc:
                    problems.append(f"{entry}: {exc}")
                    continue
                if hashes != expected[adapter]:
                    problems.append(f"{entry}: bytes differ from the manifest")
                seen.add(entry)

    monkeypatch.setattr(Path, "write_bytes", _slow_write_bytes(Path.write_bytes))
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        assert main(["export", str(out), "--to", str(dest)]) == ExitStatus.OK
    finally:
        done.set()
        reader.join()
    assert not problems, problems[:5]
    assert seen, "the reader saw nothing at all"


def test_a_damaged_source_fails_that_adapter_alone_and_leaves_nothing(published, output_copy, tmp_path, capsys):
    out, dest = output_copy, tmp_path / "loras"
    weights = out / _pointer(out, "gsm8k")["path"] / FILES[1]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    assert main(["export", str(out), "--to", str(dest)]) == ExitStatus.PARTIAL
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("safemerge-ray: error: export of gsm8k: ")
    assert "sha256 or size differs from the manifest" in errors[0]
    assert "3 exported, 0 already there, 1 failed" in captured.out
    assert _visible(dest) == sorted([n for n in ADAPTERS if n != "gsm8k"] +
                                    [_version(out, n) for n in ADAPTERS if n != "gsm8k"] + ["index.json"])
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no half-written version
    assert "gsm8k" not in json.loads((dest / "index.json").read_text())["adapters"]


def test_export_to_s3_writes_versions_then_the_index(published, s3_endpoint, s3_client, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    if "exports" not in {b["Name"] for b in s3_client.list_buckets()["Buckets"]}:
        s3_client.create_bucket(Bucket="exports")
    prefix = f"{uuid.uuid4().hex[:6]}/loras"
    out = published / "merged"
    assert main(["export", str(out), "--to", f"s3://exports/{prefix}"]) == ExitStatus.OK
    assert "4 exported" in capsys.readouterr().out

    def body(key: str) -> bytes:
        return s3_client.get_object(Bucket="exports", Key=f"{prefix}/{key}")["Body"].read()

    index = json.loads(body("index.json"))["adapters"]
    assert index == {n: _version(out, n) for n in ADAPTERS}
    for name, version in index.items():  # LoRAX: adapter_id s3://exports/<prefix>/<version>
        hashes = {f: hashlib.sha256(body(f"{version}/{f}")).hexdigest() for f in FILES}
        assert hashes == _manifest_hashes(out, name)
        assert json.loads(body(f"{version}/export.json"))["version"] == version
    assert main(["export", str(out), "--to", f"s3://exports/{prefix}"]) == ExitStatus.OK
    assert "0 exported, 4 already there" in capsys.readouterr().out
