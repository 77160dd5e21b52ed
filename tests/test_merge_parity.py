"""The merged adapter equals PEFT's own add_weighted_adapter arithmetic, layer by layer."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safemerge_ray.core import MergeSettings, module_seed, rho_reference
from safemerge_ray.engine import merge_to_dir
from safemerge_ray.store import read_decisions
from safemerge_ray.synthetic import SynthSpec, build_fixture

METHODS = ["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
WEIGHTS = (0.7, 0.3)


def _merge(fx, out, finetuned="gsm8k", **settings):
    return merge_to_dir(unaligned=str(fx / "unaligned"), aligned=str(fx / "aligned"),
                        safety_adapter=str(fx / "safety"), finetuned=str(fx / "finetuned" / finetuned),
                        out=str(out), settings=MergeSettings(**settings), progress=False)


def _peft_pair(fx, finetuned="gsm8k"):
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fx / "finetuned" / finetuned, adapter_name="ft")
    model.load_adapter(fx / "safety", adapter_name="safe")
    return model


def _lora(tensors, module):
    return (tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"])


def _peft_reference(model, module, settings):
    """PEFT's arithmetic for one layer with weights [w_ft, w_safe], DARE seeded per module as ours is."""
    target = model.base_model.model.get_submodule(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(settings.seed, module))
        return model.base_model._generalized_task_arithmetic_weighted_adapter(
            settings.method, ["ft", "safe"], list(settings.weights), target, settings.density,
            settings.majority_sign_method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_peft(pair, tmp_path, method):
    density = 0.5 if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else None
    settings = MergeSettings(method=method, weights=WEIGHTS, density=density, seed=11)
    summary = _merge(pair, tmp_path / "out", method=method, weights=WEIGHTS, density=density, seed=11)
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    rows = read_decisions(tmp_path / "out" / "decisions.parquet")
    assert summary["counts"]["actions"].get("merged", 0) > 0 and summary["counts"]["actions"].get("kept", 0) > 0

    model = _peft_pair(pair)
    if method in ("linear", "cat", "ties", "magnitude_prune"):  # deterministic: the public API, whole model
        model.add_weighted_adapter(["ft", "safe"], list(WEIGHTS), "peft_merged", combination_type=method,
                                   density=density)
    for row in rows:
        module = row["module"]
        a, b = _lora(ours, module)
        target = model.base_model.model.get_submodule(module)
        if row["action"] == "merged":
            assert (row["weight_finetuned"], row["weight_safety"]) == WEIGHTS
            if "peft_merged" in target.lora_A:
                ref_a, ref_b = target.lora_A["peft_merged"].weight, target.lora_B["peft_merged"].weight
            else:
                ref_a, ref_b = _peft_reference(model, module, settings)
            assert a.shape == ref_a.shape and b.shape == ref_b.shape
            assert torch.allclose(a, ref_a, atol=1e-6, rtol=0) and torch.allclose(b, ref_b, atol=1e-6, rtol=0)
        else:  # kept: the fine-tune's own update, unpruned, whatever the method
            assert row["action"] == "kept" and (row["weight_finetuned"], row["weight_safety"]) == (1.0, 0.0)
            expected = target.get_delta_weight("ft")
            assert torch.allclose(b @ a, expected, atol=1e-6, rtol=0)


def test_decisions_equal_direct_definition(pair, tmp_path):
    _merge(pair, tmp_path / "out", tau=0.35)
    unaligned = load_file(pair / "unaligned" / "model.safetensors")
    aligned = load_file(pair / "aligned" / "model.safetensors")
    ft = load_file(pair / "finetuned" / "gsm8k" / "adapter_model.safetensors")
    rows = read_decisions(tmp_path / "out" / "decisions.parquet")
    assert len(rows) == 7 * 2
    for row in rows:
        key = f"{row['module']}.weight"
        v = aligned[key].float() - unaligned[key].float()
        ref = rho_reference(v, *_lora(ft, row["module"]))
        assert abs(row["rho"] - ref) < 1e-5, row["module"]
        assert row["merged"] == (ref < 0.35)


def test_merged_adapter_loads_and_runs(pair, tmp_path):
    _merge(pair, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and config["use_rslora"] is False
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(pair / "aligned", dtype=torch.float32)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, tmp_path / "out")
    rows = read_decisions(tmp_path / "out" / "decisions.parquet")
    for row in rows:
        target = model.base_model.model.get_submodule(row["module"])
        assert target.scaling["default"] == 1.0
        a, b = _lora(ours, row["module"])
        assert torch.allclose(target.get_delta_weight("default"), b @ a, atol=1e-7)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)


