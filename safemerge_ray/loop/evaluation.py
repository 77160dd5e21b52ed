"""`eval`: are repaired adapters safer, and did the task hold?

For each adapter, the aligned model alone, the fine-tune and the repaired adapter answer a harmful-prompt
set and a task set (greedy decoding, the model's chat template). Generation fans out with Ray Data over
model replicas: each replica loads the aligned model once and switches LoRA adapters in place
(transformers' batched `generate`; with vLLM installed and a GPU, one vLLM engine serves every adapter).
Harmful answers are judged (a keyword refusal judge built in, or a classifier model by path); task answers
are scored against references. Out: `eval.parquet`, one row per answer, and `summary.json`, the harmful
rate and task score per adapter and variant with bootstrap confidence intervals.
"""

from __future__ import annotations

import pyarrow as pa

from ..cluster import init_ray
from ..errors import SafeMergeError
from ..io import S3Settings, local_or_s3, open_dir, read_json, resolve_location
from ..store import commit_files, published_names, read_pointer
from .generation import generate
from .judges import TASK_METRICS, judge
from .prompts import read_prompt_sets
from .spec import EVAL_SUMMARY, VARIANTS, EvalResult, EvalSettings, EvalSpec, Pair, PromptSet
from .summary import summarise


def evaluate(spec: EvalSpec, aligned: str, pairs: list[Pair], s3: S3Settings) -> EvalResult:
    """Generate, judge, score and summarise; Ray must be initialised."""
    harmful, task = read_prompt_sets(spec, s3)
    variants = [(None, "aligned", "")] + [(p.name, v, uri) for p in pairs
                                          for v, uri in (("finetune", p.finetuned), ("repaired", p.repaired))]
    rows = [{"adapter": name or "", "variant": variant, "lora": lora, "set": str(kind), "prompt_id": pr.id,
             "prompt": pr.text, "reference": pr.reference or ""}
            for name, variant, lora in variants
            for kind, prompts in ((PromptSet.HARMFUL, harmful), (PromptSet.TASK, task)) for pr in prompts]
    answered = generate(spec, aligned, s3, rows, pairs)
    answered.sort(key=lambda r: (r["adapter"], VARIANTS.index(r["variant"]), r["set"], r["prompt_id"]))
    harmful_rows = [r for r in answered if r["set"] == PromptSet.HARMFUL]
    for r, verdict in zip(harmful_rows, judge(spec, s3, harmful_rows), strict=True):
        r["judgement"], r["score"] = verdict, None
    metric = TASK_METRICS[spec.task_metric]
    for r in answered:
        if r["set"] == PromptSet.TASK:
            r["judgement"], r["score"] = None, metric(r["response"], r["reference"])
    table = pa.table({
        "adapter": pa.array([r["adapter"] or None for r in answered], pa.string()),
        "variant": pa.array([r["variant"] for r in answered], pa.string()),
        "set": pa.array([r["set"] for r in answered], pa.string()),
        "prompt_id": pa.array([r["prompt_id"] for r in answered], pa.string()),
        "prompt": pa.array([r["prompt"] for r in answered], pa.string()),
        "response": pa.array([r["response"] for r in answered], pa.string()),
        "judgement": pa.array([r["judgement"] for r in answered], pa.string()),
        "score": pa.array([r["score"] for r in answered], pa.float64()),
    })
    return EvalResult(table, summarise(answered, spec, aligned, pairs))


def published_pairs(fleet_output: str, s3: S3Settings, only: list[str] | None = None) -> tuple[list[Pair], str]:
    """Every published adapter of a fleet output (or `only` these), with the fine-tune it was made from;
    and the aligned model its runs used."""
    out = open_dir(local_or_s3(fleet_output), what="fleet_output", s3=s3)
    names = published_names(out)
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise SafeMergeError(f"eval: {out.uri} publishes no adapter named {', '.join(missing)}")
        names = [n for n in names if n in only]
    pairs, aligned = [], ""
    for name in names:
        pointer = read_pointer(out, name)
        manifest = read_json(out, str(pointer.get("manifest", ""))) if pointer else None
        entry = (manifest or {}).get("adapters", {}).get(name)
        if not pointer or not entry:
            raise SafeMergeError(f"eval: {out.uri}: {name}'s pointer or manifest is unreadable; run verify")
        aligned = aligned or (manifest or {})["inputs"]["aligned_model"]["uri"]
        pairs.append(Pair(name, entry["uri"], f"{out.uri.rstrip('/')}/{str(pointer['path']).rstrip('/')}"))
    if not pairs:
        raise SafeMergeError(f"eval: {out.uri} publishes no adapters")
    return pairs, aligned


def run_eval(settings: EvalSettings, progress: bool = True, ray_address: str | None = None) -> EvalResult:
    s3 = settings.s3.settings()
    pairs = [Pair(p.name, resolve_location(p.finetuned), resolve_location(p.repaired)) for p in settings.adapters]
    aligned = settings.aligned_model
    if settings.fleet_output:
        published, used = published_pairs(settings.fleet_output, s3, settings.only)
        pairs += published
        aligned = aligned or used
    if not aligned:
        raise SafeMergeError("eval: give aligned_model (or a fleet_output, whose runs name it)")
    if not pairs:
        raise SafeMergeError("eval: nothing to evaluate: give fleet_output or adapters")
    out = open_dir(local_or_s3(settings.output), what="output", s3=s3, must_exist=False)
    if (out.list() or out.subdirs()) and not out.exists(EVAL_SUMMARY):  # the output is replaced as a whole
        raise SafeMergeError(f"eval: output {out.uri} is not empty and is not an eval output; refusing to replace it")
    read_prompt_sets(settings, s3)  # every input checked before anything starts
    init_ray(ray_address, quiet=not progress)
    result = evaluate(settings, resolve_location(aligned), pairs, s3)
    commit_files(out, result.files(), last=EVAL_SUMMARY)
    return result
