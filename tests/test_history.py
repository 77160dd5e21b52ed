"""Why each adapter is redone, what a run would do (`fleet --dry-run`), and the fleet's state and history."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config


def _summary(fleet: Path, run_id: str) -> dict:
    return json.loads((fleet / "merged" / "runs" / run_id / "summary.json").read_text())


def _set_merge(fleet: Path, **fields) -> None:
    path = fleet / "fleet.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("overrides", {}).update(fields)
    path.write_text(yaml.safe_dump(raw))


def test_each_redone_adapter_says_why_and_a_dry_run_says_it_first(local_fleet, ray_local, capsys):
    config_path = local_fleet / "fleet.yaml"
    first = run_fleet(load_config(config_path), progress=False)
    assert {n: a["why"] for n, a in _summary(local_fleet, first.run_id)["adapters"].items()} == {
        n: ["new"] for n in ("gsm8k", "legal", "medqa", "support")}

    (local_fleet / "finetuned" / "gsm8k" / "adapter_model.safetensors").touch()
    _set_merge(local_fleet, legal={"tau": 0.5})
    capsys.readouterr()
    assert main(["fleet", "--config", str(config_path), "--dry-run"]) == ExitStatus.OK
    printed = capsys.readouterr().out
    assert "gsm8k                redone     adapter changed" in printed
    assert "legal                redone     settings changed (tau 0.35 -> 0.5)" in printed
    assert f"medqa                unchanged  run {first.run_id}" in printed
    assert "dry run: 2 to redo, 2 unchanged, 0 invalid; nothing was started or written" in printed
    assert len(list((local_fleet / "merged" / "runs").iterdir())) == 1  # nothing written
    assert json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())["run_id"] == first.run_id

    second = run_fleet(load_config(config_path), progress=False)
    adapters = _summary(local_fleet, second.run_id)["adapters"]
    assert adapters["gsm8k"]["why"] == ["adapter changed"]
    assert adapters["legal"]["why"] == ["settings changed (tau 0.35 -> 0.5)"]
    assert "why" not in adapters["medqa"] and adapters["medqa"]["status"] == "unchanged"
    manifest = json.loads((local_fleet / "merged" / "runs" / second.run_id / "manifest.json").read_text())
    assert manifest["adapters"]["gsm8k"]["why"] == ["adapter changed"]

    # A changed safety adapter redoes every adapter, and says so.
    (local_fleet / "safety" / "adapter_model.safetensors").touch()
    third = run_fleet(load_config(config_path), progress=False)
    assert all(a["why"] == ["safety adapter changed"] for a in _summary(local_fleet, third.run_id)["adapters"].values())


def _change_layer(adapter: Path, module: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = f"base_model.model.{module}.lora_B.weight"
    tensors[key] = torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(7)) * 0.05
    save_file(tensors, path, metadata={"format": "pt"})


def test_status_runs_and_diff_name_what_changed_and_why(local_fleet, ray_local, capsys, tmp_path):
    import pyarrow.parquet as pq

    config_path, out = local_fleet / "fleet.yaml", str(local_fleet / "merged")
    first = run_fleet(load_config(config_path), progress=False).run_id
    module = "model.layers.0.self_attn.q_proj"
    _change_layer(local_fleet / "finetuned" / "gsm8k", module)
    second = run_fleet(load_config(config_path), progress=False)
    assert second.by_status("committed") == ["gsm8k"]
    capsys.readouterr()

    for argv in (["diff", out, first, second.run_id], ["diff", out, "--adapter", "gsm8k"]):
        assert main(argv) == ExitStatus.OK
        printed = capsys.readouterr().out
        lines = printed.splitlines()
        assert lines[0].startswith(f"gsm8k: {first} -> {second.run_id}: 1 layer(s) changed")
        assert lines[0].endswith("why: adapter changed")
        assert len(lines) == 2 and lines[1].split()[0] == module, printed  # exactly that layer
        assert not any(name in printed for name in ("legal", "medqa", "support"))

    assert main(["status", out]) == ExitStatus.OK
    table = capsys.readouterr().out
    assert f"gsm8k                published   {second.run_id}" in table
    assert f"medqa                published   {first}" in table and "4 published" in table

    # Against the config: medqa left the fleet (orphaned), legal's inputs changed (stale, and why).
    (local_fleet / "finetuned" / "medqa").rename(tmp_path / "medqa")
    (local_fleet / "finetuned" / "legal" / "adapter_model.safetensors").touch()
    assert main(["status", out, "--config", str(config_path), "--format", "json"]) == ExitStatus.OK
    states = {a["adapter"]: a for a in json.loads(capsys.readouterr().out)["adapters"]}
    assert states["medqa"]["state"] == "orphaned" and states["legal"]["state"] == "stale"
    assert states["legal"]["detail"] == "adapter changed"
    assert states["gsm8k"]["state"] == "published" and states["gsm8k"]["run_id"] == second.run_id
    assert states["gsm8k"]["modules"] == 14 and states["gsm8k"]["lowest_rho"] is not None
    for st in states.values():  # the repair's effect: mean rho of the repaired layers, before and after
        assert (st["repaired_rho"] is None) == (st["repaired"] == 0)
        if st["repaired_rho"]:
            before, after = st["repaired_rho"]
            assert before < 0.35 and 0 <= after <= 1 and before != after

    table_path = tmp_path / "decisions.parquet"
    assert main(["status", out, "--format", "parquet", "--out", str(table_path)]) == ExitStatus.OK
    assert f"{4 * 14} decision rows of 4 adapters written" in capsys.readouterr().out
    rows = pq.read_table(table_path).to_pylist()
    assert len(rows) == 4 * 14 and {r["run_id"] for r in rows if r["adapter"] == "gsm8k"} == {second.run_id}

    assert main(["runs", out, "--format", "json"]) == ExitStatus.OK
    runs = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["exit_status"], r["counts"]["committed"]) for r in runs] == [
        (first, 0, 4), (second.run_id, 0, 1)]
    assert set(runs[0]["inputs"]) == {"unaligned_model", "aligned_model", "safety_adapter"}
    assert main(["diff", out]) == 2 and "give two runs" in capsys.readouterr().err


def test_json_logs_one_line_per_adapter_with_the_run_id(local_fleet, capfd):
    from safemerge_ray.progress import configure

    try:
        code = main(["fleet", "--config", str(local_fleet / "fleet.yaml"), "--quiet", "--log-format", "json",
                     "--address", "local"])
    finally:
        configure("text")  # the log format is process-wide, as a CLI process has it
    assert code == ExitStatus.OK
    captured = capfd.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert len(lines) == len(captured.out.splitlines()), captured.out  # nothing but JSON on stdout
    adapters = [x for x in lines if x["event"] == "adapter"]
    run_id = adapters[0]["run_id"]
    assert [(x["adapter"], x["status"], x["why"]) for x in adapters] == [
        (n, "committed", ["new"]) for n in ("gsm8k", "legal", "medqa", "support")]
    assert all(x["run_id"] == run_id and x["modules"] == 14 for x in adapters)
    assert lines[-1]["event"] == "run" and lines[-1]["exit_status"] == 0
    assert "INFO" not in captured.err and "Started a local Ray instance" not in captured.err  # --quiet: Ray too


def test_eta_ignores_start_up():
    import io

    from safemerge_ray.progress import Progress, configure

    configure("text")
    bar = Progress("score", 10, every_s=0.0, stream=io.StringIO())
    bar.start -= 100.0  # 100 s of start-up before the first module finished
    bar.advance()
    assert "ETA ?" in bar.stream.getvalue().splitlines()[-1]
    bar.first = (bar.first[0] - 1.0, 1)  # the second module took 1 s
    bar.advance()
    eta = float(bar.stream.getvalue().splitlines()[-1].rsplit("ETA ", 1)[1].rstrip("s"))
    assert 7.9 <= eta <= 8.5  # 8 modules left at 1 s each, not 8 x 50 s


def test_runs_shows_adapters_held_back_by_the_gate():
    """`runs` hid held adapters from its table (issue 18.8)."""
    from safemerge_ray.store import format_runs
    from safemerge_ray.store.history import RunEntry

    entry = RunEntry("2026-12-01T03:00:00Z", "fleet", "20261201T030000Z-abcdef", 3,
                     {"committed": 2, "unchanged": 0, "held": 2, "failed": 0}, None)
    header, row = format_runs([entry]).splitlines()
    assert header.split()[4:9] == ["committed", "unchanged", "held", "failed", "inputs"]
    assert row.split()[4:8] == ["2", "0", "2", "0"]
