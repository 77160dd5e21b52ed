"""One hostile or broken adapter fails alone, with a one-line reason, whatever its files contain."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge_ray.errors import ExitStatus, SafeMergeError
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.io import LocalDir, check_pattern, json_depth, load_adapter


def _adapter(root: Path) -> Path:
    return root / "finetuned" / "gsm8k"


def _config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def _load(adapter: Path):
    return load_adapter(LocalDir(adapter), "adapter gsm8k")


def test_deeply_nested_config_is_refused(pristine):
    adapter = _adapter(pristine)
    (adapter / "adapter_config.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(SafeMergeError, match=r"corrupt adapter_config.json in .*: JSON nested deeper than 64"):
        _load(adapter)


def test_deeply_nested_safetensors_header_is_refused(pristine):
    adapter = _adapter(pristine)
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(SafeMergeError, match="corrupt safetensors header: JSON nested deeper than 64"):
        _load(adapter)


@pytest.mark.parametrize("pattern,message", [
    ("[", "is not a valid regular expression"),
    ("(a+)+b", "nests quantifiers"),
    ("(\\w*)*$", "nests quantifiers"),
])
def test_rank_patterns_that_cannot_be_matched_safely_are_refused(pristine, pattern, message):
    adapter = _adapter(pristine)
    config = _config(adapter)
    config["rank_pattern"] = {pattern: 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SafeMergeError, match=rf"adapter gsm8k: adapter_config.json: rank_pattern: .*{message}"):
        _load(adapter)


def test_plain_module_patterns_pass():
    for pattern in ("q_proj", "model.layers.0.self_attn.q_proj", "^model.*q_proj", "layers\\.(\\d+)\\.mlp",
                    "(q|k|v)_proj"):
        assert check_pattern(pattern, "x") == pattern
    assert json_depth(b'{"a": "[[[[", "b": [1, {"c": 2}]}') == 3  # brackets in strings do not count


def test_target_modules_matching_nothing_is_an_error(pristine):
    adapter = _adapter(pristine)
    config = _config(adapter)
    config["target_modules"] = ["no_such_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SafeMergeError, match="target_modules in adapter_config.json does not match module "
                                             r"model\.layers\.0\..* \(and \d+ more\); PEFT could not load"):
        _load(adapter)
    config["target_modules"] = ".*(q|k|v|o|gate|up|down)_proj"  # PEFT's regex form, matching every module
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert _load(adapter).modules


def test_non_float_lora_tensors_are_refused(pristine):
    adapter = _adapter(pristine)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].to(dtype=torch.int8)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SafeMergeError, match="LoRA weight is I8, not a float type"):
        _load(adapter)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlinks_out_of_the_adapter_are_refused(pristine, tmp_path, name):
    adapter = _adapter(pristine)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    (adapter / name).rename(outside)
    (adapter / name).symlink_to(outside)
    with pytest.raises(SafeMergeError, match=f"{name} in .* is a link to a file outside the adapter's directory"):
        _load(adapter)
    # A link inside the adapter's own directory is fine.
    (adapter / name).unlink()
    outside.rename(adapter / f"real-{name}")
    (adapter / name).symlink_to(adapter / f"real-{name}")
    assert _load(adapter).modules


def test_a_hostile_adapter_and_an_odd_directory_fail_alone_in_a_fleet(local_fleet, ray_local):
    (local_fleet / "finetuned" / "medqa" / "adapter_config.json").write_bytes(b"[" * 200_000)
    (local_fleet / "finetuned" / "_staging").mkdir()
    (local_fleet / "finetuned" / ("x" * 200)).mkdir()
    legal = _config(local_fleet / "finetuned" / "legal")
    legal["rank_pattern"] = {"(a+)+b": 8}
    (local_fleet / "finetuned" / "legal" / "adapter_config.json").write_text(json.dumps(legal))
    report = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.PARTIAL
    assert report.by_status("committed") == ["gsm8k", "support"]
    assert report.by_status("failed") == ["legal", "medqa"]
    record = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
    assert "JSON nested deeper than 64" in record["failed"]["medqa"]
    assert "nests quantifiers" in record["failed"]["legal"]
    skipped = [w for w in record["warnings"] if w.startswith("finetuned: skipped")]
    assert len(skipped) == 2 and any("_staging" in w for w in skipped), record["warnings"]
    assert not (local_fleet / "merged" / "latest" / "medqa.json").exists()


# --------------------------------------------------------------------------- the fleet path, table-driven
# Each row: a copy of a good adapter, damaged one way, in one fleet with the untouched adapters. Every
# damaged one fails alone with one line naming the cause; the others are committed; nothing is written
# outside the output, and nothing read from a rejected file is echoed.


def _rewrite_config(**fields):
    def damage(adapter: Path, tmp: Path) -> None:
        config = _config(adapter)
        config.update(fields)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return damage


def _write(name: str, data: bytes):
    def damage(adapter: Path, tmp: Path) -> None:
        (adapter / name).write_bytes(data)
    return damage


def _link_out(name: str, target: str | None = None):
    def damage(adapter: Path, tmp: Path) -> None:
        outside = Path(target) if target else tmp / f"foreign-{name}"
        if not target:
            outside.write_text('{"secret_value": "do-not-echo"}')
        (adapter / name).unlink()
        (adapter / name).symlink_to(outside)
    return damage


def _retype(dtype=None, nan=False):
    def damage(adapter: Path, tmp: Path) -> None:
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = tensors[key].to(dtype) if dtype is not None else tensors[key].fill_(float("nan"))
        save_file(tensors, path, metadata={"format": "pt"})
    return damage


def _truncate(adapter: Path, tmp: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])


def _deep_header(adapter: Path, tmp: Path) -> None:
    header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


HOSTILE = {  # adapter name -> (damage, what its one-line reason says)
    "nested-config": (_write("adapter_config.json", b"[" * 200_000), "JSON nested deeper than 64"),
    "nested-header": (_deep_header, "JSON nested deeper than 64"),
    "bad-regex": (_rewrite_config(rank_pattern={"[": 4}), "is not a valid regular expression"),
    "redos": (_rewrite_config(rank_pattern={"(a+)+b": 8}), "nests quantifiers"),
    "alpha-redos": (_rewrite_config(alpha_pattern={"(\\w*)*$": 8}), "nests quantifiers"),
    "targets-nothing": (_rewrite_config(target_modules=["no_such_proj"]), "PEFT could not load"),
    "weights-to-passwd": (_link_out("adapter_model.safetensors", "/etc/passwd"), "outside the adapter's directory"),
    "config-to-foreign": (_link_out("adapter_config.json"), "outside the adapter's directory"),
    "int8-lora": (_retype(torch.int8), "not a float type"),
    "bool-lora": (_retype(torch.bool), "not a float type"),
    "nan-lora": (_retype(nan=True), "contains NaN or Inf"),
    "truncated": (_truncate, "truncated"),
    "no-config": (lambda a, t: (a / "adapter_config.json").unlink(), "no adapter_config.json"),
}


def _outside_output(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if "merged" not in p.relative_to(root).parts}


def test_hostile_inputs_each_fail_alone_in_one_fleet(local_fleet, ray_local, tmp_path):
    import shutil

    good = local_fleet / "finetuned" / "gsm8k"
    for name, (damage, _) in HOSTILE.items():
        shutil.copytree(good, local_fleet / "finetuned" / name)
        damage(local_fleet / "finetuned" / name, tmp_path)
    (local_fleet / "finetuned" / "_staging").mkdir()
    (local_fleet / "finetuned" / ("x" * 240)).mkdir()
    before = _outside_output(local_fleet)

    report = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.PARTIAL
    assert report.by_status("committed") == ["gsm8k", "legal", "medqa", "support"]
    assert report.by_status("failed") == sorted(HOSTILE)
    record = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
    for name, (_, says) in HOSTILE.items():
        reason = record["failed"][name]
        assert says in reason and "\n" not in reason and len(reason) < 500, (name, reason)
    text = (local_fleet / "merged" / "status" / "last_run.json").read_text()
    assert "root:x" not in text and "do-not-echo" not in text  # nothing read from a rejected file
    assert sum(w.startswith("finetuned: skipped") for w in record["warnings"]) == 2
    assert _outside_output(local_fleet) == before  # nothing written outside the output
    assert sorted(p.stem for p in (local_fleet / "merged" / "latest").glob("*.json")) == [
        "gsm8k", "legal", "medqa", "support"]
