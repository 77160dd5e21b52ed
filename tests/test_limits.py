"""Memory known before it is spent, and a deadline for the whole run: on a real local Ray and store.

(Outages of a real S3 server, through a fault-injecting proxy, are in test_faults_s3.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.core import PROCESS_BASELINE, ModuleCost, fmt
from safemerge_ray.errors import ExitStatus, SafeMergeError
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config, parse_bytes, parse_config
from safemerge_ray.fleet.pool import worker_lost as _worker_lost


def _set(fleet: Path, **fields) -> None:
    path = fleet / "fleet.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    path.write_text(yaml.safe_dump(raw))


def _pointers(fleet: Path) -> dict[str, str]:
    latest = fleet / "merged" / "latest"
    return {p.name: p.read_text() for p in sorted(latest.glob("*.json"))} if latest.is_dir() else {}


@pytest.mark.parametrize("text,expected", [("12GiB", 12 * 2**30), ("800MB", 800 * 10**6), ("1.5 gb", 1_500_000_000),
                                           ("4096", 4096), (65536, 65536)])
def test_sizes(text, expected):
    assert parse_bytes(text) == expected


def test_bad_limits_are_config_errors(tmp_path):
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "output": "o", "finetuned": ["f"],
           "ray": {"memory_per_worker": "lots"}, "max_run_seconds": -1, "s3": {"max_attempts": 0}}
    with pytest.raises(SafeMergeError) as exc:
        parse_config(raw, base=tmp_path)
    text = str(exc.value)
    assert "ray.memory_per_worker: expected a size such as 12GiB" in text
    assert "max_run_seconds: must be a positive number of seconds" in text
    assert "s3.max_attempts: must be an integer from 1 to 20" in text


def test_a_worker_budget_too_small_is_one_line_before_any_scoring(local_fleet, ray_local, capsys):
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).exit_code == ExitStatus.OK
    before = _pointers(local_fleet)
    (local_fleet / "finetuned" / "gsm8k" / "adapter_model.safetensors").touch()  # changed: gsm8k has work to do
    _set(local_fleet, ray__memory_per_worker="300MiB")  # less than a worker process needs for itself
    code = main(["fleet", "--config", str(local_fleet / "fleet.yaml"), "--quiet"])
    err = capsys.readouterr().err
    assert code == ExitStatus.ENVIRONMENT and err.count("\n") == 1, err
    assert "not enough memory: scoring module model.layers." in err
    assert "ray.memory_per_worker is 300 MiB" in err and "needs about" in err
    # The process's own share is said, so the numbers do not read as if they fit (issue 19.8).
    assert "of which the process itself takes about 600 MiB, leaving 0 KiB" in err
    assert _pointers(local_fleet) == before  # nothing published
    record = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
    assert record["exit_status"] == ExitStatus.ENVIRONMENT and "not enough memory" in record["error"]
    _set(local_fleet, ray__memory_per_worker="2GiB")
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).by_status("committed") == ["gsm8k"]


def test_merge_checks_the_memory_this_machine_has(pair, tmp_path, monkeypatch, capsys):
    from safemerge_ray.engine import merge_command as repair

    # Stands in for a small container (its cgroup limit), which cannot be created here without root.
    monkeypatch.setattr(repair, "available_memory", lambda: 1024)
    code = main(["merge", "--unaligned", str(pair / "unaligned"), "--aligned", str(pair / "aligned"),
                 "--safety-adapter", str(pair / "safety"), "--finetuned", str(pair / "finetuned" / "gsm8k"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == ExitStatus.ENVIRONMENT and err.count("\n") == 1, err
    assert "this machine has 1 KiB available" in err and "needs about" in err
    assert not (tmp_path / "out").exists()


_MEASURE = """
import torch
from safemerge_ray.core import alignment_delta, lora_rho
torch.set_num_threads(1)
def status(field):  # kB in /proc/self/status
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024
out, inp, n, r = 2048, 2048, 48, 16
w_al = torch.randn(out, inp, dtype=torch.bfloat16); w_un = torch.randn(out, inp, dtype=torch.bfloat16)
loras = [(torch.randn(r, inp), torch.randn(out, r)) for _ in range(n)]
inputs = 2 * w_al.nbytes + 4 * n * r * (inp + out)  # already held: the weights pair and the factors
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the RSS now
base = status("VmRSS")
v = alignment_delta(w_al, w_un, "m")
rho = lora_rho(v, loras)
print(status("VmHWM") - base + inputs)
"""


def test_the_estimate_bounds_the_measured_peak():
    """ModuleCost.peak against a real process's peak RSS for one module (2048 x 2048 bf16, 48 adapters, r 16)."""
    measured = int(subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True,
                                  timeout=120).stdout)
    cost = ModuleCost("m", 2048, 2048, 2 * 2048 * 2048 * 2, (16,) * 48)
    # The estimate counts the next module's weights too (read ahead in a worker): it is an upper bound,
    # and not so loose that it would refuse work that fits.
    assert measured <= cost.peak <= 2.0 * measured, (measured, cost.peak)


