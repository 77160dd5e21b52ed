"""The floor: read each target module's two weights once, each adapter's file once, and do the batched
GEMMs for all adapters.

Nothing else: no decisions, no merging, no output. This is the irreducible work of a fleet run.

    python bench/floor.py --fixture DIR --adapters a,b,c
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load

from safemerge_ray.storage import BYTES_READ, LocalDir
from safemerge_ray.tensors import Checkpoint

PREFIX, B_SUFFIX = "base_model.model.", ".lora_B.weight"


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
    # One read per adapter file; only the B factors are kept (the GEMMs need nothing else).
    bs: dict[str, list[torch.Tensor]] = {}
    for name in adapters:
        data = (fixture / "finetuned" / name / "adapter_model.safetensors").read_bytes()
        BYTES_READ.add(len(data))
        for key, t in load(data).items():
            if key.endswith(B_SUFFIX):
                bs.setdefault(key[len(PREFIX):-len(B_SUFFIX)], []).append(t.float())
    for module, b in bs.items():
        v = aligned.read(f"{module}.weight").float() - unaligned.read(f"{module}.weight").float()
        v @ (v.T @ torch.cat(b, dim=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(run(args.fixture, args.adapters.split(","), args.repeats)))
