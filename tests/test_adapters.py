"""Adapter parsing: scaling as PEFT computes it, matching by name, and what is read from the models."""

import json
import random

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from safemerge_ray.core import MergeSettings
from safemerge_ray.engine import Inputs, merge_to_dir, plan_adapter, repair_adapter
from safemerge_ray.io import Checkpoint, LocalDir, load_adapter
from safemerge_ray.store import read_decisions
from safemerge_ray.synthetic import SynthSpec, build_fixture, make_model, target_modules, write_lora


def _patterned_adapter(fx, directory):
    """An adapter with rsLoRA, a rank pattern and an alpha pattern, written in PEFT's layout."""
    model = make_model(SynthSpec(hidden=32, layers=2, heads=4, seed=0))
    gen = torch.Generator().manual_seed(0)
    ranks = {"q_proj": 2, "down_proj": 6}
    loras = {}
    for name, mod in target_modules(model).items():
        r = ranks.get(name.rsplit(".", 1)[-1], 4)
        out_f, in_f = mod.weight.shape
        loras[name] = (torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen))
    write_lora(directory, loras, r=4, lora_alpha=8, use_rslora=True, rank_pattern=ranks,
               alpha_pattern={"v_proj": 3, "model.layers.1.mlp.up_proj": 5})


def test_scaling_matches_peft_for_rslora_and_patterns(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=2, heads=4, seed=0))
    _patterned_adapter(fx, tmp_path / "patterned")
    ours = load_adapter(LocalDir(tmp_path / "patterned"), "fine-tuned adapter")
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "patterned")
    assert len(ours.modules) == 14
    for module, lora in ours.modules.items():
        target = peft_model.base_model.model.get_submodule(module)
        assert lora.rank == target.r["default"], module
        assert abs(lora.scaling - target.scaling["default"]) < 1e-12, module
    assert ours.modules["model.layers.1.mlp.up_proj"].alpha == 5
    assert ours.modules["model.layers.0.mlp.up_proj"].alpha == 8


def test_patterned_finetune_merges_to_the_same_deltas_peft_computes(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=2, heads=4, seed=0))
    _patterned_adapter(fx, fx / "finetuned" / "patterned")
    merge_to_dir(unaligned=str(fx / "unaligned"), aligned=str(fx / "aligned"), safety_adapter=str(fx / "safety"),
                 finetuned=str(fx / "finetuned" / "patterned"), out=str(tmp_path / "out"),
                 settings=MergeSettings(method="cat", tau=0.0), progress=False)  # tau 0: keep every layer
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    ft = PeftModel.from_pretrained(base, fx / "finetuned" / "patterned")
    expected = {m: ft.base_model.model.get_submodule(m).get_delta_weight("default").clone()
                for m in target_modules(ft.base_model.model)}
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "out")
    for module, delta in expected.items():
        assert torch.allclose(merged.base_model.model.get_submodule(module).get_delta_weight("default"), delta,
                              atol=1e-6), module


