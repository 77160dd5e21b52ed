"""`train-safety`: its data errors name the line; Ray Train with two CPU workers and TRL's SFT trainer
trains a LoRA whose loss falls, which PEFT loads and `merge` takes as the safety adapter."""

from __future__ import annotations

import json
import shutil

import pytest

from safemerge_ray.cli import main
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.loop import TrainSettings, lora_shape, read_examples

# --------------------------------------------------------------------------- data


def test_alpaca_and_chat_lines_become_prompt_and_completion():
    data = (json.dumps({"instruction": "Do X", "input": "with Y", "output": "No."}) + "\n\n"
            + json.dumps({"messages": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Q"},
                                       {"role": "assistant", "content": "A"}]}) + "\n").encode()
    rows = read_examples(data, "d.jsonl")
    assert rows[0] == {"prompt": [{"role": "user", "content": "Do X\n\nwith Y"}],
                       "completion": [{"role": "assistant", "content": "No."}]}
    assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("line, message", [
    (b'{"instruction": "x"}', "d.jsonl:2: missing or empty field 'output'"),
    (b'{"output": "x", "instruction": ""}', "d.jsonl:2: missing or empty field 'instruction'"),
    (b'{"instruction": "caf\xe9", "output": "y"}', "d.jsonl:2: not UTF-8 (byte 0xe9 at column 21)"),
    (b'{"instruction": "x", "output": ', "d.jsonl:2: not valid JSON"),
    (b'["x"]', "d.jsonl:2: expected a JSON object"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}',
     "d.jsonl:2: the last message must be the assistant's answer"),
    (b'{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "d.jsonl:2: messages[0] must be {role: system|user|assistant"),
])
def test_a_bad_line_is_named(line, message):
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    with pytest.raises(SafeMergeError) as err:
        read_examples(good + b"\n" + line + b"\n" + good, "d.jsonl")
    assert message in str(err.value)


def test_every_bad_line_is_listed_up_to_ten_and_an_empty_file_is_an_error():
    with pytest.raises(SafeMergeError) as err:
        read_examples(b"{}\n" * 13, "d.jsonl")
    text = str(err.value)
    assert "d.jsonl:1:" in text and "d.jsonl:10:" in text and "d.jsonl:11:" not in text and "3 more bad lines" in text
    with pytest.raises(SafeMergeError, match="has no examples"):
        read_examples(b"\n  \n", "d.jsonl")


# --------------------------------------------------------------------------- versions


def _publish_from(src, out, run_id: str) -> dict:
    from safemerge_ray.io import LocalDir
    from safemerge_ray.loop.train import ADAPTER_FILES, KIND, publish

    manifest = {"kind": KIND, "run_id": run_id}
    publish(LocalDir(out), run_id, {n: (src / n).read_bytes() for n in ADAPTER_FILES}, manifest)
    return manifest


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_each_training_publishes_a_version_and_a_reader_of_the_last_keeps_its_bytes(pair, tmp_path):
    from safemerge_ray.io import LocalDir, load_adapter

    out = tmp_path / "safety-out"
    legacy = out / "adapter"  # an output written before versions
    shutil.copytree(pair / "safety", legacy)
    (out / "manifest.json").write_text(json.dumps({"kind": "safety-adapter", "run_id": "old"}))
    assert load_adapter(LocalDir(out), "safety").uri == str(legacy)  # the output stands for its adapter
    before = {p.name: p.read_bytes() for p in legacy.iterdir()}

    _publish_from(pair / "safety", out, "r1")
    assert load_adapter(LocalDir(out), "safety").uri == str(out / "adapters/r1")
    assert {p.name: p.read_bytes() for p in legacy.iterdir()} == before  # read under the old manifest: unchanged
    _publish_from(pair / "finetuned/gsm8k", out, "r2")
    assert not legacy.exists() and sorted(p.name for p in (out / "adapters").iterdir()) == ["r1", "r2"]
    _publish_from(pair / "safety", out, "r3")
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["r2", "r3"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"] == "adapters/r3" and set(manifest["objects"]) == {
        "adapters/r3/adapter_config.json", "adapters/r3/adapter_model.safetensors"}


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_a_fleet_pins_the_version_named_when_it_starts(pair, tmp_path):
    from safemerge_ray.fleet import parse_config
    from safemerge_ray.fleet.plan import pin_safety_adapter

    out = tmp_path / "safety-out"
    _publish_from(pair / "safety", out, "r1")
    raw = {"unaligned_model": str(pair / "unaligned"), "aligned_model": str(pair / "aligned"),
           "safety_adapter": str(out), "finetuned": [str(pair / "finetuned/gsm8k")], "output": str(tmp_path / "f")}
    config = parse_config(raw, "fleet.yaml")
    assert pin_safety_adapter(config).safety_adapter == str(out / "adapters/r1")
    (out / "manifest.json").write_text(json.dumps({"kind": "safety-adapter", "adapter": "../elsewhere"}))
    with pytest.raises(SafeMergeError, match="names no adapter version"):
        pin_safety_adapter(config)


