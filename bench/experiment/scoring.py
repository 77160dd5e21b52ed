"""Answers, verdicts and scores, with the package's own evaluation parts: generation on Ray Data replicas
(greedy, the model's chat template), the keyword refusal judge with its public marker list, the task
metrics, and bootstrap intervals."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

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


CHUNK = 4  # variants generated per call when answers are cached: what a stopped run loses at most


def answers(variants: list[Variant], prompts: list[dict], kind: str, max_new_tokens: int,
            batch_size: int, cache: Path | None = None) -> list[dict]:
    """Every variant's answer to every prompt ({id, prompt, reference?}) of one set, one row each. With `cache`,
    each variant's answers are kept there as they are made (CHUNK variants a call), and a rerun reuses them:
    the evaluation, the longest stage, resumes where it stopped."""
    rows: list[dict] = []
    todo = [v for v in variants if cache is None or not _cached(cache, v, kind).exists()]
    for v in variants:
        if v not in todo:
            rows += json.loads(_cached(cache, v, kind).read_text())["rows"]
    for model in dict.fromkeys(v.model for v in todo):  # one replica pool per base model
        mine = [v for v in todo if v.model == model]
        for start in range(0, len(mine), CHUNK if cache else len(mine)):
            chunk = mine[start:start + (CHUNK if cache else len(mine))]
            begun = time.monotonic()
            made = _generate(chunk, model, prompts, kind, max_new_tokens, batch_size)
            rows += made
            if cache is not None:
                each = (time.monotonic() - begun) / len(chunk)
                for v in chunk:
                    path = _cached(cache, v, kind)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"seconds": each, "rows": [r for r in made if r["variant"] == v.label]}))
    return sorted(rows, key=lambda r: (r["variant"], r["prompt_id"]))


def _generate(variants: list[Variant], model: str, prompts: list[dict], kind: str, max_new_tokens: int,
              batch_size: int) -> list[dict]:
    todo = [{"lora": v.lora, "set": kind, "prompt_id": p["id"], "prompt": p["prompt"], "variant": v.label,
             "reference": p.get("reference", "")} for v in variants for p in prompts]
    spec = EvalSpec(harmful_prompts="-", max_new_tokens=max_new_tokens, batch_size=batch_size, replicas=2)
    return generate(spec, model, S3Settings(), todo, [])


def _cached(cache: Path | None, variant: Variant, kind: str) -> Path:
    assert cache is not None
    return cache / kind / (variant.label.replace(":", "--") + ".json")


def cached_seconds(cache: Path) -> float:
    """The generation time of every cached answer set, over every run that made them."""
    return sum(json.loads(p.read_text())["seconds"] for p in cache.glob("*/*.json"))


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
