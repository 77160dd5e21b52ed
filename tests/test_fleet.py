"""The fleet job on a real local Ray cluster, local store: equal to `merge`, incremental, isolated failures."""

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from safemerge_ray.core import MergeSettings
from safemerge_ray.engine import merge_to_dir
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.store import read_decisions
from safemerge_ray.synthetic import SynthSpec, build_fixture, write_fleet_config

ADAPTERS = ["gsm8k", "legal", "medqa", "support"]


@pytest.fixture
def fleet(local_fleet, ray_local):
    return local_fleet


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _latest(root: Path, name: str) -> dict:
    return json.loads((root / "merged" / "latest" / f"{name}.json").read_text())


def _adapter_dir(root: Path, name: str) -> Path:
    return root / "merged" / _latest(root, name)["path"]


@pytest.mark.parametrize("method", ["linear", "svd", "ties"])
def test_fleet_output_equals_merge_per_adapter(fleet, tmp_path, method):
    """Byte for byte, for a merge linear in B (done in assembly, many layers at once) and for methods whose
    repair scoring already made (for rho_after), which assembly takes as it is."""
    config = load_config(fleet / "fleet.yaml")
    if method != "linear":
        config = replace(config, merge=replace(config.merge, method=method, density=None if method == "svd" else 0.5))
    report = run_fleet(config, progress=False)
    assert report.exit_code == ExitStatus.OK and report.by_status("committed") == ADAPTERS
    run_rows = read_decisions(fleet / "merged" / "runs" / report.run_id / "decisions.parquet")
    for name in ADAPTERS:
        single = tmp_path / f"single-{name}"
        merge_to_dir(unaligned=str(fleet / "unaligned"), aligned=str(fleet / "aligned"),
                     safety_adapter=str(fleet / "safety"), finetuned=str(fleet / "finetuned" / name),
                     out=str(single), settings=config.merge, progress=False)
        fleet_dir = _adapter_dir(fleet, name)
        for fname in ("adapter_model.safetensors", "adapter_config.json"):
            assert (fleet_dir / fname).read_bytes() == (single / fname).read_bytes(), (name, fname)
        ours = [r for r in run_rows if r["adapter"] == name]
        theirs = read_decisions(single / "decisions.parquet")
        assert [(r["module"], r["action"]) for r in ours] == [(r["module"], r["action"]) for r in theirs]
        # The decisions too: the same rho and rho_after, to the bit.
        assert [(r["rho"], r["rho_after"]) for r in ours] == [(r["rho"], r["rho_after"]) for r in theirs]
        assert any(r["merged"] for r in ours)  # some layers were repaired


def test_safelora_projections_stay_on_the_workers_and_equal_merge(fleet, tmp_path, monkeypatch):
    """SafeLoRA's projected Bs never reach the driver: it holds references into Ray's object store, which the
    assembling worker fetches; the adapters are byte-identical to `merge`'s."""
    import ray

    from safemerge_ray.fleet import run as fleet_module

    held = []
    real_assemble = fleet_module._assemble

    def spying_assemble(config, workers, out, run_id, pending, *args):
        for st in pending:
            assert all(s.projected_b is None and s.repaired is None for s in st.scores.values())  # scalars only
            held.extend(st.carried.values())
        return real_assemble(config, workers, out, run_id, pending, *args)

    monkeypatch.setattr(fleet_module, "_assemble", spying_assemble)
    config = replace(load_config(fleet / "fleet.yaml"), merge=MergeSettings(policy="safelora", tau=0.35))
    report = run_fleet(config, progress=False)
    assert report.exit_code == ExitStatus.OK
    assert held and all(isinstance(ref, ray.ObjectRef) for ref in held)
    assert all(not st.carried and not st.scores for st in report.adapters)  # released after assembly
    run_rows = read_decisions(fleet / "merged" / "runs" / report.run_id / "decisions.parquet")
    for name in ADAPTERS:
        single = tmp_path / f"single-{name}"
        merge_to_dir(unaligned=str(fleet / "unaligned"), aligned=str(fleet / "aligned"),
                     safety_adapter=str(fleet / "safety"), finetuned=str(fleet / "finetuned" / name),
                     out=str(single), settings=config.merge, progress=False)
        assert (_adapter_dir(fleet, name) / "adapter_model.safetensors").read_bytes() == \
            (single / "adapter_model.safetensors").read_bytes(), name
        ours = [(r["module"], r["rho"], r["rho_after"]) for r in run_rows if r["adapter"] == name]
        assert ours == [(r["module"], r["rho"], r["rho_after"]) for r in read_decisions(single / "decisions.parquet")]