def test_the_lora_shape_defaults_to_the_fine_tunes(pair):
    shape = lora_shape(TrainSettings(aligned_model="x", data="d", output="o", like=str(pair / "finetuned/gsm8k")))
    assert (shape.rank, shape.alpha) == (4, 8)
    assert shape.targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    mine = lora_shape(TrainSettings(aligned_model="x", data="d", output="o", like=str(pair / "finetuned/gsm8k"),
                                    rank=2, target_modules=["q_proj"]))
    assert (mine.rank, mine.alpha, mine.targets) == (2, 8, ["q_proj"])
    assert lora_shape(TrainSettings(aligned_model="x", data="d", output="o")).targets == "all-linear"


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"instruction": "x"}\n')
    assert main(["train-safety", "--aligned-model", str(tmp_path), "--data", str(bad),
                 "--output", str(tmp_path / "o")]) == 2
    assert "d.jsonl:1: missing or empty field 'output'" in capsys.readouterr().err
    assert main(["train-safety", "--aligned-model", str(tmp_path), "--data", str(bad), "--output", "o",
                 "--workers", "0"]) == 2
    assert "workers: Input should be greater than or equal to 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- training on Ray


@pytest.fixture(scope="module")
def trained(fixtures_root, tmp_path_factory, ray_local):
    """The safety adapter trained by the CLI: two Ray Train workers on CPU, 12 steps."""
    from conftest import _fixture
    from safemerge_ray.synthetic import SynthSpec, write_loop_data

    src = _fixture(fixtures_root, "loop", SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=9), n_finetunes=3)
    root = tmp_path_factory.mktemp("train") / "loop"
    shutil.copytree(src, root)
    data = write_loop_data(root)
    code = main(["train-safety", "--aligned-model", str(root / "aligned"), "--data", str(data["safety_data"]),
                 "--output", str(root / "safety-trained"), "--like", str(root / "finetuned/gsm8k"), "--workers", "2",
                 "--max-steps", "12", "--save-steps", "5", "--learning-rate", "0.01", "--batch-size", "4",
                 "--quiet"])
    assert code == 0
    return root


def test_training_lowers_the_loss_and_writes_a_manifest_last(trained):
    from safemerge_ray.io import sha256_of

    out = trained / "safety-trained"
    manifest = json.loads((out / "manifest.json").read_text())
    losses = [loss for _, loss in manifest["losses"]]
    assert manifest["steps"] == 12 and len(losses) == 12
    assert max(losses[-3:]) < min(losses[:3]) and losses[-1] < losses[0] - 0.1, losses
    for key, entry in manifest["objects"].items():
        assert sha256_of((out / key).read_bytes()) == entry["sha256"]
    seven = sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert manifest["lora"] == {"r": 4, "lora_alpha": 8, "target_modules": seven, "use_rslora": False}
    # ... and the adapter itself has that shape (the target modules once never reached PEFT, which then
    # adapted its default q_proj and v_proj alone)
    config = json.loads((out / manifest["adapter"] / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, seven)
    assert manifest["data"]["examples"] == 16
    # Ray Train kept checkpoints (the last two) under OUTPUT/checkpoints/<run id>/.
    checkpoints = [p for p in (out / "checkpoints" / manifest["run_id"]).glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 2


def test_the_trained_adapter_loads_and_repairs_a_fine_tune(trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained / "safety-trained"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"] == f"adapters/{manifest['run_id']}" and not (out / "adapter").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained / "aligned"),
                                      out / manifest["adapter"])
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(b) > 0 for b in lora_b)  # trained: B left zero-init
    code = main(["merge", "--unaligned", str(trained / "unaligned"), "--aligned", str(trained / "aligned"),
                 "--safety-adapter", str(out), "--finetuned", str(trained / "finetuned/gsm8k"),
                 "--out", str(tmp_path / "repaired"), "--quiet"])
    assert code == 0 and (tmp_path / "repaired" / "adapter_model.safetensors").exists()


def test_a_second_training_into_another_tools_directory_is_refused(trained, capsys):
    code = main(["train-safety", "--aligned-model", str(trained / "aligned"), "--data",
                 str(trained / "data/safety.jsonl"), "--output", str(trained / "finetuned"), "--quiet"])
    assert code == 2 and "is not a train-safety output" in capsys.readouterr().err
