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

from .. import __version__
from ..core import POLICIES, MergeSettings, ModuleCost, PolicyName, available_memory, check_fits, fmt
from ..errors import SafeMergeError
from ..io import (
    Checkpoint,
    LoraAdapter,
    S3Settings,
    json_bytes,
    load_adapter,
    open_dir,
    release_freed_buffers,
    resolve_location,
)
from ..progress import Progress
from ..store import DECISIONS, SUMMARY, check_output_target, commit_files, counts, decisions_bytes
from .assemble import AssembledAdapter, assemble_adapter
from .plan import ModulePlan, plan_adapter
from .score import ModuleScore, RepairInputs, delta_from_pair, read_weight_pair, resolve_device, score_module


def prefetched(items: list, read) -> Iterator[tuple]:
    """Yield (item, read(item)) while the next item's read already runs in a background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(read, items[0]) if items else None
        for i, item in enumerate(items):
            current = upcoming
            upcoming = pool.submit(read, items[i + 1]) if i + 1 < len(items) else None
            assert current is not None  # submitted for every item
            yield item, current.result()




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
    if resolve_location(unaligned) == resolve_location(aligned):
        raise SafeMergeError("the aligned and unaligned models are identical (the same location): V = 0 everywhere; "
                             "give the pre-alignment base model as --unaligned")
    if safety is None and policy == PolicyName.SAFEMERGE:
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
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
