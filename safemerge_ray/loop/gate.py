"""The fleet's gate: a repaired adapter is published only if an evaluation says it is safe enough and the
task held. One that fails is held back: its pointer stays on the last adapter that passed, and the run's
summary, its record and `status` say why, with the numbers."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import SafeMergeError, first_line
from ..io import S3Settings
from .evaluation import evaluate
from .spec import EvalResult, EvalSpec, Pair


class GateSection(BaseModel):
    """`gate:` in the fleet config."""

    model_config = ConfigDict(extra="forbid")

    eval: EvalSpec
    max_harmful_rate: float | None = Field(None, ge=0, le=1, description="the repaired adapter's harmful rate "
                                                                         "may be at most this")
    max_task_drop: float | None = Field(None, ge=0, le=1, description="the repaired adapter's task score may be at "
                                                                      "most this far below the fine-tune's")

    @model_validator(mode="after")
    def _something_to_check(self):
        if self.max_harmful_rate is None and self.max_task_drop is None:
            raise ValueError("give max_harmful_rate, max_task_drop or both")
        if self.max_task_drop is not None and not self.eval.task_prompts:
            raise ValueError("max_task_drop needs eval.task_prompts")
        return self


@dataclass
class GateOutcome:
    held: dict[str, str]  # adapter -> why, with the numbers
    numbers: dict[str, dict]  # adapter -> {harmful_rate, finetune_harmful_rate, task_score, ..., passed}
    result: EvalResult | None  # None: the evaluation itself failed


def verdict(entry: dict, gate: GateSection) -> str | None:
    """Why an adapter's eval summary fails the gate, or None."""
    reasons = []
    rate = entry["repaired_adapter"]["harmful_rate"]
    if gate.max_harmful_rate is not None and rate["mean"] > gate.max_harmful_rate:
        lo, hi = rate["ci95"]
        reasons.append(f"harmful rate {rate['mean']:.3f} (95% CI {lo:.3f}-{hi:.3f}, fine-tune "
                       f"{entry['finetune']['harmful_rate']['mean']:.3f}) > max_harmful_rate {gate.max_harmful_rate}")
    drop = entry["task_drop"]
    if gate.max_task_drop is not None and drop is not None and drop > gate.max_task_drop:
        reasons.append(f"task score {entry['finetune']['task_score']['mean']:.3f} -> "
                       f"{entry['repaired_adapter']['task_score']['mean']:.3f} (drop {drop:.3f}) > max_task_drop "
                       f"{gate.max_task_drop}")
    return "gate: " + "; ".join(reasons) if reasons else None


def numbers(entry: dict) -> dict:
    ft, rep = entry["finetune"], entry["repaired_adapter"]
    return {"harmful_rate": rep["harmful_rate"]["mean"], "harmful_rate_ci95": rep["harmful_rate"]["ci95"],
            "finetune_harmful_rate": ft["harmful_rate"]["mean"], "task_score": rep["task_score"]["mean"],
            "finetune_task_score": ft["task_score"]["mean"], "task_drop": entry["task_drop"]}


def run_gate(gate: GateSection, aligned: str, pairs: list[Pair], s3: S3Settings) -> GateOutcome:
    """Evaluate the run's repaired adapters; every one whose numbers fail is held. If the evaluation itself
    fails, every adapter is held: nothing unchecked is published."""
    try:
        result = evaluate(gate.eval, aligned, pairs, s3)
    except Exception as exc:  # bad inputs, or a Ray or model error: the adapters are not published unchecked
        cause = str(exc) if isinstance(exc, SafeMergeError) else f"{type(exc).__name__}: {first_line(exc)}"
        why = f"gate: the evaluation failed: {cause}"
        return GateOutcome({p.name: why for p in pairs}, {}, None)
    held, stats = {}, {}
    for p in pairs:
        entry = result.summary["adapters"][p.name]
        reason = verdict(entry, gate)
        stats[p.name] = {**numbers(entry), "passed": reason is None}
        if reason:
            held[p.name] = reason
    return GateOutcome(held, stats, result)
