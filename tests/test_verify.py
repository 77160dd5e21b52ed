"""Published bytes are checked: read back before a pointer moves, by version tag every night, and in
full by `safemerge-ray verify`."""

from __future__ import annotations

import json

import pytest

from safemerge_ray.cli import main
from safemerge_ray.errors import EnvironmentFailure, ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.io import LocalDir
from safemerge_ray.store import write_verified


def _weights(fleet, name: str):
    pointer = json.loads((fleet / "merged" / "latest" / f"{name}.json").read_text())
    return fleet / "merged" / pointer["path"] / "adapter_model.safetensors"


def test_damaged_or_deleted_published_adapters_are_found_and_redone(local_fleet, ray_local, capsys):
    config = load_config(local_fleet / "fleet.yaml")
    first = run_fleet(config, progress=False)
    manifest = json.loads((local_fleet / "merged" / "runs" / first.run_id / "manifest.json").read_text())
    assert all("version" in meta for meta in manifest["adapters"]["gsm8k"]["objects"].values())
    assert main(["verify", str(local_fleet / "merged")]) == ExitStatus.OK
    assert capsys.readouterr().out.count("ok ") == 4

    damaged = _weights(local_fleet, "gsm8k")
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern flipped
    damaged.write_bytes(bytes(data))
    _weights(local_fleet, "legal").unlink()
    assert main(["verify", str(local_fleet / "merged")]) == 1
    out = capsys.readouterr().out
    assert "BAD  gsm8k" in out and "sha256 or size differs" in out and "BAD  legal" in out and "missing" in out
    assert "ok   medqa" in out

    again = run_fleet(config, progress=False)
    assert again.exit_code == ExitStatus.OK
    assert again.by_status("committed") == ["gsm8k", "legal"]
    assert again.by_status("unchanged") == ["medqa", "support"]
    assert any("gsm8k: runs/" in w and "changed since it was published; redoing it" in w for w in again.warnings)
    assert any("legal: runs/" in w and "is missing; redoing it" in w for w in again.warnings)
    assert main(["verify", str(local_fleet / "merged")]) == ExitStatus.OK
    assert main(["verify", str(local_fleet / "merged"), "--run", again.run_id]) == ExitStatus.OK


def test_a_write_that_reads_back_differently_is_an_environment_failure(tmp_path):
    class Flaky(LocalDir):  # a store that loses bytes between write and read (a bad disk, a broken proxy)
        def read(self, name):
            return super().read(name)[:-1]

    with pytest.raises(EnvironmentFailure, match="read back different bytes than were written"):
        write_verified(Flaky(tmp_path), "runs/r/a/adapter_model.safetensors", b"weights")
    entry = write_verified(LocalDir(tmp_path), "runs/r/b/adapter_model.safetensors", b"weights")
    assert entry["bytes"] == 7 and entry["version"]


def test_verify_user_errors_are_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "has no published adapters" in capsys.readouterr().err


def test_rollback_moves_a_pointer_back_after_verifying_and_records_it(local_fleet, ray_local, capsys):
    from dataclasses import replace

    config = load_config(local_fleet / "fleet.yaml")
    first = run_fleet(config, progress=False)
    second = run_fleet(replace(config, merge=replace(config.merge, tau=0.5)), progress=False)
    merged = local_fleet / "merged"
    last_run = (merged / "status" / "last_run.json").read_bytes()
    assert json.loads((merged / "latest" / "gsm8k.json").read_text())["run_id"] == second.run_id

    assert main(["rollback", str(merged), "gsm8k", "--to", first.run_id]) == ExitStatus.OK
    pointer = json.loads((merged / "latest" / "gsm8k.json").read_text())
    assert pointer["run_id"] == first.run_id and pointer["path"] == f"runs/{first.run_id}/gsm8k/"
    assert (merged / "status" / "last_run.json").read_bytes() == last_run  # alerting still sees the last night
    history = [json.loads(p.read_text()) for p in sorted((merged / "status" / "history").iterdir())]
    assert [h["kind"] for h in history].count("rollback") == 1
    assert main(["verify", str(merged), "--adapter", "gsm8k"]) == ExitStatus.OK
    # The run config (tau 0.35) is the first run's: a fleet run leaves the rolled-back adapter alone.
    assert "gsm8k" in run_fleet(config, progress=False).by_status("unchanged")

    capsys.readouterr()
    absent = "20200101T000000Z-abcdef"
    assert main(["rollback", str(merged), "gsm8k", "--to", absent]) == 2
    err = capsys.readouterr().err
    assert f"{merged}/runs/{absent}/manifest.json: no readable manifest (run {absent}: it does not exist)" in err
    damaged = merged / "runs" / second.run_id / "medqa" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    assert main(["rollback", str(merged), "medqa", "--to", second.run_id]) == 1
    assert "is damaged" in capsys.readouterr().err
    assert not (merged / "status" / "lock.json").exists()