def test_deadline_reached_while_planning_keeps_the_previous_pointers(local_fleet, ray_local):
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).exit_code == ExitStatus.OK
    before = _pointers(local_fleet)
    for name in ("gsm8k", "legal"):
        (local_fleet / "finetuned" / name / "adapter_model.safetensors").touch()
    _set(local_fleet, max_run_seconds=1e-6)
    report = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.ENVIRONMENT and report.run_id is None
    assert report.by_status("failed") == ["gsm8k", "legal", "medqa", "support"]
    assert all("not planned within max_run_seconds (1e-06 s); its previous pointer stays" in st.reason
               for st in report.adapters)
    assert any("max_run_seconds (1e-06 s) reached: 4 adapter(s) not finished" in w for w in report.warnings)
    assert _pointers(local_fleet) == before
    assert not (local_fleet / "merged" / "status" / "lock.json").exists()  # released
    _set(local_fleet, max_run_seconds=600)
    assert run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False).by_status("committed") == [
        "gsm8k", "legal"]


def test_a_worker_killed_for_memory_is_named_as_such():
    import ray

    cost = ModuleCost("model.layers.3.mlp.up_proj", 14336, 4096, 2 * 14336 * 4096 * 2, (16,) * 64)
    oom = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node")
    line = _worker_lost(oom, "scoring module model.layers.3.mlp.up_proj", cost)
    assert line.startswith("a worker was killed for running out of memory while scoring module "
                           f"model.layers.3.mlp.up_proj (it needs about {fmt(cost.peak)} beyond the process)")
    assert "\n" not in line
    died = ray.exceptions.RayActorError()
    assert "could not be restarted" in _worker_lost(died, "assembling gsm8k") and "OOM" in _worker_lost(died, "x")


def test_thousands_of_missing_adapters_give_a_bounded_report(local_fleet, capsys):
    _set(local_fleet, finetuned=[f"finetuned/missing-{i:05d}" for i in range(3000)])
    config = str(local_fleet / "fleet.yaml")
    assert main(["fleet", "--config", config, "--quiet", "--log-format", "text"]) == 4  # none usable, no Ray
    out = capsys.readouterr().out
    assert out.count("\n") < 120 and "... and 2900 more failed adapters: see status/last_run.json" in out
    assert main(["fleet", "--config", config, "--quiet", "--log-format", "json"]) == 4
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) < 120 and lines[-1]["failed_not_listed"] == 2900 and lines[-1]["counts"]["failed"] == 3000
    record = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
    assert record["counts"]["failed"] == 3000 and len(record["failed"]) == 101
    assert len(json.dumps(record)) < 64 * 1024


def test_a_small_budget_scores_in_chunks_with_the_same_results(local_fleet, ray_local, capsys, tmp_path):
    """With room for one adapter at a time on the largest module, adapters are scored in chunks: the
    adapters' bytes and every decision equal an unchunked run's, rho to 1e-6 (other GEMM shapes)."""
    import shutil

    from safemerge_ray.core import PROCESS_BASELINE
    from safemerge_ray.core.memory import OVERHEAD
    from safemerge_ray.fleet import plan_fleet
    from safemerge_ray.fleet.plan import plan_jobs as _plan_jobs
    from safemerge_ray.io import LocalDir
    from safemerge_ray.store import read_decisions

    other = tmp_path / "unchunked"
    shutil.copytree(local_fleet, other)
    whole = run_fleet(load_config(other / "fleet.yaml"), progress=False)
    config = load_config(local_fleet / "fleet.yaml")
    jobs = _plan_jobs(plan_fleet(config, LocalDir(local_fleet / "merged")).pending)
    budget = max(int(OVERHEAD * (j.cost.fixed + j.cost.per_adapter(4))) + 1 for j in jobs)
    assert any(j.cost.chunk(4, budget) < len(j.requests) for j in jobs)  # the budget does split them
    _set(local_fleet, ray__memory_per_worker=PROCESS_BASELINE + budget)
    capsys.readouterr()
    chunked = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert chunked.exit_code == ExitStatus.OK
    assert "scoring batches for 14 modules: adapters grouped by rank and chunked" in capsys.readouterr().out
    ours = {r["adapter"] + r["module"]: r
            for r in read_decisions(local_fleet / "merged" / "runs" / chunked.run_id / "decisions.parquet")}
    theirs = {r["adapter"] + r["module"]: r
              for r in read_decisions(other / "merged" / "runs" / whole.run_id / "decisions.parquet")}
    assert ours.keys() == theirs.keys()
    for key, row in ours.items():
        assert row["merged"] == theirs[key]["merged"] and abs(row["rho"] - theirs[key]["rho"]) <= 1e-6, key
    for name in ("gsm8k", "legal", "medqa", "support"):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (local_fleet / "merged" / "runs" / chunked.run_id / name / f).read_bytes() == \
                (other / "merged" / "runs" / whole.run_id / name / f).read_bytes()


