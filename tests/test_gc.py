"""`safemerge-ray gc`: what no pointer needs goes; what a pointer or a rollback may need stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.io import LocalDir
from safemerge_ray.store import RunLock


def _runs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir())


def _change(fleet: Path, name: str) -> None:
    (fleet / "finetuned" / name / "adapter_model.safetensors").touch()


def test_gc_removes_only_what_no_pointer_needs(local_fleet, ray_local, capsys):
    config = load_config(local_fleet / "fleet.yaml")
    out = local_fleet / "merged"
    first = run_fleet(config, progress=False).run_id
    _change(local_fleet, "gsm8k")
    second = run_fleet(config, progress=False).run_id
    _change(local_fleet, "gsm8k")
    third = run_fleet(config, progress=False).run_id  # gsm8k now points here; `second` is needed by nobody
    # Debris: a run that never committed, a failed attempt's object in a kept run, an interrupted write.
    dead = out / "runs" / "20200101T000000Z-dead00" / "legal"
    dead.mkdir(parents=True)
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    (out / "runs" / third / "legal").mkdir()
    (out / "runs" / third / "legal" / "adapter_config.json").write_text("{}")
    (out / "latest" / ".tmp-0123456789ab").write_bytes(b"cut short")
    capsys.readouterr()

    assert main(["gc", str(out), "--keep", "1", "--dry-run"]) == ExitStatus.OK
    assert "would remove run " + second + " (committed)" in capsys.readouterr().out
    assert second in _runs(out) and dead.exists()  # a dry run removes nothing

    assert main(["gc", str(out), "--keep", "1", "--older-than", "1d"]) == ExitStatus.OK  # everything is younger
    assert second in _runs(out) and not (out / "latest" / ".tmp-0123456789ab").exists()

    assert main(["gc", str(out), "--keep", "1"]) == ExitStatus.OK
    printed = capsys.readouterr().out
    assert f"removed run {second} (committed)" in printed
    assert "removed run 20200101T000000Z-dead00 (uncommitted)" in printed
    assert "removed 1 leftover object(s)" in printed
    assert _runs(out) == sorted([first, third])  # first: medqa, legal, support point at it
    assert not (out / "runs" / third / "legal").exists()
    assert main(["verify", str(out)]) == ExitStatus.OK
    history = [json.loads(p.read_text()) for p in (out / "status" / "history").glob("*.json")]
    assert any(r["kind"] == "gc" and f"gc: removed run {second} (committed)" in r["warnings"] for r in history)
    assert json.loads((out / "status" / "last_run.json").read_text())["kind"] == "fleet"
    # A gc that finds nothing to remove is recorded too (issue 18.11): the README says every gc is.
    assert main(["gc", str(out), "--keep", "1"]) == ExitStatus.OK
    history = [json.loads(p.read_text()) for p in (out / "status" / "history").glob("*.json")]
    assert sum(r["kind"] == "gc" and r["warnings"] == ["gc: nothing to remove"] for r in history) == 1
    again = run_fleet(config, progress=False)  # nothing it needs is gone
    assert again.exit_code == ExitStatus.OK and again.run_id is None


def test_gc_waits_for_no_run(local_fleet, ray_local, capsys):
    out = local_fleet / "merged"
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).exit_code == ExitStatus.OK
    lock = RunLock(LocalDir(out), lease_s=60).acquire()
    try:
        assert main(["gc", str(out), "--keep", "0"]) == ExitStatus.LOCKED
        assert "is locked by another run" in capsys.readouterr().err
    finally:
        lock.release()
    with pytest.raises(SystemExit) as exc:  # argparse: usage line, exit 2
        main(["gc", str(out), "--keep", "0", "--older-than", "soon"])
    assert exc.value.code == 2
    assert "expected an age like 7d" in capsys.readouterr().err


def test_gc_keeps_the_newest_run_records(tmp_path, capsys):
    """status/history/ is pruned too (issue 19.9): the newest N records stay, older ones go, and `--older-than`
    spares what is younger."""
    from safemerge_ray.io import LocalDir, json_bytes
    from safemerge_ray.store import HISTORY

    out = LocalDir(tmp_path / "merged")
    names = [f"2026{month:02d}01T030000Z-no-run-{month:06x}.json" for month in range(1, 13)]
    for name in names:
        out.write(f"{HISTORY}{name}", json_bytes({"tool": "safemerge-ray", "kind": "fleet"}))
    assert main(["gc", str(out.path), "--keep", "1", "--history-keep", "5"]) == ExitStatus.OK
    assert "removed 7 run record(s) beyond the newest 5" in capsys.readouterr().out
    left = sorted(out.child(HISTORY).list())
    assert [n for n in left if n in names] == names[-5:] and len(left) == 6  # and the gc's own record
    assert main(["gc", str(out.path), "--keep", "1", "--history-keep", "0", "--older-than", "100000d"]) == 0
    assert len(out.child(HISTORY).list()) == 7
