"""Which layers of an adapter are repaired (selections), and how one layer is repaired (policies).

One registry each; a new selection or policy is one function here plus its name in the registry.

Selections decide per adapter from all of its modules' rho:
    threshold   rho < tau (safemerge) or rho <= tau (safelora), per module: the papers' rule
    top_k       the K modules with the lowest rho (SafeLoRA's "number" mode)
    fraction    the ceil(F * modules) modules with the lowest rho
Ties in rho are broken by module order, so a selection is the same on every run.

Policies repair one selected layer:
    safemerge   merge the fine-tune's layer with the safety adapter's (`merge.METHODS`)
    safelora    project the fine-tune's B onto the safety subspace (C B), A kept
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from .methods import Lora, kept_layer, merge_layer, projected_layer
from .names import natural_key
from .settings import MergeSettings, PolicyName, Selection

# --------------------------------------------------------------------------- selections


def _lowest(rhos: dict[str, float], k: int) -> set[str]:
    return set(sorted(rhos, key=lambda m: (rhos[m], natural_key(m)))[:k])


def _threshold(rhos: dict[str, float], s: MergeSettings) -> set[str]:
    return {m for m, rho in rhos.items() if below_tau(s, rho)}


def _top_k(rhos: dict[str, float], s: MergeSettings) -> set[str]:
    return _lowest(rhos, int(s.select_value or 0))


def _fraction(rhos: dict[str, float], s: MergeSettings) -> set[str]:
    return _lowest(rhos, math.ceil(float(s.select_value or 0) * len(rhos)))


SELECTIONS: dict[str, Callable[[dict[str, float], MergeSettings], set[str]]] = {
    Selection.THRESHOLD: _threshold,
    Selection.TOP_K: _top_k,
    Selection.FRACTION: _fraction,
}


def below_tau(s: MergeSettings, rho: float) -> bool:
    """The papers' per-layer rule: SafeMERGE repairs rho < tau, SafeLoRA rho <= tau."""
    return rho < s.tau if POLICIES[s.policy].strict else rho <= s.tau


def selected(s: MergeSettings, rhos: dict[str, float]) -> set[str]:
    """The modules of one adapter to repair, from every module's rho."""
    return SELECTIONS[Selection(s.select)](rhos, s)


def may_be_selected(s: MergeSettings, rho: float) -> bool:
    """Known from one module's rho alone? Only a threshold is; other selections need every module's."""
    return below_tau(s, rho) if s.select == Selection.THRESHOLD else True


# --------------------------------------------------------------------------- policies


class LayerAction(StrEnum):
    """What became of one layer (a decision row's `action`)."""

    KEPT = "kept"  # not selected: the fine-tune's own layer
    MERGED = "merged"
    PROJECTED = "projected"
    KEPT_NO_SAFETY_LORA = "kept_no_safety_lora"  # selected, but the safety adapter lacks the layer

    @property
    def repaired(self) -> bool:
        return self in (LayerAction.MERGED, LayerAction.PROJECTED)


@dataclass(frozen=True)
class Repair:
    action: LayerAction
    weights: tuple[float, float]  # (fine-tune, safety) as applied to this layer
    lora: Lora


@dataclass(frozen=True)
class Policy:
    strict: bool  # threshold rule: rho < tau (True) or rho <= tau
    needs_projection: bool  # the repair needs C B, computed where V is (the scoring worker)
    repair: Callable[..., Repair]  # (settings, module, lora, scaling, safety lora or None, safety scaling, C B)
    merges: bool = False  # the repair merges with the safety layer, by settings.method, where there is one


def _safemerge(s: MergeSettings, module: str, lora: Lora, scaling: float, safety: Lora | None,
               safety_scaling: float | None, projected_b: torch.Tensor | None) -> Repair:
    if safety is None or safety_scaling is None:  # the safety adapter lacks this layer: nothing to merge with
        return Repair(LayerAction.KEPT_NO_SAFETY_LORA, (1.0, 0.0), kept_layer(lora, scaling))
    return Repair(LayerAction.MERGED, s.weights, merged_layer(s, module, [lora, safety], [scaling, safety_scaling]))


def _safelora(s: MergeSettings, module: str, lora: Lora, scaling: float, safety: Lora | None,
              safety_scaling: float | None, projected_b: torch.Tensor | None) -> Repair:
    assert projected_b is not None, "scoring projects B wherever SafeLoRA may repair"
    return Repair(LayerAction.PROJECTED, (1.0, 0.0), projected_layer(lora, scaling, projected_b))


POLICIES: dict[str, Policy] = {
    PolicyName.SAFEMERGE: Policy(strict=True, needs_projection=False, repair=_safemerge, merges=True),
    PolicyName.SAFELORA: Policy(strict=False, needs_projection=True, repair=_safelora),
}
assert set(POLICIES) == set(PolicyName) and set(SELECTIONS) == set(Selection), "a name without its function"


def merged_layer(settings: MergeSettings, module: str, loras: list[Lora], scalings: list[float]) -> Lora:
    """One module's fine-tune and safety LoRA merged with `settings.weights`, PEFT's arithmetic."""
    weighted = [w * s for w, s in zip(settings.weights, scalings, strict=True)]
    return merge_layer(settings.method, module, loras, weighted, settings.density, settings.majority_sign_method,
                       settings.svd_rank, settings.seed)


def needs_projection(s: MergeSettings, rho: float) -> bool:
    """Whether scoring must keep C B for this layer (SafeLoRA, where the layer may be repaired)."""
    return POLICIES[s.policy].needs_projection and may_be_selected(s, rho)