def test_adapters_of_different_ranks_are_scored_by_rank_and_equal_merge_alone(local_fleet, ray_local, tmp_path):
    """A rank-8 adapter among rank-4 ones: scored in its own batch (no zero-padding), and its output is
    byte for byte what `merge` makes of it alone."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from safemerge_ray.core import MergeSettings
    from safemerge_ray.engine import merge_to_dir

    wide = local_fleet / "finetuned" / "wide"
    shutil.copytree(local_fleet / "finetuned" / "gsm8k", wide)
    tensors, gen = load_file(wide / "adapter_model.safetensors"), torch.Generator().manual_seed(5)
    for key in list(tensors):
        t = tensors[key]
        extra = torch.randn((4, t.shape[1]) if "lora_A" in key else (t.shape[0], 4), generator=gen) * 0.02
        tensors[key] = torch.cat([t, extra], dim=0 if "lora_A" in key else 1).contiguous()
    save_file(tensors, wide / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((wide / "adapter_config.json").read_text())
    config.update(r=8, lora_alpha=2 * config["lora_alpha"])
    (wide / "adapter_config.json").write_text(json.dumps(config))

    # linear cannot combine a rank-8 layer with the rank-4 safety LoRA: that adapter alone fails, as in merge
    report = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert report.by_status("failed") == ["wide"] and "ranks [4, 8] cannot be combined" in report.adapters[-1].reason
    assert report.by_status("committed") == ["gsm8k", "legal", "medqa", "support"]
    _set(local_fleet, overrides={"wide": {"method": "cat"}})
    report = run_fleet(load_config(local_fleet / "fleet.yaml"), progress=False)
    assert report.exit_code == ExitStatus.OK and report.by_status("committed") == ["wide"]
    alone = tmp_path / "alone"
    merge_to_dir(unaligned=str(local_fleet / "unaligned"), aligned=str(local_fleet / "aligned"),
                 safety_adapter=str(local_fleet / "safety"), finetuned=str(wide), out=str(alone),
                 settings=MergeSettings(method="cat"), progress=False)
    run_dir = local_fleet / "merged" / "runs" / report.run_id / "wide"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (run_dir / f).read_bytes() == (alone / f).read_bytes()


def test_the_batch_cap_keeps_a_workers_peak_flat_in_the_number_of_adapters():
    """With memory to spare, a large module's adapters are still scored a capped batch at a time: the estimated
    peak for 1,024 adapters is within 10% of 16's (the benchmark measures it: BENCHMARKS.md, scale series)."""
    def cost(n: int) -> ModuleCost:
        return ModuleCost("mlp.up_proj", 11008, 4096, 2 * 11008 * 4096 * 2, (16,) * n)

    # a quarter of the module's own weights and V is 29 adapters; 24 fill three projection panels (384 columns)
    assert cost(1024).chunk(16, None) == 24
    assert cost(16).peak < cost(1024).peak <= 1.1 * (cost(16).peak + PROCESS_BASELINE) - PROCESS_BASELINE
    assert cost(1024).chunk(16, budget=cost(1024).least) == 1  # a budget below the cap still rules
    small = ModuleCost("q_proj", 64, 64, 2 * 64 * 64 * 2, (16,) * 4096)
    assert small.chunk(16, None) >= 1024  # tiny modules: the cap's floor lets large batches through


def test_small_neighbouring_modules_share_a_scoring_task_and_large_ones_do_not():
    from safemerge_ray.core import MergeSettings
    from safemerge_ray.fleet.jobs import TASK_BYTES, ModuleJob, ScoreRequest, score_tasks

    requests = tuple(ScoreRequest(f"a{i}", f"/a{i}", MergeSettings()) for i in range(8))

    def job(module: str, out: int, inp: int) -> ModuleJob:
        nbytes = 2 * out * inp * 2
        return ModuleJob(module, f"{module}.weight", False, nbytes, requests,
                         ModuleCost(module, out, inp, nbytes, (16,) * len(requests)))

    small = [job(f"model.layers.{i}.self_attn.{p}", 64, 64) for i in (10, 2, 1) for p in ("q_proj", "k_proj")]
    large = [job("model.layers.0.mlp.up_proj", 11008, 4096), job("model.layers.3.mlp.up_proj", 11008, 4096)]
    tasks = score_tasks(small + large)
    assert [[j.module for j in t.jobs] for t in tasks] == [  # in file order: layers.10 before layers.2
        ["model.layers.0.mlp.up_proj"],
        ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.k_proj",
         "model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.q_proj"],
        ["model.layers.3.mlp.up_proj"],
    ]
    many = [job(f"model.layers.{i}.mlp.down_proj", 1024, 4096) for i in range(64)]
    grouped = score_tasks(many)
    assert 1 < len(grouped) < len(many)
    assert all(sum(j.nbytes + j.factor_bytes for j in t.jobs) <= TASK_BYTES for t in grouped)