def test_manifest_is_complete_and_hashes_match(fleet):
    report = run_fleet(load_config(fleet / "fleet.yaml"), progress=False)
    out = fleet / "merged"
    manifest = json.loads((out / "runs" / report.run_id / "manifest.json").read_text())
    objects = dict(manifest["objects"])
    for entry in manifest["adapters"].values():
        objects.update(entry["objects"])
    assert len(objects) == 2 + 2 * len(ADAPTERS)
    for key, meta in objects.items():
        data = (out / key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["bytes"]
    assert set(manifest["inputs"]) == {"unaligned_model", "aligned_model", "safety_adapter"}
    assert all(v["fingerprint"] for v in manifest["inputs"].values())
    for name in ADAPTERS:
        assert _latest(fleet, name)["run_id"] == report.run_id


def test_the_run_record_says_how_long_each_phase_took(fleet):
    start = time.perf_counter()
    report = run_fleet(load_config(fleet / "fleet.yaml"), progress=False)
    wall = time.perf_counter() - start
    record = json.loads((fleet / "merged" / "status" / "last_run.json").read_text())
    assert list(report.record.phase_s) == ["plan", "ray", "preflight", "score", "assemble", "commit"]  # in order
    assert record["phase_s"] == report.record.phase_s  # (stored with sorted keys)
    assert all(s >= 0 for s in record["phase_s"].values()) and sum(record["phase_s"].values()) <= wall + 0.01
    assert record["phase_s"]["preflight"] > 0 and record["phase_s"]["assemble"] > 0


def test_rerun_with_nothing_changed_does_nothing(fleet):
    config = load_config(fleet / "fleet.yaml")
    first = run_fleet(config, progress=False)
    before = _snapshot(fleet / "merged")
    again = run_fleet(config, progress=False)
    assert again.run_id is None and again.exit_code == ExitStatus.OK
    assert again.by_status("unchanged") == ADAPTERS
    assert all(st.previous_run == first.run_id for st in again.adapters)
    after = _snapshot(fleet / "merged")
    # No scoring, no adapters, no run directory: only the run record says that the night did run.
    assert {k: v for k, v in after.items() if not k.startswith("status/")} == \
        {k: v for k, v in before.items() if not k.startswith("status/")}
    record = json.loads(after["status/last_run.json"])
    assert record["run_id"] is None and record["exit_status"] == ExitStatus.OK
    assert record["counts"] == {"adapters": 4, "committed": 0, "unchanged": 4, "held": 0, "failed": 0}
    assert list(record["phase_s"]) == ["plan"] and record["phase_s"] == again.record.phase_s  # no Ray, no workers
    history = sorted(k for k in after if k.startswith("status/history/"))
    assert len(history) == 2 and json.loads(after[history[-1]]) == record
    assert json.loads(after[history[0]])["run_id"] == first.run_id


def test_changed_adapter_is_redone_alone(fleet):
    config = load_config(fleet / "fleet.yaml")
    first = run_fleet(config, progress=False)
    path = fleet / "finetuned" / "legal" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors = {k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    second = run_fleet(config, progress=False)
    assert second.by_status("committed") == ["legal"]
    assert second.by_status("unchanged") == ["gsm8k", "medqa", "support"]
    assert _latest(fleet, "legal")["run_id"] == second.run_id
    assert _latest(fleet, "gsm8k")["run_id"] == first.run_id
    assert sorted(p.name for p in (fleet / "merged" / "runs" / second.run_id).iterdir() if p.is_dir()) == ["legal"]


def test_new_adapter_is_done_alone_and_changed_settings_redo_all(fleet):
    config = load_config(fleet / "fleet.yaml")
    run_fleet(config, progress=False)
    shutil.copytree(fleet / "finetuned" / "support", fleet / "finetuned" / "newcomer")
    assert run_fleet(config, progress=False).by_status("committed") == ["newcomer"]
    changed = replace(config, merge=replace(config.merge, tau=0.5))
    assert run_fleet(changed, progress=False).by_status("committed") == sorted(ADAPTERS + ["newcomer"])
    # A per-adapter override is a changed setting for that adapter only.
    overridden = replace(changed, overrides={"gsm8k": replace(changed.merge, weights=(0.6, 0.4))})
    assert run_fleet(overridden, progress=False).by_status("committed") == ["gsm8k"]


def test_safety_adapter_change_redoes_all(fleet):
    config = load_config(fleet / "fleet.yaml")
    run_fleet(config, progress=False)
    path = fleet / "safety" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * 0.9 for k, v in tensors.items()}, path, metadata={"format": "pt"})
    assert run_fleet(config, progress=False).by_status("committed") == ADAPTERS


