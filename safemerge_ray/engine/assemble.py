"""Decide and assemble one adapter: scores in, a PEFT adapter (tensors + config) and its decision rows out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..core import LINEAR_IN_B, POLICIES, LayerAction, Lora, MergeSettings, kept_layers, selected
from ..errors import SafeMergeError
from ..io import PREFIX, WEIGHTS, LoraAdapter, adapter_files, float32_finite
from .plan import ModulePlan
from .score import ModuleScore


@dataclass
class AssembledAdapter:
    name: str
    tensors: dict[str, torch.Tensor]
    config: dict
    decisions: list[dict]

    def files(self) -> dict[str, bytes]:
        """The adapter directory as bytes; a merge that made NaN or Inf is an error, not a file."""
        files = adapter_files(self.tensors, self.config)
        if not all(t.dtype == torch.float32 for t in self.tensors.values()) or not float32_finite(files[WEIGHTS]):
            bad = first_non_finite(self.tensors)  # tensor by tensor: rare (bf16 passed through, a NaN, an overflow)
            if bad is not None:
                raise SafeMergeError(f"adapter {self.name}: merged tensor {bad} is not finite")
        return files


def assemble_adapter(name: str, plans: list[ModulePlan], scores: dict[str, ModuleScore],
                     finetuned: LoraAdapter, safety: LoraAdapter | None,
                     settings: MergeSettings) -> AssembledAdapter:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    rows = []
    chosen = selected(settings, {plan.module: scores[plan.module].rho for plan in plans})
    done = _layers(plans, chosen, finetuned, safety, settings, scores)
    for plan in plans:
        rho = scores[plan.module].rho
        action, weights, (a, b) = done[plan.module]
        tensors[f"{PREFIX}{plan.module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{plan.module}.lora_B.weight"] = b.contiguous()
        ranks[plan.module] = a.shape[0]
        rows.append({
            "adapter": name, "module": plan.module, "rho": rho, "tau": settings.tau,
            "rho_after": scores[plan.module].rho_after if action.repaired else None,
            "merged": action.repaired, "action": str(action),
            "policy": settings.policy, "method": settings.method,
            "weight_finetuned": weights[0], "weight_safety": weights[1],
            "rank": a.shape[0], "safety_lora_present": plan.safety is not None,
        })
    for key, t in finetuned.read_extra().items():  # modules_to_save copies pass through untouched
        tensors[key] = t
    return AssembledAdapter(name, tensors, output_config(finetuned.config, ranks), rows)


def _layers(plans: list[ModulePlan], chosen: set[str], finetuned: LoraAdapter, safety: LoraAdapter | None,
            settings: MergeSettings, scores: dict[str, ModuleScore]) -> dict[str, tuple[LayerAction, tuple, Lora]]:
    """module -> (action, (weight of the fine-tune, of the safety layer), output (A, B)). Kept layers, and
    layers merged by a method linear in B, are done many at a time where their shapes agree (the same
    arithmetic, elementwise: the same bytes; a thousand small layers cost a few ops, not a few each)."""
    policy = POLICIES[settings.policy]
    done: dict[str, tuple[LayerAction, tuple, Lora]] = {}
    batches: dict[tuple, list[tuple[ModulePlan, Lora, Lora | None]]] = {}
    for plan, lora, safety_lora in _factors(plans, chosen, finetuned, safety):
        if plan.module not in chosen:
            key: tuple = (LayerAction.KEPT, lora[0].shape, lora[1].shape)
        elif policy.merges and settings.method in LINEAR_IN_B and safety_lora is not None and plan.safety:
            key = (LayerAction.MERGED, lora[0].shape, lora[1].shape, safety_lora[0].shape, safety_lora[1].shape)
        else:  # done in scoring already (for its rho_after) where it could be
            score = scores[plan.module]
            repair = score.repaired or policy.repair(settings, plan.module, lora, plan.lora.scaling, safety_lora,
                                                     plan.safety.scaling if plan.safety else None, score.projected_b)
            done[plan.module] = (repair.action, repair.weights, repair.lora)
            continue
        batches.setdefault(key, []).append((plan, lora, safety_lora))
    for key, items in batches.items():
        a = torch.stack([lora[0] for _, lora, _ in items])
        b = torch.stack([lora[1] for _, lora, _ in items])
        if key[0] == LayerAction.KEPT:
            merged, weights = kept_layers(a, b, [plan.lora.scaling for plan, _, _ in items]), (1.0, 0.0)
        else:
            pairs = [s for _, _, s in items]
            weighted = torch.tensor([[settings.weights[0] * plan.lora.scaling,
                                      settings.weights[1] * plan.safety.scaling]  # type: ignore[union-attr]
                                     for plan, _, _ in items], dtype=torch.float64)
            merged = LINEAR_IN_B[settings.method](a, b, (torch.stack([p[0] for p in pairs]),  # type: ignore[index]
                                                         torch.stack([p[1] for p in pairs])), weighted)  # type: ignore[index]
            weights = (settings.weights[0], settings.weights[1])
        for (plan, _, _), a_out, b_out in zip(items, merged[0].unbind(0), merged[1].unbind(0), strict=True):
            done[plan.module] = (key[0], weights, (a_out, b_out))
    return done


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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first float tensor holding NaN or Inf, or None."""
    return next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


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
