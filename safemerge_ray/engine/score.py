"""The scoring kernel: one module's V against many adapters' LoRA layers, in one batch.

Shared by `merge` (one adapter, module by module) and the fleet's workers (every pending adapter of a
module at once): rho of each layer and, where it may be repaired, the rho of the layer as repaired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from ..core import (
    LINEAR_IN_B,
    POLICIES,
    LayerAction,
    MergeSettings,
    Repair,
    alignment_delta,
    lora_rho,
    may_be_selected,
    needs_projection,
    project,
    rho_from_projections,
    safelora_b,
)
from ..errors import SafeMergeError
from ..io import Checkpoint


class ModuleScore(NamedTuple):
    """One (adapter, module)'s scores. A tuple: a fleet sends one per pair from worker to driver and back,
    and tuples pickle ten times faster than dataclasses (0.6 ms for 896 of them, not 5)."""

    module: str
    rho: float
    projected_b: torch.Tensor | None = None  # C B, only for SafeLoRA where it may repair the layer
    rho_after: float | None = None  # rho of the layer as repaired, where it may be (computed where V is)
    repaired: Repair | None = None  # the layer as repaired, where rho_after needed it and assembly would redo it


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SafeMergeError("--device cuda was asked for but no CUDA device is available")
        # Full float32 GEMMs: TF32 would move rho by ~1e-3, past the 1e-5 agreement with the CPU path.
        torch.backends.cuda.matmul.allow_tf32 = False
        return device
    raise SafeMergeError(f"device must be cpu or cuda; got {device!r}")


def read_weight_pair(weight_key: str, unaligned: Checkpoint, aligned: Checkpoint,
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(W_aligned, W_unaligned) as stored; page-locked when bound for a GPU, so the copy is async."""
    pin = device.startswith("cuda")
    return aligned.read(weight_key, pin_memory=pin), unaligned.read(weight_key, pin_memory=pin)


class WeightLayout(Protocol):
    """What V needs to know of a module: its name (for messages) and whether its weight is stored [in, out].

    A `ModulePlan` satisfies it, and so does the fleet's `ModuleJob`.
    """

    @property
    def module(self) -> str: ...

    @property
    def transpose(self) -> bool: ...


def delta_from_pair(plan: WeightLayout, pair: tuple[torch.Tensor, torch.Tensor], device: str) -> torch.Tensor:
    """V = W_aligned - W_unaligned for one module, as [out, in] float32 on `device`."""
    v = alignment_delta(pair[0], pair[1], plan.module, device)
    return v.T if plan.transpose else v


@dataclass
class SafetyProjection:
    """V V^T B of a module's safety layer, made on first use and kept: a fleet scores a module's adapters in
    chunks, and every chunk's linear repairs need it. Its own r columns, not a panel: it goes only into rho_after,
    which `merge` and the fleet both take from here (a padded panel was 8x the GEMM, 12% of a fleet's at N = 64)."""

    p: torch.Tensor | None = None

    def of(self, v: torch.Tensor, b_safety: torch.Tensor) -> torch.Tensor:
        if self.p is None:
            self.p = v @ (v.T @ b_safety.to(v.dtype))
        return self.p


@dataclass(frozen=True)
class RepairInputs:
    """What repairing one adapter's layer needs besides its own factors: its LoRA scaling, and the safety
    adapter's factors and scaling for that layer (None where the safety adapter lacks it); `projection`
    keeps the safety layer's projection for the module's next chunks."""

    scaling: float
    safety: tuple[torch.Tensor, torch.Tensor] | None = None
    safety_scaling: float | None = None
    projection: SafetyProjection | None = None


