"""Why each adapter is redone, what a run would do (`fleet --dry-run`), and the fleet's state and history."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from safemerge_ray.cli import main
from safemerge_ray.config import load_config
from safemerge_ray.fleet import EXIT_OK, run_fleet


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
    assert main(["fleet", "--config", str(config_path), "--dry-run"]) == EXIT_OK
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