@pytest.mark.parametrize("damage", ["truncated", "nan_in_lora"])
def test_broken_adapter_fails_alone(fleet, damage):
    path = fleet / "finetuned" / "medqa" / "adapter_model.safetensors"
    if damage == "truncated":  # found while planning, from the header
        path.write_bytes(path.read_bytes()[:-100])
    else:  # found by a scoring actor, reading the tensor
        tensors = load_file(path)
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, path, metadata={"format": "pt"})
    report = run_fleet(load_config(fleet / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.PARTIAL
    assert report.by_status("failed") == ["medqa"]
    assert report.by_status("committed") == ["gsm8k", "legal", "support"]
    run_dir = fleet / "merged" / "runs" / report.run_id
    summary = json.loads((run_dir / "summary.json").read_text())
    reason = summary["adapters"]["medqa"]["reason"]
    assert ("truncated" in reason or "ends at byte" in reason) if damage == "truncated" else "NaN" in reason
    assert not (fleet / "merged" / "latest" / "medqa.json").exists()
    assert not (run_dir / "medqa").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["adapters"]) == {"gsm8k", "legal", "support"} and "medqa" in manifest["failed"]
    assert {r["adapter"] for r in read_decisions(run_dir / "decisions.parquet")} == {"gsm8k", "legal", "support"}


def test_results_identical_with_one_and_several_actors(fleet):
    config = load_config(fleet / "fleet.yaml")
    one = run_fleet(replace(config, actors=1, output=str(fleet / "one")), progress=False)
    two = run_fleet(replace(config, actors=2, output=str(fleet / "two")), progress=False)
    for name in ADAPTERS:
        a = fleet / "one" / "runs" / one.run_id / name / "adapter_model.safetensors"
        b = fleet / "two" / "runs" / two.run_id / name / "adapter_model.safetensors"
        assert a.read_bytes() == b.read_bytes()
    rows_one = read_decisions(fleet / "one" / "runs" / one.run_id / "decisions.parquet")
    rows_two = read_decisions(fleet / "two" / "runs" / two.run_id / "decisions.parquet")
    assert rows_one == rows_two  # rho too: each module is scored in one batch whatever the sharding


def test_fleet_cli_exit_status_and_summary(fleet, capsys):
    from safemerge_ray.cli import main

    (fleet / "finetuned" / "support" / "adapter_config.json").write_text("{not json")
    code = main(["fleet", "--config", str(fleet / "fleet.yaml"), "--quiet", "--log-format", "text"])  # the table
    out = capsys.readouterr().out
    assert code == ExitStatus.PARTIAL
    assert "support" in out and "failed" in out and "corrupt adapter_config.json" in out
    assert "runs/" in out


def test_safelora_fleet_without_safety_adapter(fleet):
    config = load_config(fleet / "fleet.yaml")
    config = replace(config, safety_adapter=None, merge=MergeSettings(policy="safelora", tau=0.35))
    report = run_fleet(config, progress=False)
    assert report.exit_code == ExitStatus.OK
    rows = read_decisions(fleet / "merged" / "runs" / report.run_id / "decisions.parquet")
    assert {r["action"] for r in rows} == {"projected", "kept"}


@pytest.mark.parametrize("resources,actors,gpus,cpus,expected", [
    ({"CPU": 2.0}, None, None, None, (2, 0.0, 1, "cpu")),
    ({"CPU": 16.0}, None, None, None, (14, 0.0, 1, "cpu")),  # capped by the 14 modules to score
    ({"CPU": 16.0, "GPU": 4.0}, None, None, None, (4, 1.0, 1, "cuda")),
    ({"CPU": 16.0, "GPU": 2.0}, None, 0.5, None, (4, 0.5, 1, "cuda")),
    ({"CPU": 8.0}, 2, None, None, (2, 0.0, 4, "cpu")),
    # An autoscaling cluster at zero workers: the config says what each worker pod will offer.
    ({"CPU": 2.0}, 4, 1.0, 4, (4, 1.0, 4, "cuda")),
])
def test_actors_ask_for_gpus_when_the_cluster_has_them(monkeypatch, fleet, resources, actors, gpus, cpus, expected):
    """The GPU side of actor placement; a GPU cluster is the one thing this machine cannot start."""
    import ray

    from safemerge_ray.fleet.pool import actor_shape as _actor_shape

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    config = replace(load_config(fleet / "fleet.yaml"), actors=actors, gpus_per_actor=gpus, cpus_per_actor=cpus)
    assert _actor_shape(config, n_jobs=14) == expected


def test_cuda_device_without_gpus_is_a_clear_error(monkeypatch, fleet):
    import ray

    from safemerge_ray.errors import SafeMergeError
    from safemerge_ray.fleet.pool import actor_shape as _actor_shape

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(SafeMergeError, match="no GPUs"):
        _actor_shape(replace(load_config(fleet / "fleet.yaml"), device="cuda"), n_jobs=14)


def test_each_model_weight_is_read_once_for_the_whole_fleet(tmp_path, ray_local):
    """Bytes read, measured in the driver, the actors and the tasks: the targeted weights once, whatever N."""
    root = tmp_path / "fx"
    build_fixture(root, SynthSpec(hidden=128, layers=2, heads=4, rank=2, seed=8), n_finetunes=4)
    write_fleet_config(root)
    from safemerge_ray.io import Checkpoint, LocalDir

    target = 0
    for side in ("unaligned", "aligned"):
        ckpt = Checkpoint(LocalDir(root / side), side)
        target += sum(ckpt.info(k).nbytes for k in ckpt.locations
                      if k.endswith(("proj.weight",)))
    adapters = sum(p.stat().st_size for p in (root / "finetuned").rglob("*.safetensors"))
    safety = (root / "safety" / "adapter_model.safetensors").stat().st_size
    report = run_fleet(load_config(root / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.OK
    # Adapters are read a few times (fingerprint, scoring, assembly); the big weights exactly once.
    assert target <= report.bytes_read <= target + 3 * adapters + 6 * safety + 256 * 1024
    assert report.bytes_read < 1.5 * target


def test_a_run_stopped_while_pointers_move_is_named_by_its_record(local_fleet, ray_local, monkeypatch):
    """SIGTERM (or Ctrl-C) after the manifest, between two pointers: one adapter is published from the run,
    so the run record names the run (issue 19.7)."""
    from safemerge_ray.io import LocalDir

    real_write, pointers = LocalDir.write, []

    def write(self, name, data, staged=False):
        if name.startswith("latest/"):
            pointers.append(name)
            if len(pointers) == 2:
                raise KeyboardInterrupt  # what the CLI's SIGTERM handler raises
        return real_write(self, name, data, staged)

    monkeypatch.setattr(LocalDir, "write", write)
    with pytest.raises(KeyboardInterrupt):
        run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    merged = local_fleet / "merged"
    record = json.loads((merged / "status" / "last_run.json").read_text())
    published = json.loads((merged / pointers[0]).read_text())["run_id"]
    assert record["exit_status"] == ExitStatus.INTERRUPTED and record["run_id"] == published
    assert (merged / "runs" / published / "manifest.json").is_file()


def test_a_repair_that_scoring_made_is_not_made_again(pair, tmp_path, monkeypatch):
    """A method not linear in B (here svd) repairs a layer once, in scoring (where its rho_after is measured);
    assembly takes that layer as it is."""
    from safemerge_ray.core import POLICIES, PolicyName

    calls: list[str] = []
    policy = POLICIES[PolicyName.SAFEMERGE]

    def counting(settings, module, *args):
        calls.append(module)
        return policy.repair(settings, module, *args)

    monkeypatch.setitem(POLICIES, PolicyName.SAFEMERGE, replace(policy, repair=counting))
    summary = merge_to_dir(unaligned=str(pair / "unaligned"), aligned=str(pair / "aligned"),
                           safety_adapter=str(pair / "safety"), finetuned=str(pair / "finetuned" / "gsm8k"),
                           out=str(tmp_path / "out"), settings=MergeSettings(method="svd", tau=0.9), progress=False)
    merged = [r["module"] for r in summary["decisions"] if r["merged"]]
    assert merged and sorted(calls) == sorted(merged)
