"""Merge methods: the per-layer arithmetic, pure functions behind one registry (`METHODS`).

Each method combines one module's fine-tune and safety LoRA exactly as PEFT's `add_weighted_adapter` does
for weights `[w_ft, w_safe]` on that layer (they call `peft.utils.merge_utils`, so the arithmetic is PEFT's
own). Every output layer is expressed with scaling 1 (the output config has `r = lora_alpha` per module),
as `add_weighted_adapter` does. Which layers are merged, and with which settings, is `policy.py`'s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SafeMergeError

Lora = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]), float32

SIGN_METHODS = ("total", "frequency")  # how ties and dare_ties elect the sign of each entry


def _sqrt_weights(weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT: sqrt(|w * scaling|) on both sides, the sign on the A side only.
    wa = [math.copysign(math.sqrt(abs(w)), w) for w in weights]
    wb = [math.sqrt(abs(w)) for w in weights]
    return torch.tensor(wa), torch.tensor(wb)


def kept_layer(lora: Lora, scaling: float) -> Lora:
    """The fine-tune's own update, rewritten with scaling 1; no method touches it."""
    (a, b), (wa, wb) = lora, _sqrt_weights([scaling])
    return a * wa[0], b * wb[0]


def kept_layers(a: torch.Tensor, b: torch.Tensor, scalings: list[float]) -> Lora:
    """`kept_layer` for N layers of one shape at once ([N, r, in], [N, out, r]): the same products."""
    wa, wb = _sqrt_weights(scalings)
    return a * wa[:, None, None], b * wb[:, None, None]


def _task_arithmetic_method(combine: Callable) -> Callable:
    def method(loras: list[Lora], weighted: list[float], density: float | None, sign_method: str,
            rank: int) -> Lora:
        ranks = {a.shape[0] for a, _ in loras}
        if len(ranks) != 1:
            raise SafeMergeError(
                f"ranks {sorted(ranks)} cannot be combined element-wise; use --method cat, which stacks ranks"
            )
        wa, wb = _sqrt_weights(weighted)
        a = combine([a for a, _ in loras], wa, density, sign_method)
        b = combine([b for _, b in loras], wb, density, sign_method)
        return a, b

    return method


def _cat(loras: list[Lora], weighted: list[float], density: float | None, sign_method: str,
            rank: int) -> Lora:
    # PEFT's cat: weight and scaling on A, ranks stacked; exact, whatever the ranks.
    return (torch.cat([a * w for (a, _), w in zip(loras, weighted, strict=True)], dim=0),
            torch.cat([b for _, b in loras], dim=1))


@functools.cache
def _peft_merge_utils() -> Any:
    """PEFT's own `peft/utils/merge_utils.py`, loaded by file.

    It is a leaf module (it imports only torch), but importing it as `peft.utils.merge_utils` runs
    PEFT's package import, which pulls in transformers and costs seconds in every fresh Ray worker.
    The parity tests compare the result against PEFT imported normally.
    """
    spec = importlib.util.find_spec("peft")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SafeMergeError("PEFT is not installed; it provides the merge arithmetic")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("safemerge_ray._peft_merge_utils", path)
    if module_spec is None or module_spec.loader is None or not path.is_file():
        raise SafeMergeError(f"PEFT's merge arithmetic is missing: no {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _peft(name: str) -> Callable:
    def call(*args: Any) -> Any:
        return getattr(_peft_merge_utils(), name)(*args)

    return call


def _svd(loras: list[Lora], weighted: list[float], density: float | None, sign_method: str,
            rank: int) -> Lora:
    """PEFT's `svd`: the weighted sum of the updates, truncated to `rank` by SVD, as (A = Vh, B = U S).

    The sum is B_cat A_cat (cat's exact factors, rank R = r_ft + r_safe), so its SVD comes from two QRs and
    the SVD of an R x R core: O((out + in) R^2), never the dense [out, in] update.
    """
    a_cat, b_cat = _cat(loras, weighted, density, sign_method, rank)
    q_b, r_b = torch.linalg.qr(b_cat.double())  # [out, R], [R, R]
    q_a, r_a = torch.linalg.qr(a_cat.double().T)  # [in, R], [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    return (vh[:k] @ q_a.T).float(), (q_b @ u[:, :k] * s[:k]).float()


def _dense_svd_method(combine: Callable) -> Callable:
    """PEFT's ties_svd, dare_*_svd, magnitude_prune_svd: they prune or drop entries of the dense updates,
    so those are formed; then the same truncated SVD."""
    def method(loras: list[Lora], weighted: list[float], density: float | None, sign_method: str,
            rank: int) -> Lora:
        deltas = [b @ a for a, b in loras]
        merged = combine(deltas, torch.tensor(weighted), density, sign_method)
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        return vh[:rank], u[:, :rank] * s[:rank]

    return method


METHODS: dict[str, Callable] = {
    "linear": _task_arithmetic_method(lambda t, w, d, s: _peft("task_arithmetic")(t, w)),
    "cat": _cat,
    "ties": _task_arithmetic_method(lambda t, w, d, s: _peft("ties")(t, w, d, s)),
    "dare_linear": _task_arithmetic_method(lambda t, w, d, s: _peft("dare_linear")(t, w, d)),
    "dare_ties": _task_arithmetic_method(lambda t, w, d, s: _peft("dare_ties")(t, w, d, s)),
    "magnitude_prune": _task_arithmetic_method(lambda t, w, d, s: _peft("magnitude_prune")(t, w, d)),
    "svd": _svd,
    "ties_svd": _dense_svd_method(lambda t, w, d, s: _peft("ties")(t, w, d, s)),
    "dare_linear_svd": _dense_svd_method(lambda t, w, d, s: _peft("dare_linear")(t, w, d)),
    "dare_ties_svd": _dense_svd_method(lambda t, w, d, s: _peft("dare_ties")(t, w, d, s)),
    "magnitude_prune_svd": _dense_svd_method(lambda t, w, d, s: _peft("magnitude_prune")(t, w, d)),
}
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune_svd")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")  # DARE draws its drops


