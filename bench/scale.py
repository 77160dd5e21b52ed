"""The scale series: how a fleet run's memory and time grow with the number of adapters and modules.

    make bench-scale                   # everything below (about 25 minutes on a 2-core machine)
    make bench                         # the fleet benchmark (bench/fleet_bench.py), then this
    python bench/scale.py --quick      # N = 16, 64 on the wide layer; 32 small layers x 64 adapters

Cases, each on a synthetic fleet (bf16 weights, rank 16 fp32 adapters, all seven projections):
- wide:      one layer of hidden 4096, intermediate 11008; N = 16, 64, 256, 1024 (policy safemerge)
- safelora:  the same layer, N = 64 and 512, policy safelora against policy safemerge (time, the driver's peak),
             and against SafeLoRA's own floor (`floor.py --second-projection`)
- narrow:    two layers of hidden 2048, intermediate 5504 (the fleet benchmark's smaller model); N = 16, 64
- small:     128 layers of hidden 64 with 256 adapters (per-pair costs)
- llama3-8b: one Llama-3-8B layer (hidden 4096, intermediate 14336, GQA: 32 heads, 8 k/v heads); N = 16, 64
- qwen2-7b:  one Qwen2-7B layer (hidden 3584, intermediate 18944, 28 heads, 4 k/v heads, q/k/v biases); N = 16, 64

Each case is a fresh process (`bench/run_case.py fleet`: local Ray with 2 CPUs, so 2 workers) that runs the
fleet job `runs` times (medians; the long cases once), each into a fresh output; a sampler
reads the resident set size (RSS) of that process and of every process under it every 20 ms (their PSS
every second) and keeps each one's peak: the driver (the process itself), the largest worker
(`ray::FleetWorker`), and the sum of proportional set sizes of all of them (Ray's own processes included).
The floor (`bench/floor.py --write`) is the same fleet's irreducible work in one process: each module's two
weights and each adapter file read once, the two batched GEMMs per module, and each output adapter written once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
PSS_EVERY = 50  # RSS samples (20 ms apart) per PSS sample
PY = sys.executable


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict  # SynthSpec fields
    ns: tuple[int, ...]
    policies: tuple[str, ...] = ("safemerge",)
    repeats: int = 3  # times floor and ours run (medians reported); one for the long cases


WIDE = {"hidden": 4096, "intermediate": 11008, "layers": 1, "heads": 32}
CASES = [
    Case("wide", WIDE, (16, 64)),
    Case("wide", WIDE, (256, 1024), repeats=1),
    Case("safelora", WIDE, (64,), ("safemerge", "safelora")),
    Case("safelora", WIDE, (512,), ("safemerge", "safelora"), repeats=1),
    Case("narrow", {"hidden": 2048, "intermediate": 5504, "layers": 2, "heads": 16}, (16, 64)),
    Case("small", {"hidden": 64, "intermediate": 128, "layers": 128, "heads": 4}, (256,)),
    Case("llama3-8b", {"hidden": 4096, "intermediate": 14336, "layers": 1, "heads": 32, "kv_heads": 8}, (16, 64)),
    Case("qwen2-7b", {"arch": "qwen2", "hidden": 3584, "intermediate": 18944, "layers": 1, "heads": 28,
                      "kv_heads": 4}, (16, 64)),
]
QUICK = [
    Case("wide", WIDE, (16, 64), repeats=1),
    Case("small", {"hidden": 64, "intermediate": 128, "layers": 32, "heads": 4}, (64,), repeats=1),
]


@dataclass
class Peaks:
    wall_s: float
    driver: int  # bytes, RSS
    worker: int  # the largest FleetWorker's RSS
    total_pss: int  # all processes together
    result: dict
    processes: list[tuple[str, int]]  # every process's (label, peak RSS), largest first


def label(proc: psutil.Process, root: psutil.Process) -> str:
    """What a process is: the driver (the measured process), a fleet worker, or Ray's own (raylet, GCS, ...)."""
    if proc.pid == root.pid:
        return "driver"
    cmdline = " ".join(proc.cmdline())
    if "FleetWorker" in cmdline or proc.name().startswith("ray::FleetWork"):  # (the name, as a worker exits)
        return "worker"
    for part in ("gcs_server", "raylet", "dashboard_agent", "runtime_env_agent", "log_monitor", "monitor.py",
                 "dashboard.py", "ray::IDLE", "default_worker"):
        if part in cmdline:
            return part.removesuffix(".py")
    return proc.name()


