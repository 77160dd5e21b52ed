"""The projection GEMMs (P = V V^T B) as scoring makes them: fixed-shape panels of PANEL columns against one
wide GEMM of N * r columns (what scoring did before; its last bits depend on N) and one GEMM per adapter
(what SafeLoRA's projected B cost on top). Rank 16, float32, in the same run; the median of 3 after a warm-up.
Also the largest difference of the panels' P from the wide GEMM's, relative to the largest |P|.

    .venv/bin/python bench/projection.py [--quick]     # --quick: the 4096 x 4096 layer only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from safemerge_ray.core import PANEL, project

RANK = 16


def wide(v: torch.Tensor, b_all: torch.Tensor) -> torch.Tensor:
    n, out, r = b_all.shape
    return (v @ (v.T @ b_all.permute(1, 0, 2).reshape(out, n * r))).reshape(out, n, r).permute(1, 0, 2)


def per_adapter(v: torch.Tensor, b_all: torch.Tensor) -> torch.Tensor:
    return torch.stack([v @ (v.T @ b) for b in b_all])


def seconds(fn, v: torch.Tensor, b_all: torch.Tensor) -> float:
    fn(v, b_all)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn(v, b_all)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    gen = torch.Generator().manual_seed(0)
    print(f"PANEL = {PANEL}, rank {RANK}, {torch.get_num_threads()} threads")
    print(f"{'layer':>12} {'N':>4} {'wide s':>8} {'panels s':>9} {'per-adapter s':>14} {'panels/wide':>12} "
          f"{'max rel diff':>13}")
    for out, inp in shapes:
        v = torch.randn(out, inp, generator=gen)
        for n in (1, 16, 64, 256):
            b_all = torch.randn(n, out, RANK, generator=gen)
            t_wide, t_panels = seconds(wide, v, b_all), seconds(project, v, b_all)
            t_each = seconds(per_adapter, v, b_all) if n <= 64 else float("nan")
            p_wide, p_panels = wide(v, b_all), project(v, b_all)
            diff = ((p_wide - p_panels).abs().max() / p_wide.abs().max()).item()
            print(f"{out:>6}x{inp:<5} {n:>4} {t_wide:>8.3f} {t_panels:>9.3f} {t_each:>14.3f} "
                  f"{t_panels / t_wide:>12.2f} {diff:>13.1e}")


if __name__ == "__main__":
    main()