def test_dare_is_reproducible_and_seed_dependent(pair, tmp_path):
    common = dict(method="dare_ties", density=0.5, tau=0.9)
    _merge(pair, tmp_path / "a", seed=5, **common)
    _merge(pair, tmp_path / "b", seed=5, **common)
    _merge(pair, tmp_path / "c", seed=6, **common)
    read = lambda d: (tmp_path / d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_unequal_ranks_need_cat(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=1, heads=4, rank=8, seed=9), finetune_rank=4)
    from safemerge_ray.errors import SafeMergeError

    with pytest.raises(SafeMergeError, match="use --method cat"):
        _merge(fx, tmp_path / "lin", tau=1.0)
    assert not (tmp_path / "lin").exists()
    _merge(fx, tmp_path / "cat", method="cat", tau=0.35)
    rows = read_decisions(tmp_path / "cat" / "decisions.parquet")
    ours = load_file(tmp_path / "cat" / "adapter_model.safetensors")
    model = _peft_pair(fx)
    model.add_weighted_adapter(["ft", "safe"], [0.8, 0.2], "peft_cat", combination_type="cat")
    assert {r["rank"] for r in rows if r["merged"]} == {12} and {r["rank"] for r in rows if not r["merged"]} == {4}
    for row in rows:
        a, b = _lora(ours, row["module"])
        target = model.base_model.model.get_submodule(row["module"])
        if row["merged"]:
            assert torch.allclose(a, target.lora_A["peft_cat"].weight, atol=1e-6)
            assert torch.allclose(b, target.lora_B["peft_cat"].weight, atol=1e-6)
        else:
            assert torch.allclose(b @ a, target.get_delta_weight("ft"), atol=1e-6)
    # The mixed ranks are expressed through rank_pattern and load back as written.
    base = AutoModelForCausalLM.from_pretrained(fx / "aligned", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "cat")
    for row in rows:
        target = loaded.base_model.model.get_submodule(row["module"])
        assert target.r["default"] == row["rank"] and target.scaling["default"] == 1.0


def test_safelora_projects_b_where_rho_at_most_tau(pair, tmp_path):
    _merge(pair, tmp_path / "out", policy="safelora", tau=0.35)
    rows = read_decisions(tmp_path / "out" / "decisions.parquet")
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    unaligned = load_file(pair / "unaligned" / "model.safetensors")
    aligned = load_file(pair / "aligned" / "model.safetensors")
    model = _peft_pair(pair)
    assert any(r["action"] == "projected" for r in rows) and any(r["action"] == "kept" for r in rows)
    for row in rows:
        a, b = _lora(ours, row["module"])
        target = model.base_model.model.get_submodule(row["module"])
        scaling = target.scaling["ft"]
        a_ft, b_ft = target.lora_A["ft"].weight.double(), target.lora_B["ft"].weight.double()
        if row["action"] == "projected":
            assert row["rho"] <= 0.35
            key = f"{row['module']}.weight"
            v = aligned[key].double() - unaligned[key].double()
            c = v @ v.T / torch.linalg.matrix_norm(v)
            expected = scaling * (c @ b_ft) @ a_ft
        else:
            expected = scaling * b_ft @ a_ft
        assert torch.allclose((b @ a).double(), expected, atol=1e-6)


def test_module_missing_from_safety_adapter_keeps_finetune(tmp_path):
    fx = tmp_path / "fx"
    build_fixture(fx, SynthSpec(hidden=32, layers=1, heads=4, rank=4, seed=4))
    safety = fx / "safety" / "adapter_model.safetensors"
    tensors = load_file(safety)
    dropped = "model.layers.0.mlp.down_proj"
    tensors = {k: v for k, v in tensors.items() if dropped not in k}
    from safetensors.torch import save_file
    save_file(tensors, safety)
    summary = _merge(fx, tmp_path / "out", tau=1.0)  # tau 1: every module wants a merge
    rows = {r["module"]: r for r in read_decisions(tmp_path / "out" / "decisions.parquet")}
    assert rows[dropped]["action"] == "kept_no_safety_lora" and not rows[dropped]["safety_lora_present"]
    assert rows[dropped]["weight_safety"] == 0.0
    assert summary["counts"]["actions"]["merged"] == 6


