"""The floor: read each target module's two weights once and do the batched GEMMs for all adapters.

Nothing else: no decisions, no merging, no output. This is the irreducible work of a fleet run.

    python bench/floor.py --fixture DIR --adapters a,b,c
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from safemerge_ray.storage import BYTES_READ, LocalDir
from safemerge_ray.tensors import Checkpoint, SafetensorsFile


def run(fixture: Path, adapters: list[str], repeats: int = 1) -> dict:
    work = []
    for _ in range(repeats):
        before = BYTES_READ.total
        start = time.perf_counter()
        once(fixture, adapters)
        work.append(time.perf_counter() - start)
    return {"work_s": work, "bytes_read": BYTES_READ.total - before}


def once(fixture: Path, adapters: list[str]) -> None:
    unaligned = Checkpoint(LocalDir(fixture / "unaligned"), "unaligned")
    aligned = Checkpoint(LocalDir(fixture / "aligned"), "aligned")
    files = [SafetensorsFile(LocalDir(fixture / "finetuned" / name), "adapter_model.safetensors") for name in adapters]
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):-len(".lora_B.weight")] for k in files[0].tensors if k.endswith(".lora_B.weight")})
    for module in modules:
        v = aligned.read(f"{module}.weight").float() - unaligned.read(f"{module}.weight").float()
        b_wide = torch.cat([f.read(f"{prefix}{module}.lora_B.weight").float() for f in files], dim=1)
        v @ (v.T @ b_wide)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(run(args.fixture, args.adapters.split(","), args.repeats)))
