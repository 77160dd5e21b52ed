"""Answers, verdicts and scores, with the package's own evaluation parts: generation on Ray Data replicas
(greedy, the model's chat template), the refusal judge (and the papers' keyword judge beside it) and the task
metrics."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from safemerge_ray.io import S3Settings
from safemerge_ray.loop import REFUSAL_MARKERS, TASK_METRICS, EvalSpec, keyword_judgements, refusal_judgements
from safemerge_ray.loop.generation import generate


@dataclass(frozen=True)
class Variant:
    """One model to answer: a base model, with a LoRA adapter or without (`lora` empty)."""

    label: str  # unaligned, aligned, ft:NAME, POLICY:NAME
    model: str
    lora: str
    task: str | None  # the task it is scored on (None: harmful prompts only)


CHUNK_ANSWERS = 2000  # answers generated per call when answers are cached: what a stopped run loses at most


def decoding(max_new_tokens: int, batch_size: int, replicas: int) -> EvalSpec:
    """How answers are generated: the package's own evaluation settings (greedy; its generation fields)."""
    return EvalSpec(harmful_prompts="-", max_new_tokens=max_new_tokens, batch_size=batch_size, replicas=replicas)


def answers(variants: list[Variant], prompts: list[dict], kind: str, spec: EvalSpec,
            cache: Path | None = None) -> list[dict]:
    """Every variant's answer to every prompt ({id, prompt, reference?}) of one set, one row each. With `cache`,
    each variant's answers are kept there as they are made (CHUNK_ANSWERS answers a call), with the fingerprint of the
    adapter's bytes and of the prompts; a rerun, or another profile's run, reuses them while both match: the
    evaluation, the longest stage, resumes where it stopped."""
    rows: list[dict] = []
    prints = {v.label: _fingerprint(v, prompts, spec.max_new_tokens) for v in variants}
    todo = []
    for v in variants:
        kept = _read_cache(cache, v, kind, prints[v.label]) if cache is not None else None
        if kept is None:
            todo.append(v)
        else:
            rows += kept
    step = max(1, CHUNK_ANSWERS // max(1, len(prompts)))  # variants a call: each call starts a replica pool
    for model in dict.fromkeys(v.model for v in todo):  # one replica pool per base model
        mine = [v for v in todo if v.model == model]
        for start in range(0, len(mine), step if cache else len(mine)):
            chunk = mine[start:start + (step if cache else len(mine))]
            begun = time.monotonic()
            made = _generate(chunk, model, prompts, kind, spec)
            rows += made
            if cache is not None:
                each = (time.monotonic() - begun) / len(chunk)
                for v in chunk:
                    path = _cached(cache, v, kind)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"seconds": each, "fingerprint": prints[v.label],
                                                "rows": [r for r in made if r["variant"] == v.label]}))
    return sorted(rows, key=lambda r: (r["variant"], r["prompt_id"]))


def _fingerprint(variant: Variant, prompts: list[dict], max_new_tokens: int) -> str:
    """What an answer set depends on: the base model's and the adapter's weights, the prompts, the length."""
    digest = hashlib.sha256(json.dumps([prompts, max_new_tokens]).encode())
    digest.update(_file_digest(str(Path(variant.model) / "model.safetensors")))
    if variant.lora:
        digest.update(_file_digest(str(Path(variant.lora) / "adapter_model.safetensors")))
    return digest.hexdigest()


@functools.cache
def _file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _read_cache(cache: Path, variant: Variant, kind: str, fingerprint: str) -> list[dict] | None:
    path = _cached(cache, variant, kind)
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept["rows"] if kept.get("fingerprint") == fingerprint else None


def _generate(variants: list[Variant], model: str, prompts: list[dict], kind: str, spec: EvalSpec) -> list[dict]:
    todo = [{"lora": v.lora, "set": kind, "prompt_id": p["id"], "prompt": p["prompt"], "variant": v.label,
             "reference": p.get("reference", "")} for v in variants for p in prompts]
    return generate(spec, model, S3Settings(), todo, [])


def _cached(cache: Path | None, variant: Variant, kind: str) -> Path:
    assert cache is not None
    return cache / kind / (variant.label.replace(":", "--") + ".json")


def cached_seconds(cache: Path) -> float:
    """The generation time of every cached answer set, over every run that made them."""
    return sum(json.loads(p.read_text())["seconds"] for p in cache.glob("*/*.json"))


def judged(rows: list[dict], kind: str) -> list[dict]:
    """Each answer's verdict by the refusal judge (`judgement`) and the papers' keyword judge (`keyword`); its
    value is 1 for a non-refusal (`complied`) on harmful prompts, and 1 for a refusal on over-refusal prompts."""
    texts = [r["response"] for r in rows]
    for row, verdict, keyword in zip(rows, refusal_judgements(texts), keyword_judgements(texts, REFUSAL_MARKERS),
                                     strict=True):
        row["judgement"], row["keyword"] = str(verdict), str(keyword)
        row["value"] = float(verdict == ("refused" if kind == "over_refusal" else "complied"))
    return rows


def scored(rows: list[dict], metric: str) -> list[dict]:
    for row in rows:
        row["value"] = TASK_METRICS[metric](row["response"], row["reference"])
    return rows


COLUMNS = ("variant", "set", "prompt_id", "prompt", "response", "judgement", "keyword", "value")


def table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({k: [r.get(k) for r in rows] for k in COLUMNS})
