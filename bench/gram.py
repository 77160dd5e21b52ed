"""SafeLoRA's rho_after through a Gram matrix: is it exact, and what would it save? (Not built: BENCHMARKS.md.)

A layer SafeLoRA repairs has B' = C B = P / ||V||_F, P = V V^T B. Its rho needs V V^T B': a second projection
(what the fleet does). With X = V^T B kept from the first and G = V^T V (once per module), the same three traces
come from W = G X and G W alone: rho_after = tr(W^T W g) / sqrt(tr(X^T W g) tr(W^T G W g)), g = A A^T.

    python bench/gram.py [--out 11008] [--in 4096] [--columns 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from safemerge_ray.core import PANEL, project, rho_from_projections


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gram_rho_after(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rho of each repaired layer (A, C B) of [N, r, in], [N, out, r], through G = V^T V: float32 [N]."""
    g_a = a @ a.transpose(1, 2)
    x = v.T @ b  # [N, in, r]
    g = v.T @ v
    w = g @ x
    inner = ((w.transpose(1, 2) @ w) * g_a).sum(dim=(1, 2))
    norm_dw = ((x.transpose(1, 2) @ w) * g_a).sum(dim=(1, 2))
    norm_cdw = ((w.transpose(1, 2) @ (g @ w)) * g_a).sum(dim=(1, 2))
    return inner / torch.sqrt(norm_dw * norm_cdw)


def direct_rho_after(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fleet's way: project B, then the repaired B' = P / ||V||_F again."""
    b_repaired = project(v, b) / torch.linalg.matrix_norm(v)
    return rho_from_projections(a, b_repaired, project(v, b_repaired))


def run(out: int, inp: int, columns: int, rank: int = 16) -> dict:
    torch.manual_seed(0)
    v = torch.randn(out, inp)
    n = max(1, columns // rank)
    a, b = torch.randn(n, rank, inp) / inp ** 0.5, torch.randn(n, out, rank) / out ** 0.5
    error = float((gram_rho_after(v, a, b) - direct_rho_after(v, a, b)).abs().max())
    b_wide = torch.randn(out, n * rank)
    x = v.T @ b_wide
    g = v.T @ v

    def second_projection() -> None:  # what the fleet pays per column now: V (V^T P), in panels
        for k in range(0, n * rank, PANEL):
            v @ (v.T @ b_wide[:, k:k + PANEL])

    def gram_columns() -> None:  # what the Gram route pays per column: G X, then G W
        for k in range(0, n * rank, PANEL):
            g @ (g @ x[:, k:k + PANEL])

    return {"out": out, "in": inp, "columns": n * rank, "max_abs_rho_difference": error,
            "gram_s": _best(lambda: v.T @ v, 2), "second_projection_s": _best(second_projection),
            "gram_route_columns_s": _best(gram_columns)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=11008)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--columns", type=int, default=1024, help="N x r: 1024 is 64 adapters of rank 16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a fleet worker has one per CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args.out, args.inp, args.columns)))