def test_run_ids_are_checked_wherever_they_enter(local_fleet, ray_local, capsys):
    """A run id becomes a path: `rollback --to ../../../fake` (a copied manifest there) must not move a pointer
    (issue 19.3), nor may `diff`, `report --run` or `verify --run` read outside runs/."""
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).exit_code == ExitStatus.OK
    merged = local_fleet / "merged"
    pointer = (merged / "latest" / "gsm8k.json").read_bytes()
    fake = merged / "runs" / ".." / ".." / "fake"
    fake.mkdir(parents=True)
    run_id = json.loads(pointer)["run_id"]
    (fake / "manifest.json").write_bytes((merged / "runs" / run_id / "manifest.json").read_bytes())
    for argv in (["rollback", str(merged), "gsm8k", "--to", "../../fake"], ["verify", str(merged), "--run", "../x"],
                 ["report", str(merged), "--run", "/etc"], ["diff", str(merged), run_id, "../../fake"],
                 ["rollback", str(merged), "gsm8k", "--to", "no-such-run"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is not a run id (like 20261122T035715Z-3f2a9c" in err and err.count("\n") == 1, err
    assert (merged / "latest" / "gsm8k.json").read_bytes() == pointer
    # A committed run's id passes, and one whose directory holds no manifest is named as such.
    uncommitted = "20200101T000000Z-000000"
    (merged / "runs" / uncommitted).mkdir()
    assert main(["verify", str(merged), "--run", uncommitted]) == 2
    assert f"(run {uncommitted}: it did not commit)" in capsys.readouterr().err


def test_damage_that_keeps_size_and_mtime_is_redone_when_published_bytes_are_verified(local_fleet, ray_local,
                                                                                      capsys):
    """Bit rot (same size, same mtime) passes the nightly version-tag check; `fleet --verify-published` (or
    `verify_published: weekly`, when due) re-hashes what it would leave unchanged and redoes it (issue 19.4)."""
    import os

    config_path = local_fleet / "fleet.yaml"
    first = run_fleet(load_config(config_path), progress=False)
    merged = local_fleet / "merged"
    weights = merged / "runs" / first.run_id / "legal" / "adapter_model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "legal" in run_fleet(load_config(config_path), progress=False).by_status("unchanged")  # not seen
    assert main(["verify", str(merged)]) == 1
    capsys.readouterr()
    assert main(["fleet", "--config", str(config_path), "--quiet", "--verify-published", "--log-format", "text"]) == 0
    printed = capsys.readouterr().out
    assert "legal" in printed and "published copy damaged: runs/" in printed and "sha256 or size differs" in printed
    assert main(["verify", str(merged)]) == ExitStatus.OK
    # On a schedule: due when no run has verified yet, then not again within the interval.
    config_path.write_text(config_path.read_text() + "verify_published: weekly\n")
    verified = merged / "status" / "verified.json"
    before = json.loads(verified.read_text())["time"]
    run_fleet(load_config(config_path), progress=False)
    assert json.loads(verified.read_text())["time"] == before  # verified by the --verify-published run: not due
    verified.unlink()
    run_fleet(load_config(config_path), progress=False)
    assert json.loads(verified.read_text())["time"] > before
