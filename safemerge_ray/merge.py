"""Merge decisions and per-layer merge arithmetic.

Which layers are repaired and how is `policy.py`; methods combine one module's fine-tune and safety LoRA
exactly as PEFT's `add_weighted_adapter` does for weights `[w_ft, w_safe]` on that layer (they call
`peft.utils.merge_utils`, so the arithmetic is PEFT's own). Every output layer is expressed with
scaling 1 (the output config has `r = lora_alpha` per module), as `add_weighted_adapter` does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SafeMergeError

Lora = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]), float32

SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSettings:
    policy: str = "safemerge"
    tau: float = 0.35
    weights: tuple[float, float] = (0.8, 0.2)  # (fine-tune, safety)
    method: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0
    select: str = "threshold"  # which layers are repaired: threshold (tau) | top_k | fraction (policy.py)
    select_value: float | None = None  # K for top_k, F for fraction
    svd_rank: int | None = None  # the *_svd methods' rank (None: the larger of the two LoRAs' ranks, as PEFT)

    def __post_init__(self):
        for name, check in FIELD_CHECKS.items():
            try:
                check(getattr(self, name))
            except ValueError as exc:
                raise SafeMergeError(f"{name} {exc}") from None
        if not any(self.weights):
            raise SafeMergeError("weights must not both be 0: the merged layer would be empty")
        if self.method in DENSITY_METHODS and self.density is None:
            raise SafeMergeError(f"method {self.method} needs a density in (0, 1] (e.g. 0.5)")
        _check_select(self.select, self.select_value)
        if self.svd_rank is not None and self.method not in SVD_METHODS:
            raise SafeMergeError(f"svd_rank applies to the svd methods ({', '.join(SVD_METHODS)}), not {self.method}")

    def to_dict(self) -> dict:
        """The settings a run records; settings added later are left out at their defaults, so outputs made
        before they existed keep their run keys."""
        d = asdict(self)
        if self.select == "threshold":
            del d["select"], d["select_value"]
        if self.svd_rank is None:
            del d["svd_rank"]
        return d


def _check_select(mode: str, value) -> None:
    from .policy import SELECTIONS

    if mode not in SELECTIONS:
        raise SafeMergeError(f"select must be one of {', '.join(SELECTIONS)}; got {mode!r}")
    if mode == "threshold" and value is not None:
        raise SafeMergeError("select threshold uses tau and takes no value")
    if mode == "top_k" and not (_number(value) and float(value).is_integer() and value >= 1):
        raise SafeMergeError(f"select top_k needs a whole number of layers >= 1; got {value!r}")
    if mode == "fraction" and not (_number(value) and 0 < value <= 1):
        raise SafeMergeError(f"select fraction needs a number in (0, 1]; got {value!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _check_choice(options):
    def check(v):
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {v!r}")
    return check


def _check_tau(v):
    # rho = ||V^T dW||^2 / (||C dW|| ||dW||) >= 0 because C is positive semi-definite.
    if not (_number(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"must be a number in [0, 1] (rho is a cosine >= 0); got {v!r}")


def _check_weights(v):
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(w) and 0.0 <= w <= 1.0 for w in v)):
        raise ValueError(f"must be two numbers in [0, 1], fine-tune then safety (e.g. 0.8,0.2); got {v!r}")


def _check_density(v):
    if v is not None and not (_number(v) and 0.0 < v <= 1.0):
        raise ValueError(f"must be in (0, 1]; got {v!r}")


def _check_svd_rank(v):
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"must be a whole number >= 1; got {v!r}")


def _check_seed(v):
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"must be a non-negative integer; got {v!r}")


# Per-field checks, shared by MergeSettings and the fleet config's field-by-field validation.
def _check_policy(v):
    from .policy import POLICIES

    _check_choice(tuple(POLICIES))(v)


FIELD_CHECKS: dict[str, Callable] = {
    "policy": _check_policy,
    "tau": _check_tau,
    "weights": _check_weights,
    "method": lambda v: _check_choice(tuple(METHODS))(v),
    "density": _check_density,
    "majority_sign_method": _check_choice(SIGN_METHODS),
    "seed": _check_seed,
    "svd_rank": _check_svd_rank,
}


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
    def method(loras: list[Lora], weighted: list[float], density, sign_method, rank) -> Lora:
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


def _cat(loras: list[Lora], weighted: list[float], density, sign_method, rank) -> Lora:
    # PEFT's cat: weight and scaling on A, ranks stacked; exact, whatever the ranks.
    return (torch.cat([a * w for (a, _), w in zip(loras, weighted, strict=True)], dim=0),
            torch.cat([b for _, b in loras], dim=1))


@functools.cache
def _peft_merge_utils():
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
    def call(*args):
        return getattr(_peft_merge_utils(), name)(*args)

    return call


def _svd(loras: list[Lora], weighted: list[float], density, sign_method, rank) -> Lora:
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
    def method(loras: list[Lora], weighted: list[float], density, sign_method, rank) -> Lora:
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


def _linear_batch(a: torch.Tensor, b: torch.Tensor, safety: Lora, weighted: torch.Tensor) -> Lora:
    """`linear` for N fine-tune layers at once ([N, r, in], [N, out, r]) with one safety layer, or one per
    fine-tune layer ([N, ...]); `weighted`: [N, 2] (weight x scaling per side). PEFT's arithmetic,
    elementwise: the same float32 values."""
    if a.shape[1] != safety[0].shape[-2]:
        raise SafeMergeError(f"ranks {sorted({a.shape[1], safety[0].shape[-2]})} cannot be combined element-wise; "
                             "use --method cat, which stacks ranks")
    wa = torch.copysign(weighted.abs().sqrt(), weighted).float()
    wb = weighted.abs().sqrt().float()
    # Stacked and summed as PEFT's task_arithmetic does (a sum from zero: -0 + -0 gives +0, as there).
    return (torch.stack([a * wa[:, 0, None, None], safety[0] * wa[:, 1, None, None]]).sum(dim=0),
            torch.stack([b * wb[:, 0, None, None], safety[1] * wb[:, 1, None, None]]).sum(dim=0))


def _cat_batch(a: torch.Tensor, b: torch.Tensor, safety: Lora, weighted: torch.Tensor) -> Lora:
    """`cat` for N fine-tune layers at once: ranks stacked, weight and scaling on A."""
    n, w = a.shape[0], weighted.float()
    return (torch.cat([a * w[:, 0, None, None], safety[0].expand(n, -1, -1) * w[:, 1, None, None]], dim=1),
            torch.cat([b, safety[1].expand(n, -1, -1)], dim=2))


# Merges whose B is a fixed linear map of the input Bs (a weighted sum; a concatenation), batched over many
# fine-tunes: applied to each layer's V V^T B in place of B, the map gives the merged layer's V V^T B, so
# scoring the repair's effect needs no second GEMM over V (and no merge per adapter).
LINEAR_IN_B: dict[str, Callable[[torch.Tensor, torch.Tensor, Lora, torch.Tensor], Lora]] = {
    "linear": _linear_batch,
    "cat": _cat_batch,
}


def module_seed(seed: int, module: str) -> int:
    """A seed per (run seed, module): DARE's drop is the same whatever order or process merges it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little") & (2**63 - 1)


