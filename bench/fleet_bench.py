"""The fleet benchmark: today's way (the reference tool once per fine-tune), the floor, and safemerge-ray,
measured in one run on synthetic fleets with realistic layer shapes.

    make bench          # hidden 2048 and 4096, N = 1, 4, 16, 64, 3 repeats, depth check
    make bench-quick    # hidden 2048, N = 1, 4, 16, 2 repeats (under 3 minutes here)

Every case runs in its own process; a sampler adds up the proportional set size (PSS: shared pages
such as torch's libraries split between the processes sharing them) of that process and all its
descendants (Ray's raylet, GCS and workers included) every second (bench/scale.py's sampler), and keeps
the peak. Bytes read are counted by safemerge-ray's storage layer in every process (for the baseline: the
files it loads).

The baseline's cost does not depend on N (each fine-tune is a separate, identical run), so it is
measured as `k` separate runs on different adapters and reported as N x the per-run time (median,
min, max); the table says how many runs were measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import scale  # the sampler (bench/ is this script's directory, so on its path)
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
PY = sys.executable
SHAPES = {2048: 5504, 4096: 11008}  # hidden -> intermediate (Llama's proportions)


@dataclass
class Sample:
    wall_s: float
    peak_rss: int
    result: dict = field(default_factory=dict)


def measure(cmd: list[str]) -> Sample:
    """Run `cmd` under bench/scale.py's sampler; returns wall time, the peak PSS sum of its process tree
    and its JSON result."""
    peaks = scale.measure(cmd)
    return Sample(peaks.wall_s, peaks.total_pss, peaks.result)


def fixture(work: Path, hidden: int, layers: int, n: int) -> Path:
    from safemerge_ray.synthetic import SynthSpec, build_fixture

    root = work / f"h{hidden}-L{layers}-n{n}"
    if not (root / "safety" / "adapter_model.safetensors").exists():
        shutil.rmtree(root, ignore_errors=True)
        build_fixture(root, SynthSpec(hidden=hidden, intermediate=SHAPES[hidden], layers=layers,
                                      heads=hidden // 128, rank=16, dtype="bfloat16", max_shard_size="2GB"),
                      n_finetunes=n)
    return root


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(t: tuple[float, float, float]) -> str:
    return f"{t[0]:8.2f} ({t[1]:.2f}-{t[2]:.2f})"


def check_equal(baseline_dir: Path, ours_dir: Path) -> None:
    """The race is fair only if both produce the same adapter: same decisions, same tensors to 1e-6."""
    from safemerge_ray.store import read_decisions

    theirs = load_file(baseline_dir / "adapter_model.safetensors")
    ours = load_file(ours_dir / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.allclose(theirs[key], ours[key], atol=1e-6, rtol=0), key
    decided = {r["module"]: r["merged"] for r in json.loads((baseline_dir / "decisions.json").read_text())}
    rows = [r for r in read_decisions(ours_dir.parent / "decisions.parquet") if r["adapter"] == ours_dir.name]
    assert {r["module"]: r["merged"] for r in rows} == decided


def _model_pair_bytes(root: Path) -> int:
    return sum(p.stat().st_size for side in ("unaligned", "aligned") for p in (root / side).glob("*.safetensors"))


def bench_size(hidden: int, layers: int, ns: list[int], repeats: int, baseline_runs: int, work: Path) -> list[dict]:
    root = fixture(work, hidden, layers, max(ns))
    names = sorted(p.name for p in (root / "finetuned").iterdir())
    model_bytes = _model_pair_bytes(root)
    adapter_bytes = (root / "finetuned" / names[0] / "adapter_model.safetensors").stat().st_size
    safety_bytes = (root / "safety" / "adapter_model.safetensors").stat().st_size
    runs = work / "runs" / root.name
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    print(f"# hidden {hidden}, {layers} layers: model pair {model_bytes / 1e6:.0f} MB", flush=True)

    # Today's way: one full run per fine-tune; its cost is the same for every adapter.
    base = [measure([PY, str(HERE / "baseline_reference.py"), "--fixture", str(root), "--adapter", names[i],
                     "--out", str(runs / f"baseline-{names[i]}")]) for i in range(baseline_runs)]
    per_run = [s.wall_s for s in base]
    print(f"  baseline: {len(base)} runs, {fmt(stats(per_run))} s each", flush=True)
    rows = []
    for n in ns:
        subset = ",".join(names[:n])
        floor = measure([PY, str(HERE / "floor.py"), "--fixture", str(root), "--adapters", subset,
                         "--repeats", str(repeats)])
        ours = measure([PY, str(HERE / "run_case.py"), "fleet", "--fixture", str(root), "--adapters", subset,
                        "--out", str(runs / f"fleet-n{n}"), "--repeats", str(repeats)])
        warm = ours.result["work_s"]
        cold = ours.wall_s - sum(warm[1:])  # one user-visible run: imports, Ray start, the job
        for i in range(min(n, baseline_runs)):
            check_equal(runs / f"baseline-{names[i]}", Path(ours.result["run_dirs"][0]) / names[i])
        row = {
            "hidden": hidden, "layers": layers, "n": n, "model_pair_mb": model_bytes / 1e6,
            "baseline_s": stats([n * t for t in per_run]), "baseline_runs_measured": len(base),
            "baseline_peak_mb": max(s.peak_rss for s in base) / 1e6,
            "baseline_read_mb": n * (model_bytes + adapter_bytes + safety_bytes) / 1e6,
            "floor_s": stats(floor.result["work_s"]), "floor_peak_mb": floor.peak_rss / 1e6,
            "floor_read_mb": floor.result["bytes_read"] / 1e6,
            "ours_s": stats(warm), "ours_cold_s": cold, "ray_start_s": ours.result["ray_start_s"],
            "ours_peak_mb": ours.peak_rss / 1e6, "ours_read_mb": ours.result["bytes_read"] / 1e6,
        }
        if n == 1:
            merge = [measure([PY, str(HERE / "run_case.py"), "merge", "--fixture", str(root), "--adapters",
                              names[0], "--out", str(runs / f"merge-{i}")]) for i in range(repeats)]
            row["merge_s"] = stats([m.result["work_s"][0] for m in merge])
            row["merge_cold_s"] = stats([m.wall_s for m in merge])
            row["merge_peak_mb"] = max(m.peak_rss for m in merge) / 1e6
            row["merge_read_mb"] = merge[0].result["bytes_read"] / 1e6
        row["baseline_over_ours"] = row["baseline_s"][0] / row["ours_s"][0]
        row["baseline_over_ours_cold"] = row["baseline_s"][0] / cold
        row["ours_over_floor"] = row["ours_s"][0] / row["floor_s"][0]
        rows.append(row)
        print(f"  N={n:<3} floor {fmt(row['floor_s'])}  ours {fmt(row['ours_s'])} (cold {cold:.1f})  "
              f"baseline/ours {row['baseline_over_ours']:.1f}x  ours/floor {row['ours_over_floor']:.2f}", flush=True)
    return rows


def depth_check(hidden: int, layers: int, n: int, work: Path) -> list[dict]:
    """Peak memory of the whole fleet job on a model and on one twice as deep."""
    out = []
    for depth in (layers, 2 * layers):
        root = fixture(work, hidden, depth, n)
        names = sorted(p.name for p in (root / "finetuned").iterdir())[:n]
        runs = work / "runs" / f"depth-{root.name}"
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        s = measure([PY, str(HERE / "run_case.py"), "fleet", "--fixture", str(root), "--adapters", ",".join(names),
                     "--out", str(runs / "fleet")])
        model_bytes = _model_pair_bytes(root)
        out.append({"hidden": hidden, "layers": depth, "n": n, "model_pair_mb": model_bytes / 1e6,
                    "ours_peak_mb": s.peak_rss / 1e6, "ours_s": s.result["work_s"][0]})
        print(f"  depth {depth}: pair {model_bytes / 1e6:.0f} MB, peak {s.peak_rss / 1e6:.0f} MB", flush=True)
    return out


def table(rows: list[dict], depth: list[dict]) -> str:
    lines = [
        "| hidden x layers | N | baseline s (measured runs) | floor s | ours s (warm) | ours s (cold) | merge s | "
        "baseline/ours | baseline/ours cold | ours/floor | peak MB (PSS) base / floor / ours "
        "| MB read base / floor / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        merge = fmt(r["merge_s"]).strip() if "merge_s" in r else ""
        lines.append(
            f"| {r['hidden']} x {r['layers']} | {r['n']} "
            f"| {fmt(r['baseline_s']).strip()} ({r['baseline_runs_measured']}) "
            f"| {fmt(r['floor_s']).strip()} | {fmt(r['ours_s']).strip()} | {r['ours_cold_s']:.2f} | {merge} "
            f"| {r['baseline_over_ours']:.1f}x | {r['baseline_over_ours_cold']:.1f}x | {r['ours_over_floor']:.2f} "
            f"| {r['baseline_peak_mb']:.0f} / {r['floor_peak_mb']:.0f} / {r['ours_peak_mb']:.0f} "
            f"| {r['baseline_read_mb']:.0f} / {r['floor_read_mb']:.0f} / {r['ours_read_mb']:.0f} |")
    if depth:
        lines += ["", "| model (hidden x layers) | model pair MB | N | ours peak MB (PSS, all processes) | ours s |",
                  "|---|---|---|---|---|"]
        for d in depth:
            lines.append(f"| {d['hidden']} x {d['layers']} | {d['model_pair_mb']:.0f} | {d['n']} "
                         f"| {d['ours_peak_mb']:.0f} | {d['ours_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("build/bench"))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    if args.quick:
        plan = [(2048, 2, [1, 4, 16])]
        repeats, baseline_runs, depth_args = 2, 2, None
    else:
        plan = [(2048, 2, [1, 4, 16, 64]), (4096, 2, [1, 4, 16, 64])]
        repeats, baseline_runs, depth_args = 3, 3, (2048, 2, 16)
    args.work = args.work.resolve()  # configs written under it name absolute paths
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [row for hidden, layers, ns in plan
            for row in bench_size(hidden, layers, ns, repeats, baseline_runs, args.work)]
    depth = depth_check(*depth_args, args.work) if depth_args else []
    print()
    print(table(rows, depth))
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, {time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "depth": depth}, indent=1))


if __name__ == "__main__":
    main()
