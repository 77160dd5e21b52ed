"""The safety subspace and the SafeMERGE similarity `rho`, computed without ever forming `C`.

Per target module, with `V = W_aligned - W_unaligned` ([out, in]) and the public tool's
`C = V V^T / ||V||_F`, a LoRA update `dW = B A` scores

    rho = cos(vec(C dW), vec(dW)).

`C` is [out, out] and cubic to build. With `P = V (V^T B)` ([out, r]) and `G = A A^T` ([r, r]):

    <C dW, dW> ∝ tr(B^T P G),  ||C dW||^2 ∝ tr(P^T P G),  ||dW||^2 = tr(B^T B G)

(the common factor 1/||V||_F cancels in the cosine; so does the LoRA scaling), which costs
O(out * in * r) per adapter, and for N adapters of one module is GEMMs over N * r columns (`project`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SafeMergeError


def check_same_shape(module: str, aligned: tuple, unaligned: tuple) -> None:
    if aligned != unaligned:
        raise SafeMergeError(
            f"module {module}: aligned weight is {list(aligned)} but unaligned weight is "
            f"{list(unaligned)}; the two models must share an architecture"
        )


def alignment_delta(w_aligned: torch.Tensor, w_unaligned: torch.Tensor, module: str,
                    device: str = "cpu") -> torch.Tensor:
    """V = W_aligned - W_unaligned in float32, on `device`, checked for shape and NaN/Inf."""
    check_same_shape(module, tuple(w_aligned.shape), tuple(w_unaligned.shape))
    # Storage dtype (bf16/fp16) crosses to the device; the difference is taken in float32 there,
    # in place (one float32 buffer, not three).
    v = w_aligned.to(device, non_blocking=True).float()
    v.sub_(w_unaligned.to(device, non_blocking=True))
    # One reduction finds any NaN/Inf (they poison the sum); the exact culprit is looked up only then.
    total = v.sum()
    if not torch.isfinite(total):
        side = "aligned" if not torch.isfinite(w_aligned).all() else "unaligned"
        raise SafeMergeError(f"module {module}: the {side} model's weight contains NaN or Inf")
    if total == 0 and not v.any():  # no safety subspace: every rho 0, every layer repaired, silently
        raise SafeMergeError(f"module {module}: the aligned and unaligned weights are identical (V = 0); is the "
                             "unaligned model the pre-alignment base of the aligned one?")
    return v


def lora_rho(v: torch.Tensor, loras: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """rho for every (A, B) against one module's V, batched: returns float32 [N] on CPU.

    Ranks may differ: adapters are zero-padded to the largest rank, which changes no trace.
    A zero update (or one with no component in V's row space) scores 0, as torch's
    cosine_similarity does for a zero vector.
    """
    a_all, b_all = stack_factors(loras, v.device)
    return rho_from_projections(a_all, b_all, project(v, b_all))


def stack_factors(loras: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, r, in], [N, out, r]) on `device`, zero-padded to the largest rank where ranks differ."""
    r_max = max(a.shape[0] for a, _ in loras)
    if all(a.shape[0] == r_max for a, _ in loras):  # one rank (the fleet groups adapters by rank): no padding
        return torch.stack([a for a, _ in loras]).to(device), torch.stack([b for _, b in loras]).to(device)
    n, (out, inp) = len(loras), (loras[0][1].shape[0], loras[0][0].shape[1])
    a_all = torch.zeros(n, r_max, inp, device=device)
    b_all = torch.zeros(n, out, r_max, device=device)
    for i, (a, b) in enumerate(loras):
        a_all[i, : a.shape[0]] = a
        b_all[i, :, : b.shape[1]] = b
    return a_all, b_all


# Columns of B per projection GEMM. A GEMM's result for one column depends on the GEMM's shape (BLAS picks its
# kernels and blocking by shape), not on the columns beside it: with every GEMM one fixed shape, an adapter's P
# has the same bits alone (`merge`) and in any batch of any fleet. At 128 a fleet's GEMMs run within 10-27% of
# one wide GEMM (BENCHMARKS.md: projection) while `merge` of one rank-16 adapter pays for 8x its own columns.
PANEL = 128


def project(v: torch.Tensor, b_all: torch.Tensor) -> torch.Tensor:
    """P = V (V^T B) for every B of [N, out, r], shared by every adapter: B's N * r columns side by side, in
    GEMMs of PANEL columns each (the last panel zero-padded), so that V is read once per panel."""
    n, out, r = b_all.shape
    width = n * r
    panels = -(-width // PANEL)
    b_wide = torch.zeros(out, panels * PANEL, dtype=v.dtype, device=v.device)
    b_wide[:, :width] = b_all.permute(1, 0, 2).reshape(out, width)
    p_wide = torch.empty_like(b_wide)
    for k in range(0, panels * PANEL, PANEL):
        p_wide[:, k:k + PANEL] = v @ (v.T @ b_wide[:, k:k + PANEL])
    return p_wide[:, :width].reshape(out, n, r).permute(1, 0, 2)


def rho_from_projections(a_all: torch.Tensor, b_all: torch.Tensor, p_all: torch.Tensor) -> torch.Tensor:
    """rho from each update's factors and P = V V^T B: traces of r x r products only (float32 [N] on CPU)."""
    g = a_all @ a_all.transpose(1, 2)  # [N, r, r], symmetric, so tr(X G) = sum(X * G)
    bt = b_all.transpose(1, 2)
    inner = ((bt @ p_all) * g).sum(dim=(1, 2))
    norm_dw = ((bt @ b_all) * g).sum(dim=(1, 2))
    norm_cdw = ((p_all.transpose(1, 2) @ p_all) * g).sum(dim=(1, 2))
    denom = torch.sqrt(norm_dw.clamp_min(0) * norm_cdw.clamp_min(0))
    rho = torch.where(denom > 0, inner / denom, torch.zeros_like(inner))
    return rho.clamp(-1.0, 1.0).cpu()


def project_lora_b(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SafeLoRA's projected B: C B = V (V^T B) / ||V||_F, float32 on CPU (the bits a fleet's batch gives it)."""
    return safelora_b(project(v, b.to(v.device, torch.float32)[None])[0], torch.linalg.matrix_norm(v))


def safelora_b(p: torch.Tensor, v_norm: torch.Tensor) -> torch.Tensor:
    """C B from an adapter's P = V V^T B (`project`) and ||V||_F: float32 on CPU."""
    return (p / v_norm).contiguous().cpu()


def rho_reference(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """The direct definition, forming C in float64: the yardstick for `lora_rho`, not for real use."""
    v, a, b = v.double(), a.double(), b.double()
    c = v @ v.T / torch.linalg.matrix_norm(v)
    dw = b @ a
    return float(torch.nn.functional.cosine_similarity((c @ dw).reshape(1, -1), dw.reshape(1, -1)))
