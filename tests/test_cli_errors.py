"""Bad inputs through the real CLI: one clear line on stderr, exit status 2, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import safemerge_ray.engine.merge_command
import safemerge_ray.store
from safemerge_ray.cli import main
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.synthetic import SynthSpec, build_fixture

FT = "finetuned/gsm8k"
Q0 = "model.layers.0.self_attn.q_proj"
SPEC = SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=11)
CONSOLE_SCRIPT = Path(sys.executable).with_name("safemerge-ray")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cli_fixture_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cli-errors") / "src"
    build_fixture(src, SPEC, n_finetunes=1)
    return src


@pytest.fixture
def fx(cli_fixture_src, tmp_path) -> Path:
    """A private copy of the fixture that the test may damage."""
    dst = tmp_path / "fx"
    shutil.copytree(cli_fixture_src, dst)
    return dst


@pytest.fixture
def out(tmp_path) -> Path:
    parent = tmp_path / "results"
    parent.mkdir()
    return parent / "merged"


def merge_argv(fx: Path, out: Path, overrides: dict | None = None, extra: list | None = None) -> list[str]:
    opts = {
        "--unaligned": fx / "unaligned",
        "--aligned": fx / "aligned",
        "--safety-adapter": fx / "safety",
        "--finetuned": fx / FT,
        "--out": out,
    }
    opts.update(overrides or {})
    argv = ["merge", "--quiet"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, str(v)]
    return argv + [str(x) for x in (extra or [])]


def run_cli(argv: list[str]) -> int:
    """main() returns its status; argparse's own errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.partial-", f".{out.name}.old-")))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"staging directories left behind: {leftovers(out)}"


def rewrite_tensor(path: Path, key: str, fn) -> None:
    tensors = load_file(str(path))
    assert key in tensors, f"{key} not in {path}"
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})


def add_tensors(path: Path, new: dict) -> None:
    tensors = load_file(str(path))
    tensors.update(new)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- damages


def truncate_aligned(fx: Path):
    p = fx / "aligned" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def header_claims_too_much(fx: Path):
    p = fx / "aligned" / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 2)
    p.write_bytes(bytes(raw))


def corrupt_adapter_header(fx: Path):
    p = fx / FT / "adapter_model.safetensors"
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + n] = b"#" * n
    p.write_bytes(bytes(raw))