def score_module(module: str, v: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                 settings: list[MergeSettings], repairs: list[RepairInputs] | None = None) -> list[ModuleScore]:
    """Score N adapters' LoRA layers of one rank ([N, r, in], [N, out, r] on the host) against one module's V
    in one batch. With `repairs`, also the rho of each layer as it would be repaired (where it may be): the
    repair's effect. Merges linear in B (LINEAR_IN_B) are done for all adapters at once and need no second
    GEMM over V: applied to the layers' V V^T B, the merge gives the merged layer's. Other repaired layers
    are projected again, in one batch."""
    a_dev, b_dev = a_all.to(v.device), b_all.to(v.device)  # the factors cross to V's device once, stacked
    p_all = project(v, b_dev)
    rhos = rho_from_projections(a_dev, b_dev, p_all).tolist()
    projections: list[torch.Tensor | None] = []
    repaired: list[tuple[int, Repair]] = []
    linear: dict[str, list[int]] = {}  # method -> adapters whose repair is a merge linear in B
    v_norm: torch.Tensor | None = None
    for i, (rho, s) in enumerate(zip(rhos, settings, strict=True)):
        a, b = a_all[i], b_all[i]
        projected = None
        if needs_projection(s, rho):  # SafeLoRA's C B: its V V^T B is in the batch already
            v_norm = torch.linalg.matrix_norm(v) if v_norm is None else v_norm
            projected = safelora_b(p_all[i], v_norm)
        projections.append(projected)
        if repairs is None or not may_be_selected(s, rho):
            continue
        r = repairs[i]
        if POLICIES[s.policy].merges and s.method in LINEAR_IN_B and r.safety is not None \
                and r.safety_scaling is not None:
            linear.setdefault(s.method, []).append(i)
            continue
        try:
            done = POLICIES[s.policy].repair(s, module, (a, b), r.scaling, r.safety, r.safety_scaling, projected)
        except SafeMergeError:  # e.g. ranks a method cannot combine: assembly fails this adapter alone
            continue
        if done.action != LayerAction.KEPT_NO_SAFETY_LORA:
            repaired.append((i, done))
            projections[i] = None  # the repair carries it
    after: dict[int, float] = {}
    for method, idx in linear.items():
        rs = [repairs[i] for i in idx]  # type: ignore[index]  # (linear is only filled with repairs)
        try:
            rho = _linear_rho_after(v, a_dev, b_dev, p_all, method, idx, [settings[i] for i in idx], rs)
        except SafeMergeError:  # ranks the method cannot combine: assembly fails these adapters alone
            continue
        after.update(zip(idx, rho, strict=True))
    if repaired:
        after.update(zip([i for i, _ in repaired], lora_rho(v, [r.lora for _, r in repaired]).tolist(), strict=True))
    carried = dict(repaired)  # computed once: assembly takes the layer as it is
    return [ModuleScore(module, rho, projected, after.get(i), carried.get(i))
            for i, (rho, projected) in enumerate(zip(rhos, projections, strict=True))]


def _linear_rho_after(v: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, p_all: torch.Tensor, method: str,
                      idx: list[int], settings: list[MergeSettings], repairs: list[RepairInputs]) -> list[float]:
    """rho of the layers `idx` merged by `method` with the module's one safety layer, all at once, from the
    projections already made (V V^T of the merge = the merge of V V^T B and V V^T B_safety)."""
    safety = repairs[0].safety
    assert safety is not None
    a_s, b_s = safety[0].to(v.device), safety[1].to(v.device)
    weighted = torch.tensor([[s.weights[0] * r.scaling, s.weights[1] * (r.safety_scaling or 0.0)]
                             for s, r in zip(settings, repairs, strict=True)], dtype=torch.float64, device=v.device)
    if idx != list(range(len(a_all))):  # (a copy of each only where some adapters are not repaired)
        sel = torch.tensor(idx, device=v.device)
        a_all, b_all, p_all = a_all[sel], b_all[sel], p_all[sel]
    a_m, b_m = LINEAR_IN_B[method](a_all, b_all, (a_s, b_s), weighted)
    p_s = (repairs[0].projection or SafetyProjection()).of(v, b_s)
    p_m = LINEAR_IN_B[method].b(p_all, p_s, weighted)  # the merged A is the one just made
    return rho_from_projections(a_m, b_m, p_m).tolist()
