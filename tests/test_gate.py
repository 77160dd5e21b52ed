"""The fleet's gate: it holds back exactly the repaired adapter whose evaluation fails (its pointer stays on
the last adapter that passed), says why with the numbers in the summary, the manifest, the run record and
`status`, and publishes nothing unchecked when the evaluation itself fails."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.errors import SafeMergeError
from safemerge_ray.fleet.config import parse_config
from safemerge_ray.loop import GateSection, verdict


def _entry(ft_harm, rep_harm, ft_task, rep_task):
    def stats(x):
        return {"n": 10, "mean": x, "ci95": [max(0.0, x - 0.1), min(1.0, x + 0.1)]}

    return {"finetune": {"harmful_rate": stats(ft_harm), "task_score": stats(ft_task)},
            "repaired_adapter": {"harmful_rate": stats(rep_harm), "task_score": stats(rep_task)},
            "task_drop": ft_task - rep_task}


def test_verdicts_on_fixed_numbers():
    gate = GateSection.model_validate({"eval": {"harmful_prompts": "h.txt", "task_prompts": "t.jsonl"},
                                       "max_harmful_rate": 0.2, "max_task_drop": 0.05})
    assert verdict(_entry(0.6, 0.1, 0.8, 0.78), gate) is None
    why = verdict(_entry(0.6, 0.3, 0.8, 0.78), gate)
    assert why == ("gate: harmful rate 0.300 (95% CI 0.200-0.400, fine-tune 0.600) > max_harmful_rate 0.2")
    why = verdict(_entry(0.6, 0.1, 0.8, 0.7), gate)
    assert why is not None and "task score 0.800 -> 0.700 (drop 0.100) > max_task_drop 0.05" in why
    both = verdict(_entry(0.6, 0.5, 0.8, 0.1), gate)
    assert both is not None and "harmful rate" in both and "task score" in both


@pytest.mark.parametrize("gate, message", [
    ({"eval": {"harmful_prompts": "h.txt"}}, "gate: give max_harmful_rate, max_task_drop or both"),
    ({"eval": {"harmful_prompts": "h.txt"}, "max_task_drop": 0.1}, "gate: max_task_drop needs eval.task_prompts"),
    ({"eval": {"harmful_prompts": "h.txt"}, "max_harmful_rate": 1.5}, "gate.max_harmful_rate: Input should be"),
    ({"eval": {"harmful_prompts": "h.txt", "tau": 1}, "max_harmful_rate": 0.1}, "gate.eval.tau: Extra inputs"),
    ({"eval": {}, "max_harmful_rate": 0.1}, "gate.eval.harmful_prompts: Field required"),
])
def test_bad_gate_sections_are_named(gate, message):
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "finetuned": ["f"], "output": "o",
           "gate": gate}
    with pytest.raises(SafeMergeError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_gate_files_are_relative_to_the_config(tmp_path):
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "finetuned": ["f"], "output": "o",
           "gate": {"eval": {"harmful_prompts": "data/h.txt", "task_prompts": "s3://b/t.jsonl", "judge": "judge"},
                    "max_harmful_rate": 0.1}}
    gate = parse_config(raw, base=tmp_path).gate
    assert gate is not None
    assert gate.eval.harmful_prompts == str(tmp_path / "data/h.txt")
    assert gate.eval.task_prompts == "s3://b/t.jsonl" and gate.eval.judge == str(tmp_path / "judge")


# --------------------------------------------------------------------------- the gate in a fleet run


@pytest.fixture
def loop(fixtures_root, tmp_path, ray_local):
    from conftest import _fixture
    from safemerge_ray.synthetic import SynthSpec, write_loop_data

    src = _fixture(fixtures_root, "loop", SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=9), n_finetunes=3)
    root = tmp_path / "loop"
    shutil.copytree(src, root)
    write_loop_data(root)
    return root


def _config(root, gate: dict, seed: int = 0):
    config = {"unaligned_model": "unaligned", "aligned_model": "aligned", "safety_adapter": "safety",
              "finetuned": [{"prefix": "finetuned"}], "output": "merged", "merge": {"seed": seed}, "gate": gate}
    path = root / f"gated-{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _gate(max_harmful_rate: float, markers: list[str] | None = None) -> dict:
    spec: dict = {"harmful_prompts": "data/harmful.txt", "max_new_tokens": 12}
    if markers:
        spec.update(judge="keywords", refusal_markers=markers)
    return {"eval": spec, "max_harmful_rate": max_harmful_rate}


def _separating_marker(rows: list[dict]) -> tuple[str, float, str]:
    """A refusal marker under which exactly one adapter's repaired answers are the most harmful, by at
    least two answers; the threshold half-way; and that adapter."""
    answers: dict[str, list[str]] = {}
    for r in rows:
        if r["variant"] == "repaired" and r["set"] == "harmful":
            answers.setdefault(r["adapter"], []).append(r["response"].lower())
    candidates = sorted({t[i:i + n] for texts in answers.values() for t in texts for n in (1, 2)
                         for i in range(len(t) - n + 1)} - {" "})
    for marker in candidates:
        rates = {a: sum(marker not in t for t in texts) / len(texts) for a, texts in answers.items()}
        (worst, top), (_, second) = sorted(rates.items(), key=lambda kv: -kv[1])[:2]
        if top - second >= 2 / 8 and top > 0:
            return marker, (top + second) / 2, worst
    raise AssertionError(f"no marker separates the adapters' answers: {answers}")


def test_the_gate_holds_back_exactly_the_adapter_that_fails(loop, monkeypatch, capsys):
    monkeypatch.chdir(loop)
    # Run 1: a gate everything passes; every adapter is published, and the run keeps its evaluation.
    assert main(["fleet", "--config", _config(loop, _gate(1.0)), "--quiet"]) == 0
    run1 = json.loads((loop / "merged/status/last_run.json").read_text())["run_id"]
    rows = pq.read_table(loop / "merged/runs" / run1 / "eval.parquet").to_pylist()
    marker, threshold, worst = _separating_marker(rows)
    capsys.readouterr()

    # Run 2: new settings (a seed linear merges ignore: the same bytes, so the same answers), and a gate
    # whose judge and threshold that adapter's repaired answers fail.
    code = main(["fleet", "--config", _config(loop, _gate(threshold, [marker]), seed=1), "--quiet",
                 "--log-format", "text"])
    printed = capsys.readouterr().out
    assert code == 3  # some adapters were not published
    record = json.loads((loop / "merged/status/last_run.json").read_text())
    run2 = record["run_id"]
    assert list(record["held"]) == [worst] and record["counts"]["held"] == 1 and record["counts"]["committed"] == 2
    assert f"> max_harmful_rate {threshold}" in record["held"][worst]
    assert f"{worst:<20} held" in printed and "harmful rate" in printed
    for name in ("gsm8k", "legal", "medqa"):
        pointer = json.loads((loop / "merged/latest" / f"{name}.json").read_text())
        assert pointer["run_id"] == (run1 if name == worst else run2), name
    manifest = json.loads((loop / "merged/runs" / run2 / "manifest.json").read_text())
    assert worst not in manifest["adapters"] and set(manifest["held"]) == {worst}
    assert f"runs/{run2}/eval.parquet" in manifest["objects"]
    summary = json.loads((loop / "merged/runs" / run2 / "summary.json").read_text())
    numbers = summary["adapters"][worst]["gate"]
    assert summary["adapters"][worst]["status"] == "held" and not numbers["passed"]
    assert numbers["harmful_rate"] > threshold
    assert all(summary["adapters"][n]["gate"]["passed"] for n in ("gsm8k", "legal", "medqa") if n != worst)
    # `status` says which adapter is held back, why, and which run it still serves.
    assert main(["status", "merged"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith(worst))
    assert " held " in line and f"run {run2} held it back: gate: harmful rate" in line and f"still on run {run1}" \
        in line
    assert main(["verify", "merged"]) == 0
    # The report page lists it under "Held back by the gate", with the reason.
    assert main(["report", "merged", "--out", "report.html"]) == 0
    page = (loop / "report.html").read_text()
    assert '<table id="held">' in page and f"<td>{worst}</td><td>run {run2} held it back: gate: harmful" in page


def test_a_failed_evaluation_publishes_nothing(loop, monkeypatch, capsys):
    monkeypatch.chdir(loop)
    gate = _gate(1.0)
    gate["eval"]["judge"] = "data"  # a directory, but no classifier: the judge fails on the workers
    code = main(["fleet", "--config", _config(loop, gate), "--quiet"])
    assert code == 4
    record = json.loads((loop / "merged/status/last_run.json").read_text())
    assert set(record["held"]) == {"gsm8k", "legal", "medqa"}
    assert all(r.startswith("gate: the evaluation failed: ") for r in record["held"].values())
    assert not list((loop / "merged").glob("latest/*.json"))  # no pointer moved


def test_missing_gate_prompts_stop_the_run_before_any_work(loop, monkeypatch, capsys):
    monkeypatch.chdir(loop)
    gate = _gate(0.5)
    gate["eval"]["harmful_prompts"] = "data/missing.txt"
    assert main(["fleet", "--config", _config(loop, gate), "--quiet"]) == 2
    assert "harmful_prompts: no such file" in capsys.readouterr().err
    assert not (loop / "merged/runs").exists()


def test_past_the_deadline_no_evaluation_starts_and_every_written_adapter_is_held(tmp_path):
    import time

    from safemerge_ray.core import MergeSettings
    from safemerge_ray.fleet import AdapterState
    from safemerge_ray.fleet.config import AdapterRef
    from safemerge_ray.fleet.jobs import Deadline
    from safemerge_ray.fleet.run import _gate
    from safemerge_ray.io import LocalDir

    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "finetuned": ["f"], "output": "o",
           "gate": {"eval": {"harmful_prompts": "h.txt"}, "max_harmful_rate": 0.1}}
    states = [AdapterState(AdapterRef(n, f"/x/{n}"), MergeSettings(), status=s)
              for n, s in (("a", "assembled"), ("b", "failed"), ("c", "assembled"))]
    deadline = Deadline(0.001)
    time.sleep(0.01)
    assert _gate(parse_config(raw, base=tmp_path), LocalDir(tmp_path), "r1", states, deadline) is None
    assert [st.status for st in states] == ["held", "failed", "held"]
    assert states[0].reason == "gate: not evaluated: the run's deadline (max_run_seconds) passed"


def test_an_evaluation_running_at_the_deadline_is_not_waited_for(tmp_path, monkeypatch):
    """The gate's evaluation is bounded by max_run_seconds: one still running then holds every adapter, and
    the run goes on to commit nothing and end (issue 19.9)."""
    import threading
    import time

    import safemerge_ray.fleet.run as run
    from safemerge_ray.core import MergeSettings
    from safemerge_ray.fleet import AdapterState
    from safemerge_ray.fleet.config import AdapterRef
    from safemerge_ray.fleet.jobs import Deadline
    from safemerge_ray.io import LocalDir

    finish = threading.Event()
    monkeypatch.setattr(run, "run_gate", lambda *args: finish.wait(60))  # an evaluation that outlasts the run
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "finetuned": ["f"], "output": "o",
           "gate": {"eval": {"harmful_prompts": "h.txt"}, "max_harmful_rate": 0.1}}
    states = [AdapterState(AdapterRef(n, f"/x/{n}"), MergeSettings(), status="assembled") for n in ("a", "b")]
    started = time.monotonic()
    try:
        assert run._gate(parse_config(raw, base=tmp_path), LocalDir(tmp_path), "r1", states, Deadline(1.0)) is None
        assert time.monotonic() - started < 30
    finally:
        finish.set()
    assert [st.status for st in states] == ["held", "held"]
    assert states[0].reason == "gate: not evaluated within the run's max_run_seconds"


def test_an_evaluation_that_cannot_run_holds_every_adapter_and_says_why(tmp_path, monkeypatch):
    """Not a timeout: the evaluation's own environment failure (here, a store that refused it) holds every adapter
    with that cause, not a word about max_run_seconds."""
    import safemerge_ray.fleet.run as run
    from safemerge_ray.core import MergeSettings
    from safemerge_ray.errors import EnvironmentFailure
    from safemerge_ray.fleet import AdapterState
    from safemerge_ray.fleet.config import AdapterRef
    from safemerge_ray.fleet.jobs import Deadline
    from safemerge_ray.io import LocalDir

    def refused(*args):
        raise EnvironmentFailure("s3://prompts/h.txt: the store refused the read (AccessDenied)\nand a second line")

    monkeypatch.setattr(run, "run_gate", refused)
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "finetuned": ["f"], "output": "o",
           "gate": {"eval": {"harmful_prompts": "h.txt"}, "max_harmful_rate": 0.1}}
    states = [AdapterState(AdapterRef(n, f"/x/{n}"), MergeSettings(), status="assembled") for n in ("a", "b")]
    assert run._gate(parse_config(raw, base=tmp_path), LocalDir(tmp_path), "r1", states, Deadline(60.0)) is None
    assert [st.status for st in states] == ["held", "held"]
    assert states[1].reason == ("gate: the evaluation failed: "
                                "s3://prompts/h.txt: the store refused the read (AccessDenied)")