def merged_layer(settings: MergeSettings, module: str, loras: list[Lora], scalings: list[float]) -> Lora:
    """One module's fine-tune and safety LoRA merged with `settings.weights`, PEFT's arithmetic."""
    weighted = [w * s for w, s in zip(settings.weights, scalings, strict=True)]
    rank = settings.svd_rank or max(a.shape[0] for a, _ in loras)  # PEFT's default: the largest rank
    merge = METHODS[settings.method]
    try:
        if settings.method not in RANDOM_METHODS:
            return merge(loras, weighted, settings.density, settings.majority_sign_method, rank)
        # PEFT's DARE draws from torch's global CPU generator (the factors are on the CPU); fork it so the
        # draw is seeded per module and leaves the caller's random state alone. Only the CPU generator is
        # seeded: `torch.manual_seed` also queues a CUDA seeding with a captured stack, 0.4 ms a call.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(module_seed(settings.seed, module))
            return merge(loras, weighted, settings.density, settings.majority_sign_method, rank)
    except SafeMergeError as exc:
        raise SafeMergeError(f"module {module}: {exc}") from None


def projected_layer(lora: Lora, scaling: float, projected_b: torch.Tensor) -> Lora:
    """SafeLoRA: B replaced by C B, A kept; scaling folded in as for a kept layer."""
    a, _ = kept_layer(lora, scaling)
    _, b = kept_layer((lora[0], projected_b), scaling)
    return a, b
