"""Today's way, once per fine-tune: what a user of the public reference tool does.

Written from DESIGN.md's definition, as the reference tool works: load both full models, form
`C = V V^T / ||V||_F` for every target module, load the fine-tune and the safety adapter into a
PeftModel, score each layer with `rho = cos(C dW, dW)`, merge per layer with PEFT's arithmetic, save.

    python bench/baseline_reference.py --fixture DIR --adapter NAME --out DIR [--tau 0.35]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import cast

import torch
from peft import LoraModel, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def run(fixture: Path, adapter: str, out: Path, tau: float = 0.35, weights=(0.8, 0.2)) -> dict:
    start = time.perf_counter()
    unaligned = AutoModelForCausalLM.from_pretrained(fixture / "unaligned", dtype=torch.bfloat16)
    aligned = AutoModelForCausalLM.from_pretrained(fixture / "aligned", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(aligned, fixture / "finetuned" / adapter, adapter_name="ft")
    model.load_adapter(fixture / "safety", adapter_name="safe")
    tuner = cast(LoraModel, model.base_model)  # PEFT types base_model loosely (a Tensor or a Module)
    base = tuner.model
    targets = {name: mod for name, mod in base.named_modules() if hasattr(mod, "lora_A") and "ft" in mod.lora_A}
    unaligned_params = dict(unaligned.named_parameters())

    # The safety subspace: C for every target module, built up front as the reference tool does.
    projections = {}
    for name, mod in targets.items():
        v = mod.base_layer.weight.float() - unaligned_params[f"{name}.weight"].float()
        projections[name] = v @ v.T / torch.linalg.matrix_norm(v)
    del unaligned, unaligned_params

    tensors, rows = {}, []
    for name, mod in targets.items():
        dw = mod.get_delta_weight("ft").float()
        rho = float(torch.nn.functional.cosine_similarity((projections[name] @ dw).reshape(1, -1), dw.reshape(1, -1)))
        if rho < tau:  # merge this layer with PEFT's arithmetic and the local weights
            a, b = tuner._generalized_task_arithmetic_weighted_adapter(
                "linear", ["ft", "safe"], list(weights), mod, None, "total")
        else:  # keep the fine-tune's layer, at scaling 1 like the merged ones
            s = mod.scaling["ft"]
            a = mod.lora_A["ft"].weight * math.copysign(math.sqrt(abs(s)), s)
            b = mod.lora_B["ft"].weight * math.sqrt(abs(s))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous()
        rows.append({"module": name, "rho": rho, "merged": rho < tau})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "decisions.json").write_text(json.dumps(rows))
    return {"work_s": time.perf_counter() - start}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tau", type=float, default=0.35)
    args = ap.parse_args()
    print(json.dumps(run(args.fixture, args.adapter, args.out, args.tau)))
