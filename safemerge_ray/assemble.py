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


@dataclass(frozen=True, slots=True)  # a fleet's driver holds one per (adapter, module): no __dict__
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
    for plan, lora, safety_lora in _factors(plans, chosen, finetuned, safety):
        rho = scores[plan.module].rho
        if plan.module not in chosen:
            action, weights, (a, b) = "kept", (1.0, 0.0), kept_layer(lora, plan.lora.scaling)
        else:
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
    bad = first_non_finite(tensors)
    if bad is not None:
        raise SafeMergeError(f"adapter {name}: merged tensor {bad} is not finite")
    return AssembledAdapter(tensors, output_config(finetuned.config, ranks), rows)


READ_SPAN = 64 * 2**20  # factor bytes read at once: few reads for many small modules, bounded for large ones


def _factors(plans: list[ModulePlan], chosen: set[str], finetuned: LoraAdapter, safety: LoraAdapter | None):
    """(plan, its fine-tune's (A, B), the safety adapter's (A, B) where the layer is repaired and it has one),
    read a span of modules at a time."""
    start = 0
    while start < len(plans):
        end, size = start, 0
        while end < len(plans) and (end == start or size + _nbytes(plans[end]) <= READ_SPAN):
            size += _nbytes(plans[end])
            end += 1
        batch = plans[start:end]
        loras = finetuned.read_loras([p.module for p in batch])
        repaired = [p.module for p in batch if p.module in chosen and p.safety is not None]
        safety_loras = safety.read_loras(repaired) if safety is not None and repaired else {}
        for p in batch:
            yield p, loras[p.module], safety_loras.get(p.module)
        start = end


def _nbytes(plan: ModulePlan) -> int:
    return 4 * plan.lora.rank * sum(plan.shape)


def first_non_finite(tensors: dict[str, torch.Tensor], span: int = 16 * 2**20) -> str | None:
    """The first float tensor holding NaN or Inf, or None. Tensors are checked a span of elements at a time
    (one sum over many small layers, not a check per tensor); the culprit is looked up only when the sum is
    not finite."""
    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    items = [(k, t) for k, t in tensors.items() if t.is_floating_point()]
    for i, (key, t) in enumerate(items):
        batch.append((key, t))
        size += t.numel()
        if size >= span or i == len(items) - 1:
            flat = torch.cat([x.reshape(-1).float() for _, x in batch]) if len(batch) > 1 else batch[0][1]
            if not bool(torch.isfinite(flat.sum(dtype=torch.float64))):  # NaN/Inf poison the sum
                bad = [k for k, x in batch if not bool(torch.isfinite(x).all())]
                if bad:
                    return bad[0]
            batch, size = [], 0
    return None


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