def mismatched_shapes(fx: Path):
    rewrite_tensor(fx / "unaligned" / "model.safetensors", f"{Q0}.weight",
                   lambda w: torch.zeros(w.shape[0] // 2, w.shape[1], dtype=w.dtype))


def nan_in_aligned(fx: Path):
    def poison(w):
        w = w.clone()
        w[3, 5] = float("nan")
        return w
    rewrite_tensor(fx / "aligned" / "model.safetensors", f"{Q0}.weight", poison)


def inf_in_lora_b(fx: Path):
    def poison(b):
        b = b.clone()
        b[0, 0] = float("inf")
        return b
    rewrite_tensor(fx / FT / "adapter_model.safetensors", f"base_model.model.{Q0}.lora_B.weight", poison)


def missing_adapter_weights(fx: Path):
    (fx / FT / "adapter_model.safetensors").unlink()


def missing_adapter_config(fx: Path):
    (fx / FT / "adapter_config.json").unlink()


def missing_model_dir(fx: Path):
    shutil.rmtree(fx / "aligned")


def pickle_checkpoint(fx: Path):
    (fx / "aligned" / "model.safetensors").unlink()
    (fx / "aligned" / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 pretend pickle")


def pickle_adapter(fx: Path):
    (fx / FT / "adapter_model.safetensors").unlink()
    (fx / FT / "adapter_model.bin").write_bytes(b"\x80\x04\x95 pretend pickle")


def dora_adapter(fx: Path):
    edit_json(fx / FT / "adapter_config.json", use_dora=True)


def embedding_lora(fx: Path):
    add_tensors(fx / FT / "adapter_model.safetensors", {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(SPEC.rank, 128),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(SPEC.hidden, SPEC.rank),
    })


def modules_to_save_conflict(fx: Path):
    for adapter in (fx / "safety", fx / FT):
        edit_json(adapter / "adapter_config.json", modules_to_save=["lm_head"])
        add_tensors(adapter / "adapter_model.safetensors",
                    {"base_model.model.lm_head.weight": torch.zeros(128, SPEC.hidden)})


def no_damage(fx: Path):
    pass


def out_is_foreign_dir(fx: Path, out: Path):
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete me")


CASES = [
    # name, damage(fx), argv overrides, extra argv, expected substring on stderr
    ("truncated_aligned", truncate_aligned, {}, [], "truncated"),
    ("header_claims_more_than_file", header_claims_too_much, {}, [], "header claims"),
    ("corrupt_adapter_safetensors", corrupt_adapter_header, {}, [], "corrupt safetensors header"),
    ("mismatched_model_shapes", mismatched_shapes, {}, [], "the two models must share an architecture"),
    ("nan_in_aligned_weight", nan_in_aligned, {}, [], "aligned model's weight contains NaN or Inf"),
    ("inf_in_finetune_lora_b", inf_in_lora_b, {}, [], "lora_B.weight contains NaN or Inf"),
    ("missing_adapter_weights", missing_adapter_weights, {}, [], "missing adapter_model.safetensors"),
    ("missing_adapter_config", missing_adapter_config, {}, [], "no adapter_config.json"),
    ("missing_model_dir", missing_model_dir, {}, [], "no such directory"),
    ("pickle_checkpoint", pickle_checkpoint, {}, [], "pickle"),
    ("pickle_adapter", pickle_adapter, {}, [], "pickle"),
    ("dora_adapter", dora_adapter, {}, [], "DoRA"),
    ("embedding_lora_key", embedding_lora, {}, [], "embedding LoRA"),
    ("modules_to_save_conflict", modules_to_save_conflict, {}, [], "modules_to_save conflict"),
    ("tau_negative", no_damage, {"--tau": "-0.1"}, [], "tau must be a number in [0, 1]"),
    ("tau_above_one", no_damage, {"--tau": "1.5"}, [], "tau must be a number in [0, 1]"),
    ("tau_nan", no_damage, {"--tau": "nan"}, [], "tau must be a number in [0, 1]"),
    ("weights_one_number", no_damage, {"--weights": "0.8"}, [], "weights must be two numbers"),
    ("weights_above_one", no_damage, {"--weights": "1.2,0.2"}, [], "weights must be two numbers"),
    ("weights_not_numbers", no_damage, {"--weights": "a,b"}, [], "expected two comma-separated numbers"),
    ("weights_both_zero", no_damage, {"--weights": "0,0"}, [], "must not both be 0"),
    ("method_unknown", no_damage, {"--method": "svd_ties"}, [], "method must be one of"),
    ("policy_unknown", no_damage, {"--policy": "yolo"}, [], "policy must be one of"),
    ("ties_without_density", no_damage, {"--method": "ties"}, [], "method ties needs a density"),
    ("density_zero", no_damage, {"--method": "ties", "--density": "0"}, [], "density must be in (0, 1]"),
    ("density_above_one", no_damage, {"--method": "ties", "--density": "1.5"}, [], "density must be in (0, 1]"),
    ("device_cuda_without_gpu", no_damage, {"--device": "cuda"}, [], "no CUDA device is available"),
    ("device_unknown", no_damage, {"--device": "tpu"}, [], "device must be cpu or cuda"),
    ("safemerge_without_safety_adapter", no_damage, {"--safety-adapter": None}, [], "needs --safety-adapter"),
]


@pytest.mark.parametrize("damage,overrides,extra,expected",
                         [pytest.param(d, o, e, x, id=n) for n, d, o, e, x in CASES])
def test_bad_input_exits_2_with_message_and_writes_nothing(fx, out, capsys, damage, overrides, extra, expected):
    if overrides.get("--device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    damage(fx)
    code = run_cli(merge_argv(fx, out, overrides, extra))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err
    assert "error:" in err
    assert_nothing_written(out)


def test_existing_foreign_output_dir_is_refused_and_left_alone(fx, out, capsys):
    out_is_foreign_dir(fx, out)
    code = run_cli(merge_argv(fx, out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not a safemerge-ray output" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "do not delete me"
    assert leftovers(out) == []


def test_foreign_dir_with_a_summary_json_is_not_taken_for_an_output(fx, out, capsys):
    """`summary.json` is a common name: a directory of someone's results must not be deleted because it has one."""
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"accuracy": 0.91}))
    (out / "results.csv").write_text("step,loss\n1,0.5\n")
    code = run_cli(merge_argv(fx, out))
    err = capsys.readouterr().err
    assert code == 2, "a directory that is not a safemerge-ray output was replaced"
    assert "not a safemerge-ray output" in err and "Traceback" not in err
    assert (out / "results.csv").is_file()
    assert leftovers(out) == []


def test_output_that_is_a_file_is_refused(fx, out, capsys):
    out.write_text("a file")
    code = run_cli(merge_argv(fx, out))
    err = capsys.readouterr().err
    assert code == 2 and "exists and is not a directory" in err and "Traceback" not in err
    assert out.read_text() == "a file"
    assert leftovers(out) == []


def test_output_parent_missing_is_refused(fx, out, capsys):
    deep = out / "no" / "such" / "merged"
    code = run_cli(merge_argv(fx, deep))
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert not out.exists()


def test_errors_are_one_line_with_the_tool_prefix(fx, out, capsys):
    truncate_aligned(fx)
    assert run_cli(merge_argv(fx, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("safemerge-ray: error: ")


# --------------------------------------------------------------------------- the console script


def _script_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("damage,overrides,expected", [
    pytest.param(truncate_aligned, {}, "truncated", id="truncated_aligned"),
    pytest.param(no_damage, {"--weights": "a,b"}, "expected two comma-separated numbers", id="weights_not_numbers"),
])
def test_console_script_prints_no_traceback(fx, out, damage, overrides, expected):
    assert CONSOLE_SCRIPT.exists(), f"console script not installed at {CONSOLE_SCRIPT}"
    damage(fx)
    proc = subprocess.run([str(CONSOLE_SCRIPT), *merge_argv(fx, out, overrides)], capture_output=True, text=True,
                          timeout=120, env=_script_env(), cwd=fx)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert_nothing_written(out)


# --------------------------------------------------------------------------- failures while writing


class _FailAfterFirstFile(dict):
    """The files to commit; iterating them writes one, then fails as a crash mid-write would."""

    def __init__(self, files, exc):
        super().__init__(files)
        self.exc = exc

    def items(self):
        items = iter(list(super().items()))
        yield next(items)
        raise self.exc


def _patch_commit(monkeypatch, exc):
    real = safemerge_ray.store.commit_files
    monkeypatch.setattr(safemerge_ray.engine.merge_command, "commit_files",
                        lambda out, files, **kw: real(out, _FailAfterFirstFile(files, exc), **kw))


def test_unexpected_failure_while_writing_leaves_nothing(fx, out, monkeypatch, capsys):
    _patch_commit(monkeypatch, RuntimeError("simulated crash mid-write"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(merge_argv(fx, out))  # a bug keeps its traceback, but commits nothing
    assert_nothing_written(out)


def test_user_error_while_writing_decisions_leaves_nothing(fx, out, monkeypatch, capsys):
    def fake_decisions_bytes(rows):
        raise SafeMergeError("output: simulated failure writing decisions")
    monkeypatch.setattr(safemerge_ray.engine.merge_command, "decisions_bytes", fake_decisions_bytes)
    code = run_cli(merge_argv(fx, out))
    err = capsys.readouterr().err
    assert code == 2 and "simulated failure writing decisions" in err and "Traceback" not in err
    assert_nothing_written(out)


def test_interrupt_while_writing_commits_nothing(fx, out, monkeypatch, capsys):
    _patch_commit(monkeypatch, KeyboardInterrupt())
    code = run_cli(merge_argv(fx, out))
    err = capsys.readouterr().err
    assert code == 130
    assert "nothing was committed" in err and "Traceback" not in err
    assert_nothing_written(out)


def test_failed_rerun_keeps_previous_output_intact(fx, out, monkeypatch, capsys):
    assert run_cli(merge_argv(fx, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _patch_commit(monkeypatch, RuntimeError("simulated crash mid-write"))
    with pytest.raises(RuntimeError):
        main(merge_argv(fx, out, {"--tau": "0.9"}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []


def test_rerun_over_previous_output_replaces_it_atomically(fx, out, capsys):
    assert run_cli(merge_argv(fx, out, {"--tau": "0.0"})) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["settings"]["tau"] == 0.0
    assert first["counts"]["repaired"] == 0
    first_weights = load_file(str(out / "adapter_model.safetensors"))
    first_inode = out.stat().st_ino
    capsys.readouterr()

    assert run_cli(merge_argv(fx, out, {"--tau": "1.0"})) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["settings"]["tau"] == 1.0
    assert second["counts"]["repaired"] == second["counts"]["modules"] > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "decisions.parquet", "summary.json"]
    assert leftovers(out) == []
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is False and config["r"] == config["lora_alpha"]
    second_weights = load_file(str(out / "adapter_model.safetensors"))  # a complete, loadable file
    assert set(second_weights) == set(first_weights)
    assert any(not torch.equal(second_weights[k], first_weights[k]) for k in first_weights), "weights not updated"
    assert out.stat().st_ino != first_inode  # a new directory renamed into place, not files rewritten in place


def test_successful_run_into_empty_existing_dir(fx, out, capsys):
    out.mkdir()
    assert run_cli(merge_argv(fx, out)) == 0
    assert (out / "summary.json").is_file()
    assert leftovers(out) == []


def test_the_same_model_as_aligned_and_unaligned_is_an_input_error(fx, out, capsys):
    """V = 0 everywhere would score every rho 0 and repair every layer without a word (issue 18.2)."""
    assert run_cli(merge_argv(fx, out, {"--unaligned": fx / "aligned"})) == 2
    err = capsys.readouterr().err
    assert "the aligned and unaligned models are identical" in err and err.count("\n") == 1
    assert not out.exists()
    shutil.copytree(fx / "aligned", fx / "aligned-copy")  # a copy at another path: each module says so
    assert run_cli(merge_argv(fx, out, {"--unaligned": fx / "aligned-copy"})) == 2
    err = capsys.readouterr().err
    assert "module model.layers.0." in err and "the aligned and unaligned weights are identical (V = 0)" in err
    assert not out.exists()


def test_tau_and_a_rank_selection_exclude_each_other(fx, out, capsys):
    """`--tau 0.3 --top-k 2` used to ignore tau and print tau=0.3 (issue 18.3)."""
    for extra in (["--tau", "0.3", "--top-k", "2"], ["--tau", "0.3", "--fraction", "0.5"]):
        assert run_cli(merge_argv(fx, out, extra=extra)) == 2
        assert "exclude each other" in capsys.readouterr().err
        assert not out.exists()
    assert run_cli(merge_argv(fx, out, extra=["--top-k", "2"])) == 0
    assert "2 of " in capsys.readouterr().out


def test_help_version_and_the_flag_a_typo_meant(capsys):
    """Issue 18.10: `--version`; each command's help opens with its line; an unknown flag is named (with the
    flag it is most like) instead of being reported as a missing required one; choices are listed."""
    from safemerge_ray import __version__

    assert run_cli(["--version"]) == 0 and capsys.readouterr().out.strip() == f"safemerge-ray {__version__}"
    assert run_cli(["fleet", "--confg", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized argument --confg (did you mean --config?)" in err and "required" not in err
    assert run_cli(["status", "--help"]) == 0
    assert "every adapter's current run" in capsys.readouterr().out.split("options:")[0]
    assert run_cli(["eval", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--task-metric {contains,exact,number}" in help_text and "--engine {auto,transformers,vllm}" in help_text
    assert run_cli(["train-safety", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: --like's, else 16)" in help_text and "(default None)" not in help_text
    assert run_cli(["merge", "--help"]) == 0
    assert "bugs keep their traceback" not in capsys.readouterr().out


def test_a_config_key_typo_names_the_key_it_is_most_like(tmp_path, capsys):
    config = tmp_path / "fleet.yaml"
    config.write_text("unaligned_model: s3://m/a/\naligned_model: s3://m/b/\nsafety_adapter: s3://m/s/\n"
                      "finetuned: [s3://m/f/x]\noutput: s3://o/\nmerge: {tua: 0.3}\n")
    assert run_cli(["fleet", "--config", str(config), "--dry-run"]) == 2
    assert "merge.tua: Extra inputs are not permitted (did you mean tau?)" in capsys.readouterr().err
