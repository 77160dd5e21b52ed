"""Planning from headers only: which model weight each adapter module scores against.

No tensor data is read here, so a fleet can be planned (and balanced by bytes) before any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import check_same_shape
from ..errors import SafeMergeError
from ..io import Checkpoint, LoraAdapter, LoraModule


@dataclass(frozen=True, slots=True)  # a fleet plans one per (adapter, module): no __dict__
class ModulePlan:
    module: str
    weight_key: str  # the module's weight in both model checkpoints
    transpose: bool  # fan_in_fan_out layers (GPT-2 Conv1D) store the weight as [in, out]
    nbytes: int  # bytes of the two model weights: the cost of scoring this module
    lora: LoraModule
    safety: LoraModule | None  # None: the safety adapter lacks this module; it keeps the fine-tune

    @property
    def shape(self) -> tuple[int, int]:
        """The module's [out, in]."""
        return self.lora.b_shape[0], self.lora.a_shape[1]


def _weight_key(module: str, unaligned: Checkpoint, aligned: Checkpoint) -> str:
    # Adapters name modules inside the full model (`model.layers.0...`); a checkpoint saved from the
    # bare decoder names them without the leading `model.`.
    candidates = [f"{module}.weight"]
    if module.startswith("model."):
        candidates.append(f"{module[len('model.'):]}.weight")
    else:
        candidates.append(f"model.{module}.weight")
    for key in candidates:
        if key in aligned and key in unaligned:
            return key
    where = "aligned" if not any(k in aligned for k in candidates) else "unaligned"
    raise SafeMergeError(
        f"module {module}: the {where} model has no weight {candidates[0]!r}; "
        "is the adapter for a different model?"
    )


def plan_adapter(unaligned: Checkpoint, aligned: Checkpoint, finetuned: LoraAdapter,
                 safety: LoraAdapter | None) -> list[ModulePlan]:
    transpose = bool(finetuned.config.get("fan_in_fan_out"))
    if safety is not None and bool(safety.config.get("fan_in_fan_out")) != transpose:
        raise SafeMergeError("fine-tune and safety adapter disagree on fan_in_fan_out")
    overlap = set(finetuned.modules_to_save) & set(safety.modules_to_save if safety else [])
    if overlap:
        raise SafeMergeError(
            f"modules_to_save conflict: both adapters carry their own copy of {', '.join(sorted(overlap))}; "
            "full-module copies cannot be merged (PEFT refuses this too)"
        )
    plans = []
    for module, lora in finetuned.modules.items():
        key = _weight_key(module, unaligned, aligned)
        w_al, w_un = aligned.info(key), unaligned.info(key)
        check_same_shape(module, w_al.shape, w_un.shape)
        if len(w_al.shape) != 2:
            raise SafeMergeError(f"module {module}: model weight {key} is {len(w_al.shape)}-D, not a linear layer")
        out_in = (lora.b_shape[0], lora.a_shape[1])
        expected = out_in[::-1] if transpose else out_in
        if tuple(w_al.shape) != expected:
            raise SafeMergeError(
                f"module {module}: LoRA update is {list(out_in)} ([out, in]) but the model weight {key} "
                f"is {list(w_al.shape)}"
            )
        safe = safety.modules.get(module) if safety is not None else None
        if safe is not None and (safe.b_shape[0], safe.a_shape[1]) != out_in:
            raise SafeMergeError(
                f"module {module}: safety LoRA is {[safe.b_shape[0], safe.a_shape[1]]} but the fine-tune's is "
                f"{list(out_in)}"
            )
        plans.append(ModulePlan(module, key, transpose, w_al.nbytes + w_un.nbytes, lora, safe))
    return plans