def _check_ranks(rank: int, safety_rank: int) -> None:
    if rank != safety_rank:
        raise SafeMergeError(f"ranks {sorted({rank, safety_rank})} cannot be combined element-wise; "
                             "use --method cat, which stacks ranks")


def _weighted_sum(x: torch.Tensor, safety: torch.Tensor, wx: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """x * wx + safety * ws per layer ([N, ...] with [N] weights), bit for bit PEFT's task_arithmetic, which stacks
    and sums from zero; `+ 0.0` makes -0 + -0 read +0 as that sum does. In place: two allocations, not five (each
    is a fresh mmap of tens of MB here, and its page faults cost more than the arithmetic)."""
    out = x * wx[:, None, None]
    out.add_(safety * ws[:, None, None])
    return out.add_(0.0)


def _linear_a(a: torch.Tensor, safety_a: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    _check_ranks(a.shape[1], safety_a.shape[-2])
    wa = torch.copysign(weighted.abs().sqrt(), weighted).float()
    return _weighted_sum(a, safety_a, wa[:, 0], wa[:, 1])


def _linear_b(b: torch.Tensor, safety_b: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    _check_ranks(b.shape[2], safety_b.shape[-1])
    wb = weighted.abs().sqrt().float()
    return _weighted_sum(b, safety_b, wb[:, 0], wb[:, 1])


def _cat_a(a: torch.Tensor, safety_a: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    w = weighted.float()  # weight and scaling on A; ranks stacked
    return torch.cat([a * w[:, 0, None, None], safety_a.expand(a.shape[0], -1, -1) * w[:, 1, None, None]], dim=1)


def _cat_b(b: torch.Tensor, safety_b: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    return torch.cat([b, safety_b.expand(b.shape[0], -1, -1)], dim=2)


@dataclass(frozen=True)
class LinearInB:
    """A merge of N fine-tune layers at once ([N, r, in], [N, out, r]) with one safety layer, or one per
    fine-tune layer ([N, ...]); `weighted`: [N, 2] (weight x scaling per side). PEFT's arithmetic,
    elementwise: the same float32 values. Its B is a fixed linear map of the input Bs (a weighted sum; a
    concatenation): applied to each layer's V V^T B in place of B (`b` alone), the map gives the merged
    layer's V V^T B, so scoring the repair's effect needs no second GEMM over V (and no merge per adapter)."""

    a: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    b: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, a: torch.Tensor, b: torch.Tensor, safety: Lora, weighted: torch.Tensor) -> Lora:
        return self.a(a, safety[0], weighted), self.b(b, safety[1], weighted)


LINEAR_IN_B: dict[str, LinearInB] = {
    "linear": LinearInB(_linear_a, _linear_b),
    "cat": LinearInB(_cat_a, _cat_b),
}


def module_seed(seed: int, module: str) -> int:
    """A seed per (run seed, module): DARE's drop is the same whatever order or process merges it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little") & (2**63 - 1)




def merge_layer(method: str, module: str, loras: list[Lora], weighted: list[float], density: float | None = None,
                sign_method: str = "total", rank: int | None = None, seed: int = 0) -> Lora:
    """One module's LoRAs combined by `method` with `weighted` (weight x scaling per LoRA), PEFT's arithmetic.
    `rank`: the svd methods' rank (default: the largest rank, as PEFT); `seed`: DARE's draw, per module."""
    rank = rank or max(a.shape[0] for a, _ in loras)
    merge = METHODS[method]
    try:
        if method not in RANDOM_METHODS:
            return merge(loras, weighted, density, sign_method, rank)
        # PEFT's DARE draws from torch's global CPU generator (the factors are on the CPU); fork it so the
        # draw is seeded per module and leaves the caller's random state alone. Only the CPU generator is
        # seeded: `torch.manual_seed` also queues a CUDA seeding with a captured stack, 0.4 ms a call.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(module_seed(seed, module))
            return merge(loras, weighted, density, sign_method, rank)
    except SafeMergeError as exc:
        raise SafeMergeError(f"module {module}: {exc}") from None


def projected_layer(lora: Lora, scaling: float, projected_b: torch.Tensor) -> Lora:
    """SafeLoRA: B replaced by C B, A kept; scaling folded in as for a kept layer."""
    a, _ = kept_layer(lora, scaling)
    _, b = kept_layer((lora[0], projected_b), scaling)
    return a, b
