"""The benchmark harness runs: the floor (with SafeLoRA's second projection), one fleet case with its phases,
and the tables BENCHMARKS.md is written from. Times are not checked here (`bench/` measures them); what the
harness reads and writes is, so that `make bench` does not rot between the sessions that run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safemerge_ray.synthetic import SynthSpec, build_fixture

BENCH = Path(__file__).resolve().parents[1] / "bench"
ADAPTERS = ["gsm8k", "legal", "medqa"]  # the first three of `build_fixture`


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-fleet")
    build_fixture(root, SynthSpec(hidden=64, layers=2, rank=4), n_finetunes=len(ADAPTERS))
    assert sorted(p.name for p in (root / "finetuned").iterdir()) == ADAPTERS
    return root


def _json_line(cmd: list[str], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("second", [False, True])
def test_the_floor_reads_each_input_once_and_leaves_nothing(small_fleet, tmp_path, second):
    out = tmp_path / "floor-out"
    result = _json_line([str(BENCH / "floor.py"), "--fixture", str(small_fleet), "--adapters", ",".join(ADAPTERS),
                         "--write", str(out), "--repeats", "2", *(["--second-projection"] if second else [])], tmp_path)
    adapters = sum((small_fleet / "finetuned" / a / "adapter_model.safetensors").stat().st_size for a in ADAPTERS)
    weights = sum(f.stat().st_size for m in ("unaligned", "aligned") for f in (small_fleet / m).glob("*.safetensors"))
    assert len(result["work_s"]) == 2 and all(s > 0 for s in result["work_s"])
    assert adapters < result["bytes_read"] <= adapters + weights  # the last repeat: each adapter once, target weights
    assert not out.exists()  # the written outputs are removed after each repeat


@pytest.mark.ray  # (a local Ray of its own, started by the case's process)
def test_a_fleet_case_reports_its_time_phases_and_reads(small_fleet, tmp_path):
    result = _json_line([str(BENCH / "run_case.py"), "fleet", "--fixture", str(small_fleet), "--adapters",
                         ",".join(ADAPTERS), "--out", str(tmp_path / "o"), "--policy", "safelora"], tmp_path)
    (phases,) = result["phase_s"]
    assert {"plan", "preflight", "score", "assemble", "commit"} <= set(phases)
    assert sum(phases.values()) <= result["work_s"][0]
    assert result["bytes_read"] > 0
    (run_dir,) = result["run_dirs"]
    assert (Path(run_dir) / "manifest.json").is_file()


def test_the_tables_are_written_from_rows():
    sys.path.insert(0, str(BENCH))
    try:
        import scale
        import whole_model
    finally:
        sys.path.remove(str(BENCH))
    row = {"case": "wide", "n": 64, "policy": "safelora", "modules": 7, "repeats": 3, "floor_s": 8.0, "ours_s": 20.0,
           "ours_over_floor": 2.5, "worker_mb": 1000.0, "driver_mb": 400.0, "total_pss_mb": 2000.0}
    assert "| wide | 7 | 64 | safelora | 3 | 8.00 | 20.00 | 2.50 | 1000 | 400 | 2000 |" in scale.table([row])
    whole = {"n": 64, "floor_s": 80.0, "ours_s": 100.0, "ours_over_floor": 1.25, "floor_mb_read": 10.0,
             "mb_read": 20.0, "floor_peak_mb": 2000.0, "total_pss_mb": 1700.0,
             "phase_s": {"plan": 0.5, "score": 70.0, "assemble": 27.0},
             "processes_mb": [("driver", 380.0), ("worker", 690.0), ("worker", 680.0), ("raylet", 120.0)]}
    line = whole_model.table([whole]).splitlines()[-1]
    assert line.startswith("| 64 | 80.0 | 100.0 | 1.25 | 0.5 | 0.0 | 0.0 | 70.0 | 27.0 | 0.0 |")
    assert "2000 / 380 / 690+680 / 120" in line


def test_the_gram_route_gives_safeloras_rho_after_exactly(tmp_path):
    result = _json_line([str(BENCH / "gram.py"), "--out", "96", "--in", "40", "--columns", "64"], tmp_path)
    assert result["columns"] == 64
    assert result["max_abs_rho_difference"] < 1e-5  # the note's claim: exact, so only its cost kept it out
    assert min(result["gram_s"], result["second_projection_s"], result["gram_route_columns_s"]) > 0


def test_the_baseline_writes_what_merge_writes(small_fleet, tmp_path):
    """The race against today's way is fair only if both write the same adapter (fleet_bench.py checks it per
    run); on the small fleet, the baseline's tensors equal `merge`'s to 1e-6."""
    from safetensors.torch import load_file

    _json_line([str(BENCH / "baseline_reference.py"), "--fixture", str(small_fleet), "--adapter", ADAPTERS[0],
                "--out", str(tmp_path / "baseline")], tmp_path)
    merge = subprocess.run([str(Path(sys.executable).parent / "safemerge-ray"), "merge", "--unaligned",
                            str(small_fleet / "unaligned"), "--aligned", str(small_fleet / "aligned"),
                            "--safety-adapter", str(small_fleet / "safety"), "--finetuned",
                            str(small_fleet / "finetuned" / ADAPTERS[0]), "--out", str(tmp_path / "ours"), "--quiet"],
                           capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-3000:]
    theirs = load_file(tmp_path / "baseline" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and len(theirs) > 0
    assert all((theirs[k] - ours[k]).abs().max() <= 1e-6 for k in theirs)
