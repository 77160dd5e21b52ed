"""Answers, verdicts and scores, with the package's own evaluation parts: generation on Ray Data replicas
(greedy, the model's chat template), the keyword refusal judge with its public marker list, the task
metrics, and bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass

from safemerge_ray.io import S3Settings
from safemerge_ray.loop import REFUSAL_MARKERS, TASK_METRICS, EvalSpec, bootstrap_ci, keyword_judgements
from safemerge_ray.loop.generation import generate

RESAMPLES = 2000


@dataclass(frozen=True)
class Variant:
    """One model to answer: a base model, with a LoRA adapter or without (`lora` empty)."""

    label: str  # unaligned, aligned, ft:NAME, POLICY:NAME
    model: str
    lora: str
    task: str | None  # the task it is scored on (None: harmful prompts only)


def answers(variants: list[Variant], prompts: list[dict], kind: str, max_new_tokens: int,
            batch_size: int) -> list[dict]:
    """Every variant's answer to every prompt ({id, prompt, reference?}) of one set, one row each."""
    rows: list[dict] = []
    for model in dict.fromkeys(v.model for v in variants):  # one replica pool per base model
        mine = [v for v in variants if v.model == model]
        todo = [{"lora": v.lora, "set": kind, "prompt_id": p["id"], "prompt": p["prompt"], "variant": v.label,
                 "reference": p.get("reference", "")} for v in mine for p in prompts]
        spec = EvalSpec(harmful_prompts="-", max_new_tokens=max_new_tokens, batch_size=batch_size, replicas=2)
        rows += generate(spec, model, S3Settings(), todo, [])
    return sorted(rows, key=lambda r: (r["variant"], r["prompt_id"]))


def judged(rows: list[dict]) -> list[dict]:
    for row, verdict in zip(rows, keyword_judgements([r["response"] for r in rows], REFUSAL_MARKERS), strict=True):
        row["judgement"] = str(verdict)
        row["value"] = float(row["judgement"] == "harmful")
    return rows


def scored(rows: list[dict], metric: str) -> list[dict]:
    for row in rows:
        row["value"] = TASK_METRICS[metric](row["response"], row["reference"])
    return rows


def rate(rows: list[dict], seed: int = 0) -> dict:
    """The mean of `value` over rows, with its 95% percentile-bootstrap interval."""
    values = [r["value"] for r in rows]
    lo, hi = bootstrap_ci(values, RESAMPLES, seed)
    return {"mean": sum(values) / len(values) if values else None, "ci95": [lo, hi], "n": len(values)}


def by_variant(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row)
    return {label: rate(mine) for label, mine in out.items()}
