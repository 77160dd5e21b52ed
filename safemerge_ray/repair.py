"""`safemerge-ray merge`: repair one fine-tuned adapter, module by module.

Flow: plan from headers -> per module read the two model weights once, score, decide -> assemble
-> write everything to a staging directory -> rename into place. Peak memory is a few modules.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import __version__
from .adapters import LoraAdapter, load_adapter
from .assemble import AssembledAdapter, ModuleScore, assemble_adapter
from .errors import SafeMergeError
from .memory import ModuleCost, available_memory, check_fits, fmt
from .merge import LINEAR_IN_B, MergeSettings
from .output import DECISIONS, SUMMARY, check_output_target, commit_files, json_bytes
from .plan import ModulePlan, plan_adapter
from .policy import POLICIES, may_be_selected, needs_projection
from .progress import Progress
from .report import counts, decisions_bytes
from .storage import S3Settings, open_dir
from .subspace import alignment_delta, lora_rho, project, project_lora_b, rho_from_projections
from .tensors import Checkpoint, release_freed_buffers


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


def prefetched(items: list, read) -> Iterator[tuple]:
    """Yield (item, read(item)) while the next item's read already runs in a background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(read, items[0]) if items else None
        for i, item in enumerate(items):
            current = upcoming
            upcoming = pool.submit(read, items[i + 1]) if i + 1 < len(items) else None
            assert current is not None  # submitted for every item
            yield item, current.result()


@dataclass(frozen=True)
class RepairInputs:
    """What repairing one adapter's layer needs besides its own factors: its LoRA scaling, and the safety
    adapter's factors and scaling for that layer (None where the safety adapter lacks it)."""

    scaling: float
    safety: tuple[torch.Tensor, torch.Tensor] | None = None
    safety_scaling: float | None = None


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
    repaired: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []
    linear: dict[str, list[int]] = {}  # method -> adapters whose repair is a merge linear in B
    for i, (rho, s) in enumerate(zip(rhos, settings, strict=True)):
        a, b = a_all[i], b_all[i]
        projected = project_lora_b(v, b) if needs_projection(s, rho) else None
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
        if done.action != "kept_no_safety_lora":
            repaired.append((i, done.lora))
    after: dict[int, float] = {}
    for method, idx in linear.items():
        rs = [repairs[i] for i in idx]  # type: ignore[index]  # (linear is only filled with repairs)
        try:
            rho = _linear_rho_after(v, a_dev, b_dev, p_all, method, idx, [settings[i] for i in idx], rs)
        except SafeMergeError:  # ranks the method cannot combine: assembly fails these adapters alone
            continue
        after.update(zip(idx, rho, strict=True))
    if repaired:
        after.update(zip([i for i, _ in repaired], lora_rho(v, [lora for _, lora in repaired]).tolist(), strict=True))
    return [ModuleScore(module, rho, projected, after.get(i))
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
    sel = torch.tensor(idx, device=v.device)
    a_m, b_m = LINEAR_IN_B[method](a_all[sel], b_all[sel], (a_s, b_s), weighted)
    _, p_m = LINEAR_IN_B[method](a_all[sel], p_all[sel], (a_s, project(v, b_s[None])[0]), weighted)
    return rho_from_projections(a_m, b_m, p_m).tolist()


@dataclass
class Inputs:
    unaligned: Checkpoint
    aligned: Checkpoint
    finetuned: LoraAdapter
    safety: LoraAdapter | None

    def fingerprints(self) -> dict:
        fp = {
            "unaligned_model": self.unaligned.fingerprint(),
            "aligned_model": self.aligned.fingerprint(),
            "finetuned_adapter": self.finetuned.fingerprint,
        }
        if self.safety is not None:
            fp["safety_adapter"] = self.safety.fingerprint
        return fp


def open_inputs(unaligned: str, aligned: str, finetuned: str, safety: str | None, policy: str,
                s3: S3Settings = S3Settings()) -> Inputs:
    if safety is None and policy == "safemerge":
        raise SafeMergeError("policy safemerge needs --safety-adapter")
    return Inputs(
        unaligned=Checkpoint(open_dir(unaligned, what="unaligned model", s3=s3), "unaligned model"),
        aligned=Checkpoint(open_dir(aligned, what="aligned model", s3=s3), "aligned model"),
        finetuned=load_adapter(open_dir(finetuned, what="fine-tuned adapter", s3=s3), "fine-tuned adapter"),
        safety=load_adapter(open_dir(safety, what="safety adapter", s3=s3), "safety adapter") if safety else None,
    )


def repair_adapter(name: str, inputs: Inputs, settings: MergeSettings, device: str = "cpu",
                   progress: bool = True) -> tuple[list[ModulePlan], AssembledAdapter]:
    plans = plan_adapter(inputs.unaligned, inputs.aligned, inputs.finetuned, inputs.safety)
    if plans:  # before any weight is read: a clear error, not an OOM kill
        free = available_memory()
        projects = int(POLICIES[settings.policy].needs_projection)
        worst = max((ModuleCost(p.module, *p.shape, p.nbytes, (p.lora.rank,), projects) for p in plans),
                    key=lambda c: c.peak)
        check_fits(worst, free, f"this machine has {fmt(free)} available")
    bar = Progress("score", len(plans)) if progress else None
    scores: dict[str, ModuleScore] = {}

    def read(plan: ModulePlan):
        return read_weight_pair(plan.weight_key, inputs.unaligned, inputs.aligned, device)

    for plan, pair in prefetched(plans, read):
        v = delta_from_pair(plan, pair, device)
        safety = inputs.safety.read_lora(plan.module) if inputs.safety is not None and plan.safety else None
        repair = RepairInputs(plan.lora.scaling, safety, plan.safety.scaling if plan.safety else None)
        a, b = inputs.finetuned.read_lora(plan.module)
        (scores[plan.module],) = score_module(plan.module, v, a[None], b[None], [settings], [repair])
        del v, pair
        if bar:
            bar.advance(nbytes=plan.nbytes)
    return plans, assemble_adapter(name, plans, scores, inputs.finetuned, inputs.safety, settings)


def merge_to_dir(*, unaligned: str, aligned: str, safety_adapter: str | None, finetuned: str, out: str,
                 settings: MergeSettings, device: str = "cpu", progress: bool = True,
                 s3: S3Settings = S3Settings()) -> dict:
    """Run the whole single-adapter repair and commit OUT atomically; returns the summary."""
    release_freed_buffers()
    device = resolve_device(device)
    out_dir = check_output_target(out, s3)
    inputs = open_inputs(unaligned, aligned, finetuned, safety_adapter, settings.policy, s3)
    name = Path(finetuned.rstrip("/")).name
    plans, result = repair_adapter(name, inputs, settings, device, progress)
    summary = {
        "tool": "safemerge-ray", "version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "adapter": name,
        "inputs": {"unaligned_model": unaligned, "aligned_model": aligned,
                   "safety_adapter": safety_adapter, "finetuned_adapter": finetuned},
        "fingerprints": inputs.fingerprints(),
        "settings": settings.to_dict(),
        "counts": counts(result.decisions),
        "safety_only_modules": sorted(set(inputs.safety.modules) - set(inputs.finetuned.modules))
        if inputs.safety else [],
        "modules_to_save_passed_through": inputs.finetuned.modules_to_save,
        "bytes_read_from_models": sum(p.nbytes for p in plans),
    }
    files = result.files()
    files[DECISIONS] = decisions_bytes(result.decisions)
    files[SUMMARY] = json_bytes(summary)
    commit_files(out_dir, files)
    summary["decisions"] = result.decisions
    return summary
