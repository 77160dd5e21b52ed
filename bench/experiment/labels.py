"""Hand labels for the judge: blind samples to label, and the judge's agreement with the labels.

A sample is drawn from one split's answers to harmful prompts, stratified across variants (round robin over
variants, each variant's answers in a seeded order), and written without the variant: `id`, `prompt`,
`response`. The key (id -> variant) stays in the run's directory. Labels are committed beside this file,
one JSON line each: {id, label, prompt, response}, label in refused | complied | other (RUBRIC.md); the
response is kept so a label is never matched to an answer that has since changed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq

from safemerge_ray.loop import refusal_judgements

from .stats import agreement, rate

LABELS = Path(__file__).with_name("labels")
VERDICTS = ("refused", "complied", "other")


def as_label(keyword_verdict: str) -> str:
    """The keyword judge's verdict in the rubric's terms: harmful is complied, empty is other."""
    return {"harmful": "complied", "empty": "other"}.get(keyword_verdict, keyword_verdict)


def answer_id(row: dict) -> str:
    return hashlib.sha256(f"{row['variant']}|{row['set']}|{row['prompt_id']}".encode()).hexdigest()[:12]


def blind_sample(answers: Path, n: int, seed: int, out: Path) -> int:
    """Write `out` (id, prompt, response: what a labeller sees) and `out`.key.json (id -> variant)."""
    rows = [r for r in pq.read_table(answers).to_pylist() if r["set"] == "harmful"]
    by_variant: dict[str, list[dict]] = {}
    for r in sorted(rows, key=answer_id):
        by_variant.setdefault(r["variant"], []).append(r)
    rng = random.Random(seed)
    for mine in by_variant.values():
        rng.shuffle(mine)
    picked: list[dict] = []
    while len(picked) < n and any(by_variant.values()):
        for mine in by_variant.values():
            if mine and len(picked) < n:
                picked.append(mine.pop())
    rng.shuffle(picked)  # the labeller sees no variant order either
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": answer_id(r), "prompt": r["prompt"], "response": r["response"]}) + "\n"
                           for r in picked))
    out.with_suffix(".key.json").write_text(json.dumps({answer_id(r): r["variant"] for r in picked}, indent=1))
    return len(picked)


def read_labels(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [r["id"] for r in rows if r.get("label") not in VERDICTS]
    if bad:
        raise ValueError(f"{path}: labels not in {VERDICTS}: {bad[:5]}")
    return rows


def check(labels: Path, answers: Path) -> dict | None:
    """The refusal judge against the hand labels of one split: agreement over all, and per variant the
    judge's non-refusal rate minus the hand-labelled one (its bias), with the hand rate's interval. None when
    no label matches an answer of this run (labels drawn from another profile's answers)."""
    rows = {answer_id(r): r for r in pq.read_table(answers).to_pylist() if r["set"] == "harmful"}
    labelled = read_labels(labels)
    matched = [(rows[x["id"]], x["label"]) for x in labelled
               if x["id"] in rows and rows[x["id"]]["response"] == x["response"]]
    stale = len(labelled) - len(matched)
    if not matched:
        return None
    judge = [str(j) for j in refusal_judgements([r["response"] for r, _ in matched])]
    hand = [label for _, label in matched]
    keyword = [as_label(r["keyword"]) for r, _ in matched]
    per: dict[str, dict] = {}
    for (row, label), verdict in zip(matched, judge, strict=True):
        per.setdefault(row["variant"], {"judge": [], "hand": [], "keyword": []})
        per[row["variant"]]["judge"].append(float(verdict == "complied"))
        per[row["variant"]]["hand"].append(float(label == "complied"))
        per[row["variant"]]["keyword"].append(float(as_label(row["keyword"]) == "complied"))
    bias = {v: {"n": len(x["hand"]), "hand": rate(x["hand"]), "judge": sum(x["judge"]) / len(x["judge"]),
                "keyword": sum(x["keyword"]) / len(x["keyword"]),
                "bias": (sum(x["judge"]) - sum(x["hand"])) / len(x["hand"]),
                "keyword_bias": (sum(x["keyword"]) - sum(x["hand"])) / len(x["hand"])} for v, x in per.items()}
    return {"labels": str(labels), "matched": len(matched), "stale": stale, "judge": agreement(judge, hand),
            "keyword": agreement(keyword, hand), "per_variant": bias,
            "hand_counts": {v: hand.count(v) for v in VERDICTS}}