def test_modules_are_matched_by_name_not_position(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=2, heads=4, seed=2))
    settings = dict(unaligned=str(fx / "unaligned"), aligned=str(fx / "aligned"), safety_adapter=str(fx / "safety"),
                    settings=MergeSettings(), progress=False)
    merge_to_dir(finetuned=str(fx / "finetuned" / "gsm8k"), out=str(tmp_path / "a"), **settings)
    # Same tensors, shuffled order in every file, plus a module the model lacks in the safety adapter.
    for path in [fx / "unaligned" / "model.safetensors", fx / "aligned" / "model.safetensors",
                 fx / "finetuned" / "gsm8k" / "adapter_model.safetensors", fx / "safety" / "adapter_model.safetensors"]:
        tensors = load_file(path)
        keys = list(tensors)
        random.Random(1).shuffle(keys)
        shuffled = {k: tensors[k] for k in keys}
        if path.parent.name == "safety":
            shuffled["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
            shuffled["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 8)
        save_file(shuffled, path, metadata={"format": "pt"})
    summary = merge_to_dir(finetuned=str(fx / "finetuned" / "gsm8k"), out=str(tmp_path / "b"), **settings)
    assert load_file(tmp_path / "a" / "adapter_model.safetensors") .keys() == \
        load_file(tmp_path / "b" / "adapter_model.safetensors").keys()
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_decisions(tmp_path / "a" / "decisions.parquet") == read_decisions(tmp_path / "b" / "decisions.parquet")
    assert summary["safety_only_modules"] == ["model.layers.9.self_attn.q_proj"]


class CountingDir(LocalDir):
    def __init__(self, path):
        super().__init__(path)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, name, offset, buffer):
        self.reads.append((name, offset, len(buffer)))
        super().read_into(name, offset, buffer)


def test_each_target_weight_is_read_once_and_nothing_else(tmp_path):
    """The model side reads headers plus exactly the targeted weights, once: never a whole model."""
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(arch="qwen2", hidden=32, layers=3, heads=4, seed=2, max_shard_size="40KB"))
    assert (fx / "aligned" / "model.safetensors.index.json").exists()
    dirs = {side: CountingDir(fx / side) for side in ("unaligned", "aligned")}
    inputs = Inputs(Checkpoint(dirs["unaligned"], "unaligned"), Checkpoint(dirs["aligned"], "aligned"),
                    load_adapter(LocalDir(fx / "finetuned" / "gsm8k"), "ft"),
                    load_adapter(LocalDir(fx / "safety"), "safety"))
    header_reads = {side: len(d.reads) for side, d in dirs.items()}
    repair_adapter("gsm8k", inputs, MergeSettings(), progress=False)
    for side, d in dirs.items():
        data_reads = d.reads[header_reads[side]:]
        ckpt = inputs.aligned if side == "aligned" else inputs.unaligned
        targeted = {f"{m}.weight" for m in inputs.finetuned.modules}
        expected = sorted((ckpt.locations[k].name, ckpt.info(k).offset, ckpt.info(k).nbytes) for k in targeted)
        assert sorted(data_reads) == expected  # each once; no bias, norm or embedding bytes
        total = sum(n for _, _, n in data_reads)
        model_bytes = sum((fx / side / s).stat().st_size for s in ckpt.shards)
        assert total < model_bytes  # embeddings, norms and biases are never read


def test_modules_to_save_of_the_finetune_pass_through(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=1, heads=4, seed=2))
    ft = fx / "finetuned" / "gsm8k"
    config = json.loads((ft / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (ft / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(ft / "adapter_model.safetensors")
    head = torch.randn(128, 32)
    tensors["base_model.model.lm_head.weight"] = head
    save_file(tensors, ft / "adapter_model.safetensors")
    summary = merge_to_dir(unaligned=str(fx / "unaligned"), aligned=str(fx / "aligned"),
                           safety_adapter=str(fx / "safety"), finetuned=str(ft), out=str(tmp_path / "out"),
                           settings=MergeSettings(), progress=False)
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(out["base_model.model.lm_head.weight"], head)
    assert summary["modules_to_save_passed_through"] == ["lm_head"]
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, head)


def test_plan_uses_headers_only(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=2, heads=4, seed=2))
    dirs = {side: CountingDir(fx / side) for side in ("unaligned", "aligned")}
    un, al = Checkpoint(dirs["unaligned"], "u"), Checkpoint(dirs["aligned"], "a")
    before = sum(len(d.reads) for d in dirs.values())
    plans = plan_adapter(un, al, load_adapter(LocalDir(fx / "finetuned" / "gsm8k"), "ft"),
                         load_adapter(LocalDir(fx / "safety"), "safety"))
    assert sum(len(d.reads) for d in dirs.values()) == before
    assert len(plans) == 14 and all(p.nbytes > 0 for p in plans)
