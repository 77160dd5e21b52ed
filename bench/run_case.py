"""One measured case, run in its own process by bench/fleet_bench.py; prints a JSON line.

    python bench/run_case.py fleet --fixture DIR --adapters a,b --out DIR
    python bench/run_case.py merge --fixture DIR --adapters a --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def fleet(fixture: Path, adapters: list[str], out: Path, repeats: int, policy: str = "safemerge") -> dict:
    """Start a local Ray once, then run the fleet job `repeats` times, each into a fresh output."""
    import ray

    from safemerge_ray.fleet import run_fleet
    from safemerge_ray.fleet.config import load_config

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    work, bytes_read, run_dirs, phases = [], [], [], []
    for i in range(repeats):
        config_path = out.parent / f"{out.name}-{i}.yaml"
        config_path.write_text(yaml.safe_dump({
            "unaligned_model": str(fixture / "unaligned"), "aligned_model": str(fixture / "aligned"),
            "safety_adapter": str(fixture / "safety"), "output": f"{out}-{i}",
            "finetuned": [str(fixture / "finetuned" / a) for a in adapters], "merge": {"policy": policy},
        }))
        t = time.perf_counter()
        report = run_fleet(load_config(config_path), progress=False)
        work.append(time.perf_counter() - t)
        assert report.exit_code == 0, [(a.ref.name, a.reason) for a in report.adapters]
        bytes_read.append(report.bytes_read)
        phases.append(getattr(report.record, "phase_s", {}))  # (a commit before phases were timed has none)
        run_dirs.append(f"{out}-{i}/runs/{report.run_id}")
    ray.shutdown()
    return {"work_s": work, "ray_start_s": ray_start, "bytes_read": bytes_read[0], "run_dirs": run_dirs,
            "phase_s": phases}


def merge(fixture: Path, adapters: list[str], out: Path, repeats: int = 1, policy: str = "safemerge") -> dict:
    from safemerge_ray.core import MergeSettings
    from safemerge_ray.engine import merge_to_dir
    from safemerge_ray.io import BYTES_READ

    (name,) = adapters
    start = time.perf_counter()
    merge_to_dir(unaligned=str(fixture / "unaligned"), aligned=str(fixture / "aligned"),
                 safety_adapter=str(fixture / "safety"), finetuned=str(fixture / "finetuned" / name),
                 out=str(out), settings=MergeSettings(policy=policy), progress=False)
    return {"work_s": [time.perf_counter() - start], "bytes_read": BYTES_READ.total}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fleet", "merge"])
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--policy", default="safemerge")
    args = ap.parse_args()
    result = {"fleet": fleet, "merge": merge}[args.mode](args.fixture, args.adapters.split(","), args.out,
                                                        args.repeats, args.policy)
    print(json.dumps(result))
