"""The floor: read each target module's two weights once, each adapter's file once, do the batched GEMMs
for all adapters, and (with --write) write each adapter's output once.

Nothing else: no decisions, no merging, no verification. This is the irreducible work of a fleet run; the
output is as large as the fine-tune (a repaired adapter holds the same tensors), so the floor writes each
adapter's bytes once to DIR (removed afterwards). On a fleet of many small layers that write is most of it.

With --second-projection, SafeLoRA's floor: it also projects every P = V V^T B again, V V^T P, as the rho of a
layer SafeLoRA repairs (B -> C B) needs (an upper bound: it counts every layer as repaired).

    python bench/floor.py --fixture DIR --adapters a,b,c [--write DIR] [--second-projection]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load

from safemerge_ray.io import BYTES_READ, Checkpoint, LocalDir

PREFIX, B_SUFFIX = "base_model.model.", ".lora_B.weight"


def run(fixture: Path, adapters: list[str], repeats: int = 1, write: Path | None = None,
        second: bool = False) -> dict:
    work = []
    for _ in range(repeats):
        before = BYTES_READ.total
        start = time.perf_counter()
        once(fixture, adapters, write, second)
        work.append(time.perf_counter() - start)
        if write is not None:
            shutil.rmtree(write, ignore_errors=True)
    return {"work_s": work, "bytes_read": BYTES_READ.total - before}


def once(fixture: Path, adapters: list[str], write: Path | None = None, second: bool = False) -> None:
    unaligned = Checkpoint(LocalDir(fixture / "unaligned"), "unaligned")
    aligned = Checkpoint(LocalDir(fixture / "aligned"), "aligned")
    # One read per adapter file; only the B factors are kept (the GEMMs need nothing else).
    bs: dict[str, list[torch.Tensor]] = {}
    for name in adapters:
        data = (fixture / "finetuned" / name / "adapter_model.safetensors").read_bytes()
        BYTES_READ.add(len(data))
        if write is not None:  # the output: as many bytes as the input
            write.mkdir(parents=True, exist_ok=True)
            (write / f"{name}.safetensors").write_bytes(data)
        for key, t in load(data).items():
            if key.endswith(B_SUFFIX):
                bs.setdefault(key[len(PREFIX):-len(B_SUFFIX)], []).append(t.float())
    for module, b in bs.items():
        v = aligned.read(f"{module}.weight").float() - unaligned.read(f"{module}.weight").float()
        p = v @ (v.T @ torch.cat(b, dim=1))
        if second:
            v @ (v.T @ p)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None, help="write each adapter's output here (removed after)")
    ap.add_argument("--second-projection", action="store_true", help="SafeLoRA's floor: project every P again")
    args = ap.parse_args()
    print(json.dumps(run(args.fixture, args.adapters.split(","), args.repeats, args.write, args.second_projection)))