SVD_METHODS = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("svd_rank", [None, 3])
def test_svd_methods_match_peft_on_the_product(pair, tmp_path, method, svd_rank):
    """PEFT's SVD family: factors are unique only up to rotation, so the layer's update B A is compared."""
    density = None if method == "svd" else 0.5
    _merge(pair, tmp_path / "out", method=method, weights=WEIGHTS, density=density, seed=11, svd_rank=svd_rank,
           tau=0.6)
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    rows = [r for r in read_decisions(tmp_path / "out" / "decisions.parquet") if r["action"] == "merged"]
    assert rows
    model = _peft_pair(pair)
    for row in rows:
        module = row["module"]
        target = model.base_model.model.get_submodule(module)
        rank = svd_rank or max(target.r["ft"], target.r["safe"])
        with torch.random.fork_rng(devices=[]):  # DARE: seeded per module, as ours is
            torch.manual_seed(module_seed(11, module))
            ref_a, ref_b = model.base_model._svd_generalized_task_arithmetic_weighted_adapter(
                method, ["ft", "safe"], list(WEIGHTS), rank, target, None, None, density, "total")
        a, b = _lora(ours, module)
        assert a.shape == ref_a.shape and b.shape == ref_b.shape
        assert row["rank"] == rank and config["rank_pattern"].get(module, config["r"]) == rank
        expected = ref_b @ ref_a
        assert torch.linalg.matrix_norm(b @ a - expected) <= 1e-5 * torch.linalg.matrix_norm(expected), module


def test_svd_at_full_rank_is_the_exact_weighted_sum(pair, tmp_path):
    """At rank r_ft + r_safe nothing is truncated: the layer is w_ft dW_ft + w_safe dW_safe (as cat's is)."""
    _merge(pair, tmp_path / "svd", method="svd", weights=WEIGHTS, svd_rank=8, tau=0.6)
    _merge(pair, tmp_path / "cat", method="cat", weights=WEIGHTS, tau=0.6)
    svd, cat = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("svd", "cat"))
    rows = [r for r in read_decisions(tmp_path / "svd" / "decisions.parquet") if r["action"] == "merged"]
    for row in rows:
        (a, b), (ca, cb) = _lora(svd, row["module"]), _lora(cat, row["module"])
        exact = cb @ ca
        assert torch.linalg.matrix_norm(b @ a - exact) <= 1e-5 * torch.linalg.matrix_norm(exact)


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_layers_done_together_equal_layers_done_one_by_one_bit_for_bit(method):
    """Assembly merges (and keeps) many layers of one shape in one go: the bytes equal one layer at a time,
    signed zeros included."""
    from safemerge_ray.core import LINEAR_IN_B, kept_layer, kept_layers, merged_layer

    gen = torch.Generator().manual_seed(11)
    n, r, inp, out = 6, 4, 24, 16
    a, b = torch.randn(n, r, inp, generator=gen), torch.randn(n, out, r, generator=gen)
    sa, sb = torch.randn(n, r, inp, generator=gen), torch.randn(n, out, r, generator=gen)
    a[0, 0, :3], sa[0, 0, :3] = -0.0, -0.0  # the sign of a zero sum comes out as PEFT's
    scalings, safety_scalings = [2.0, 0.5, 1.0, 3.0, 2.0, 0.25], [2.0, 1.0, 2.0, 2.0, 0.5, 2.0]
    settings = MergeSettings(method=method, weights=WEIGHTS)
    weighted = torch.tensor([[WEIGHTS[0] * s, WEIGHTS[1] * t] for s, t in zip(scalings, safety_scalings, strict=True)],
                            dtype=torch.float64)
    together = LINEAR_IN_B[method](a, b, (sa, sb), weighted)
    kept = kept_layers(a, b, scalings)
    for i in range(n):
        one = merged_layer(settings, f"m{i}", [(a[i], b[i]), (sa[i], sb[i])], [scalings[i], safety_scalings[i]])
        for x, y in zip(one, (together[0][i], together[1][i]), strict=True):
            assert x.shape == y.shape and x.numpy().tobytes() == y.contiguous().numpy().tobytes()
        for x, y in zip(kept_layer((a[i], b[i]), scalings[i]), (kept[0][i], kept[1][i]), strict=True):
            assert x.numpy().tobytes() == y.contiguous().numpy().tobytes()
