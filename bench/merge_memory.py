"""Peak memory of `safemerge-ray merge` against model size: it must track the largest module, not the model.

Builds two bf16 Llama-style model pairs that differ only in depth (L and 2L layers), runs the merge
CLI on each under `/usr/bin/time -v`, and prints model size, peak RSS and wall time.

    .venv/bin/python bench/merge_memory.py --hidden 1024 --layers 12 --work build/bench-mem
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from safemerge_ray.synthetic import SynthSpec, build_fixture


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _time_field(pattern: str, report: str) -> str:
    """One field of GNU time's -v report."""
    found = re.search(pattern, report)
    if found is None:
        raise SystemExit(f"/usr/bin/time -v printed no {pattern!r}; is GNU time installed?")
    return found.group(1)


def run_merge(fx: Path, out: Path) -> tuple[int, float]:
    cli = Path(sys.executable).parent / "safemerge-ray"
    cmd = ["/usr/bin/time", "-v", str(cli), "merge", "--unaligned", str(fx / "unaligned"),
           "--aligned", str(fx / "aligned"), "--safety-adapter", str(fx / "safety"),
           "--finetuned", str(fx / "finetuned" / "gsm8k"), "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss_kb = int(_time_field(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr))
    wall = _time_field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)
    minutes, seconds = wall.rsplit(":", 1)
    return rss_kb * 1024, float(minutes.split(":")[-1]) * 60 + float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--work", default="build/bench-mem")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for depth in (args.layers, 2 * args.layers):
        fx = work / f"L{depth}"
        if not (fx / "safety").exists():
            build_fixture(fx, SynthSpec(hidden=args.hidden, intermediate=args.intermediate, layers=depth,
                                        heads=args.hidden // 64, rank=16, dtype="bfloat16",
                                        max_shard_size="200MB"))
        largest = 2 * 2 * args.hidden * args.intermediate  # a gate/up/down weight, bf16, both models
        rss, wall = run_merge(fx, work / f"out-L{depth}")
        rows.append((depth, model_bytes(fx / "aligned"), largest, rss, wall))
    imports = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", "import safemerge_ray.engine.merge_command, safemerge_ray.cli"],
        capture_output=True, text=True, check=True).stderr
    import_rss = int(_time_field(r"Maximum resident set size \(kbytes\): (\d+)", imports)) * 1024
    print(f"peak RSS of the imports alone (torch, peft, transformers): {import_rss / 1e6:.0f} MB")
    print(f"{'layers':>6} {'model (MB)':>11} {'pair (MB)':>10} {'largest module pair (MB)':>25} "
          f"{'peak RSS (MB)':>14} {'wall (s)':>9}")
    for depth, size, largest, rss, wall in rows:
        print(f"{depth:>6} {size / 1e6:>11.0f} {2 * size / 1e6:>10.0f} {largest / 1e6:>25.1f} "
              f"{rss / 1e6:>14.0f} {wall:>9.1f}")


if __name__ == "__main__":
    main()
