"""A whole model: the fleet job on every module of a Llama-3.2-1B-shaped pair, against the floor.

    python bench/whole_model.py                 # N = 64 and 256 (about 25 minutes on a 2-core machine)
    python bench/whole_model.py --ns 64         # one row
    python bench/whole_model.py --quick         # a 4-layer model, N = 16: checks the benchmark runs

The model has Llama-3.2-1B's layer shapes: 16 layers, hidden 2048, intermediate 8192, 32 attention heads and
8 key/value heads (GQA: k_proj and v_proj are 512 x 2048), bf16, all seven projections of every layer targeted
(112 modules, 1.95 GB of target weights per model). Its vocabulary is the synthetic one (128 tokens): the
fleet never reads embeddings. Adapters are rank 16, float32 (45 MB each).

Per N, in the same run: the floor (`bench/floor.py --write`: each module's two weights and each adapter read
once, the two batched GEMMs per module, each output written once; one process) and the fleet job
(`bench/run_case.py fleet`: local Ray with 2 CPUs, so 2 workers, started before the clock). Reported: both
times, every process's peak RSS (the driver, each worker, Ray's own processes) and all processes' PSS sum,
the MB the job read, and the seconds of each of the run's phases (its run record's `phase_s`), drawn as a
stacked bar chart beside the floor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from scale import HERE, PY, Case, fixture, measure  # bench/ is this script's directory, so on its path

LLAMA_32_1B = {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8}
QUICK = {**LLAMA_32_1B, "layers": 4}
PHASES = ("plan", "ray", "preflight", "score", "assemble", "commit")  # the run's phases (no gate here)


def run(spec: dict, ns: list[int], work: Path) -> list[dict]:
    case = Case("whole-model", spec, tuple(ns), repeats=1)
    root = fixture(work, case, max(ns))
    names = sorted(p.name for p in (root / "finetuned").iterdir())
    rows = []
    for n in ns:
        subset = ",".join(names[:n])
        floor = measure([PY, str(HERE / "floor.py"), "--fixture", str(root), "--adapters", subset,
                         "--write", str(work / "runs" / "floor-out")])
        out = work / "runs" / f"n{n}"
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir(parents=True)
        ours = measure([PY, str(HERE / "run_case.py"), "fleet", "--fixture", str(root), "--adapters", subset,
                        "--out", str(out)])
        shutil.rmtree(out.parent, ignore_errors=True)  # 256 outputs are 11.5 GB
        row = {"n": n, "layers": spec["layers"], "modules": 7 * spec["layers"],
               "floor_s": floor.result["work_s"][0], "ours_s": ours.result["work_s"][0],
               "ray_start_s": ours.result["ray_start_s"], "phase_s": ours.result["phase_s"][0],
               "mb_read": ours.result["bytes_read"] / 1e6, "floor_mb_read": floor.result["bytes_read"] / 1e6,
               "floor_peak_mb": floor.driver / 1e6, "total_pss_mb": ours.total_pss / 1e6,
               "processes_mb": [(name, peak / 1e6) for name, peak in ours.processes]}
        row["ours_over_floor"] = row["ours_s"] / row["floor_s"]
        rows.append(row)
        print(f"  N={n:<4} floor {row['floor_s']:7.1f} s  ours {row['ours_s']:7.1f} s ({row['ours_over_floor']:.2f}x)"
              f"  phases {row['phase_s']}  read {row['mb_read']:.0f} MB", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| N | floor s | ours s | ours/floor | " + " | ".join(f"{p} s" for p in PHASES)
             + " | MB read (floor / ours) | peak MB: floor / driver / workers / Ray's largest | PSS sum MB |",
             "|---" * (7 + len(PHASES)) + "|"]
    for r in rows:
        procs = r["processes_mb"]
        workers = "+".join(f"{mb:.0f}" for name, mb in procs if name == "worker")
        ray_own = max((mb for name, mb in procs if name not in ("driver", "worker")), default=0.0)
        driver = next(mb for name, mb in procs if name == "driver")
        lines.append(f"| {r['n']} | {r['floor_s']:.1f} | {r['ours_s']:.1f} | {r['ours_over_floor']:.2f} | "
                     + " | ".join(f"{r['phase_s'].get(p, 0.0):.1f}" for p in PHASES)
                     + f" | {r['floor_mb_read']:.0f} / {r['mb_read']:.0f} | {r['floor_peak_mb']:.0f} / {driver:.0f} / "
                     f"{workers} / {ray_own:.0f} | {r['total_pss_mb']:.0f} |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    """Each N's run as a bar stacked by phase, the floor's time beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2 + 0.3 * len(rows)))
    labels = []
    for i, r in enumerate(rows):
        left = 0.0
        for j, phase in enumerate(PHASES):
            s = r["phase_s"].get(phase, 0.0)
            ax.barh(2 * i, s, left=left, color=f"C{j}", label=phase if i == 0 else None)
            left += s
        ax.barh(2 * i + 1, r["floor_s"], color="0.6", label="floor" if i == 0 else None)
        labels += [f"fleet job, N = {r['n']}", f"floor, N = {r['n']}"]
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (2 CPU cores)")
    ax.set_title(f"Llama-3.2-1B-shaped pair ({rows[0]['modules']} modules), rank-16 adapters")
    ax.legend(ncols=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="64,256", help="comma-separated numbers of adapters")
    ap.add_argument("--quick", action="store_true", help="4 layers, N = 16")
    ap.add_argument("--work", type=Path, default=Path("build/bench-whole"))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--chart", type=Path, default=None, help="draw the phases to this PNG")
    args = ap.parse_args()
    spec, ns = (QUICK, [16]) if args.quick else (LLAMA_32_1B, [int(n) for n in args.ns.split(",")])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run(spec, ns, work)
    print()
    print(table(rows))
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.chart:
        chart(rows, args.chart)


if __name__ == "__main__":
    main()