def measure(cmd: list[str]) -> Peaks:
    """Run `cmd`; sample each process of its tree (RSS) and the tree's PSS sum; keep the peaks."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    rss: dict[int, int] = {}
    workers: set[int] = set()
    labels: dict[int, str] = {}
    total = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal total
        pss_every = 0
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            pss = 0
            for p in procs:
                try:
                    rss[p.pid] = max(rss.get(p.pid, 0), p.memory_info().rss)
                    if labels.get(p.pid) != "worker":  # a Ray worker process is IDLE until it becomes an actor
                        labels[p.pid] = label(p, root)
                    if labels[p.pid] == "worker":
                        workers.add(p.pid)
                    if pss_every == 0:
                        pss += p.memory_full_info().pss
                except (psutil.Error, AttributeError):
                    pass
            if pss_every == 0:
                total = max(total, pss)
            # PSS makes the kernel walk each process's page tables: ~25 ms of CPU for a 1 GB worker, so every 40 ms
            # over ten processes it took most of a core from what was measured. Every second; RSS every 20 ms.
            pss_every = (pss_every + 1) % PSS_EVERY
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    processes = sorted(((labels.get(pid, "?"), peak) for pid, peak in rss.items()), key=lambda lp: -lp[1])
    return Peaks(wall, rss.get(proc.pid, 0), max((rss[p] for p in workers), default=0), total,
                 json.loads(out.strip().splitlines()[-1]), processes)


def fixture(work: Path, case: Case, n: int) -> Path:
    from safemerge_ray.synthetic import SynthSpec, build_fixture

    spec = SynthSpec(rank=16, dtype="bfloat16", **case.spec)
    root = work / "fixtures" / "-".join(f"{k}{v}" for k, v in sorted(case.spec.items())) / f"n{n}"
    if not (root / "safety" / "adapter_model.safetensors").exists():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        build_fixture(root, spec, n_finetunes=n)
        print(f"  (fixture {root.name}: {time.perf_counter() - t:.0f} s)", flush=True)
    return root


def run_case(case: Case, work: Path) -> list[dict]:
    root = fixture(work, case, 1024 if case.spec == WIDE else max(case.ns))  # the wide cases share one fleet
    names = sorted(p.name for p in (root / "finetuned").iterdir())
    rows = []
    for n in case.ns:
        subset = ",".join(names[:n])
        floor_cmd = [PY, str(HERE / "floor.py"), "--fixture", str(root), "--adapters", subset,
                     "--repeats", str(case.repeats), "--write", str(work / "runs" / "floor-out")]
        floor = measure(floor_cmd)
        # SafeLoRA's own floor adds the second projection its repaired layers' rho needs.
        floor2 = measure([*floor_cmd, "--second-projection"]) if "safelora" in case.policies else None
        for policy in case.policies:
            out = work / "runs" / f"{case.name}-n{n}-{policy}"
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir(parents=True)
            ours = measure([PY, str(HERE / "run_case.py"), "fleet", "--fixture", str(root), "--adapters", subset,
                            "--out", str(out), "--policy", policy, "--repeats", str(case.repeats)])
            shutil.rmtree(out.parent, ignore_errors=True)  # N = 1024 wide layers write 5 GB
            row = {"case": case.name, "n": n, "policy": policy, "modules": 7 * case.spec["layers"],
                   "repeats": case.repeats, "floor_s": statistics.median(floor.result["work_s"]),
                   "ours_s": statistics.median(ours.result["work_s"]),
                   "floor_range_s": [min(floor.result["work_s"]), max(floor.result["work_s"])],
                   "ours_range_s": [min(ours.result["work_s"]), max(ours.result["work_s"])],
                   "driver_mb": ours.driver / 1e6, "worker_mb": ours.worker / 1e6,
                   "total_pss_mb": ours.total_pss / 1e6, "floor_peak_mb": floor.driver / 1e6,
                   "phase_s": ours.result.get("phase_s", [{}])[0]}
            row["ours_over_floor"] = row["ours_s"] / row["floor_s"]
            if floor2 is not None and policy == "safelora":
                row["safelora_floor_s"] = statistics.median(floor2.result["work_s"])
                row["ours_over_safelora_floor"] = row["ours_s"] / row["safelora_floor_s"]
            rows.append(row)
            own_floor = (f"  (SafeLoRA's floor {row['safelora_floor_s']:.2f} s: {row['ours_over_safelora_floor']:.2f}x)"
                         if "safelora_floor_s" in row else "")
            print(f"  {case.name:<10} N={n:<5} {policy:<9} floor {row['floor_s']:7.2f} s  ours {row['ours_s']:7.2f} s "
                  f"({row['ours_over_floor']:.2f}x)  worker {row['worker_mb']:6.0f} MB  driver {row['driver_mb']:5.0f} "
                  f"MB  all {row['total_pss_mb']:6.0f} MB{own_floor}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | modules | N | policy | runs | floor s | ours s | ours/floor | largest worker MB | driver MB "
             "| all processes MB (PSS) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['modules']} | {r['n']} | {r['policy']} | {r.get('repeats', 1)} "
                     f"| {r['floor_s']:.2f} | {r['ours_s']:.2f} | {r['ours_over_floor']:.2f} | {r['worker_mb']:.0f} "
                     f"| {r['driver_mb']:.0f} | {r['total_pss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--max-n", type=int, default=None, help="leave out the cases' larger N")
    ap.add_argument("--work", type=Path, default=Path("build/bench-scale"))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    cases = QUICK if args.quick else CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c.name in wanted]
    if args.max_n:
        cases = [replace(c, ns=tuple(n for n in c.ns if n <= args.max_n)) for c in cases]
        cases = [c for c in cases if c.ns]
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [row for case in cases for row in run_case(case, args.work)]
    print()
    print(table(rows))
    print(f"\n{psutil.cpu_count()} CPUs, {time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
