"""Decide and assemble one adapter: scores in, a PEFT adapter (tensors + config) and its decision rows out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .adapters import PREFIX, LoraAdapter
from .errors import SafeMergeError
from .merge import MergeSettings, kept_layer
from .plan import ModulePlan
from .policy import POLICIES, selected


@dataclass(frozen=True)
class ModuleScore:
    module: str
    rho: float
    projected_b: torch.Tensor | None = None  # C B, only for SafeLoRA where it may repair the layer
    rho_after: float | None = None  # rho of the layer as repaired, where it may be (computed where V is)


@dataclass
class AssembledAdapter:
    tensors: dict[str, torch.Tensor]
    config: dict
    decisions: list[dict]


def assemble_adapter(name: str, plans: list[ModulePlan], scores: dict[str, ModuleScore],
                     finetuned: LoraAdapter, safety: LoraAdapter | None,
                     settings: MergeSettings) -> AssembledAdapter:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    rows = []
    chosen = selected(settings, {plan.module: scores[plan.module].rho for plan in plans})
    policy = POLICIES[settings.policy]
    for plan in plans:
        lora = finetuned.read_lora(plan.module)
        rho = scores[plan.module].rho
        if plan.module not in chosen:
            action, weights, (a, b) = "kept", (1.0, 0.0), kept_layer(lora, plan.lora.scaling)
        else:
            safety_lora = safety.read_lora(plan.module) if safety is not None and plan.safety is not None else None
            done = policy.repair(settings, plan.module, lora, plan.lora.scaling, safety_lora,
                                 plan.safety.scaling if plan.safety else None, scores[plan.module].projected_b)
            action, weights, (a, b) = done.action, done.weights, done.lora
        tensors[f"{PREFIX}{plan.module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{plan.module}.lora_B.weight"] = b.contiguous()
        ranks[plan.module] = a.shape[0]
        rows.append({
            "adapter": name, "module": plan.module, "rho": rho, "tau": settings.tau,
            "rho_after": scores[plan.module].rho_after if action in ("merged", "projected") else None,
            "merged": action in ("merged", "projected"), "action": action,
            "policy": settings.policy, "method": settings.method,
            "weight_finetuned": weights[0], "weight_safety": weights[1],
            "rank": a.shape[0], "safety_lora_present": plan.safety is not None,
        })
    for key, t in finetuned.read_extra().items():  # modules_to_save copies pass through untouched
        tensors[key] = t
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SafeMergeError(f"adapter {name}: merged tensor {bad[0]} is not finite")
    return AssembledAdapter(tensors, output_config(finetuned.config, ranks), rows)


def output_config(finetuned_config: dict, ranks: dict[str, int]) -> dict:
    """The fine-tune's config with every layer at scaling 1: `r = lora_alpha` per module.

    The most common rank is the default; the others (cat merges) go in rank/alpha patterns keyed by
    the full module path, which PEFT's pattern match resolves to exactly that module.
    """
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != default}
    config = dict(finetuned_config)
    config.update(r=default, lora_alpha=default, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  use_rslora=False, use_dora=False, inference_mode=True)
    return config
