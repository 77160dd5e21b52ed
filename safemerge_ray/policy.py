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

import torch

from .merge import Lora, MergeSettings, kept_layer, merged_layer, projected_layer
from .tensors import natural_key

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
    "threshold": _threshold,
    "top_k": _top_k,
    "fraction": _fraction,
}


def below_tau(s: MergeSettings, rho: float) -> bool:
    """The papers' per-layer rule: SafeMERGE repairs rho < tau, SafeLoRA rho <= tau."""
    return rho < s.tau if POLICIES[s.policy].strict else rho <= s.tau


def selected(s: MergeSettings, rhos: dict[str, float]) -> set[str]:
    """The modules of one adapter to repair, from every module's rho."""
    return SELECTIONS[s.select](rhos, s)


def may_be_selected(s: MergeSettings, rho: float) -> bool:
    """Known from one module's rho alone? Only a threshold is; other selections need every module's."""
    return below_tau(s, rho) if s.select == "threshold" else True


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Repair:
    action: str  # merged | projected | kept_no_safety_lora
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
        return Repair("kept_no_safety_lora", (1.0, 0.0), kept_layer(lora, scaling))
    return Repair("merged", s.weights, merged_layer(s, module, [lora, safety], [scaling, safety_scaling]))


def _safelora(s: MergeSettings, module: str, lora: Lora, scaling: float, safety: Lora | None,
              safety_scaling: float | None, projected_b: torch.Tensor | None) -> Repair:
    assert projected_b is not None, "scoring projects B wherever SafeLoRA may repair"
    return Repair("projected", (1.0, 0.0), projected_layer(lora, scaling, projected_b))


POLICIES: dict[str, Policy] = {
    "safemerge": Policy(strict=True, needs_projection=False, repair=_safemerge, merges=True),
    "safelora": Policy(strict=False, needs_projection=True, repair=_safelora),
}


def needs_projection(s: MergeSettings, rho: float) -> bool:
    """Whether scoring must keep C B for this layer (SafeLoRA, where the layer may be repaired)."""
    return POLICIES[s.policy].needs_projection and may_be_selected(s, rho)
