"""Wall time of one fleet job against `safemerge-ray merge` once per adapter, in one measurement run.

    .venv/bin/python bench/fleet_vs_merge.py --adapters 16 --hidden 1024 --layers 12

Both sides run as a user would run them, as fresh processes: `safemerge-ray fleet` (which starts a
local Ray) and N sequential `safemerge-ray merge` calls. The fleet's outputs are checked to be
byte-identical to the merges'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safemerge_ray.synthetic import SynthSpec, build_fixture, write_fleet_config

CLI = str(Path(sys.executable).parent / "safemerge-ray")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--work", default="build/bench-fleet")
    args = ap.parse_args()
    root = Path(args.work) / f"h{args.hidden}-L{args.layers}-n{args.adapters}"
    if not (root / "fleet.yaml").exists():
        build_fixture(root, SynthSpec(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                                      heads=args.hidden // 64, rank=16, dtype="bfloat16", max_shard_size="200MB"),
                      n_finetunes=args.adapters)
        write_fleet_config(root)
    shutil.rmtree(root / "merged", ignore_errors=True)
    shutil.rmtree(root / "single", ignore_errors=True)
    names = sorted(p.name for p in (root / "finetuned").iterdir())
    model_mb = sum(p.stat().st_size for p in (root / "aligned").glob("*.safetensors")) / 1e6

    fleet_s = timed([CLI, "fleet", "--config", str(root / "fleet.yaml"), "--quiet"])
    (root / "single").mkdir()
    loop_s = sum(timed([CLI, "merge", "--unaligned", str(root / "unaligned"), "--aligned", str(root / "aligned"),
                        "--safety-adapter", str(root / "safety"), "--finetuned", str(root / "finetuned" / n),
                        "--out", str(root / "single" / n), "--quiet"]) for n in names)

    pointer = json.loads((root / "merged" / "latest" / f"{names[0]}.json").read_text())
    for n in names:
        fleet_file = root / "merged" / pointer["path"].replace(names[0], n) / "adapter_model.safetensors"
        assert fleet_file.read_bytes() == (root / "single" / n / "adapter_model.safetensors").read_bytes(), n
    print(f"model pair: 2 x {model_mb:.0f} MB bf16, {args.layers} layers, hidden {args.hidden}; "
          f"{len(names)} adapters (rank 16, all 7 projections)")
    print(f"fleet job (local Ray, incl. start-up): {fleet_s:7.1f} s")
    print(f"merge x {len(names):<3} (sequential):       {loop_s:7.1f} s")
    print(f"speed-up: {loop_s / fleet_s:.1f}x; outputs byte-identical")


if __name__ == "__main__":
    main()
