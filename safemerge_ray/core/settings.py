"""The merge settings, declared once: each field carries its help and its check.

The fleet config's `merge:` and `overrides:` sections and `merge`'s command-line flags are built from these
fields (`options.py`), so a setting, its default, its help and its check live here alone. The names of the
policies and selections are enums here; their registries (`policy.py`) are keyed by them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from ..errors import SafeMergeError
from .methods import DENSITY_METHODS, METHODS, SIGN_METHODS, SVD_METHODS


class PolicyName(StrEnum):
    """How a selected layer is repaired."""

    SAFEMERGE = "safemerge"  # merged with the safety adapter's layer
    SAFELORA = "safelora"  # its B projected onto the safety subspace (C B)


class Selection(StrEnum):
    """Which layers of an adapter are repaired."""

    THRESHOLD = "threshold"  # rho below tau (the papers' rule)
    TOP_K = "top_k"  # the K layers with the lowest rho
    FRACTION = "fraction"  # the ceil(F x layers) layers with the lowest rho


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _check_choice(options: tuple[str, ...]) -> Callable[[object], None]:
    def check(v: object) -> None:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {v!r}")
    return check


def _check_tau(v: Any) -> None:
    # rho = ||V^T dW||^2 / (||C dW|| ||dW||) >= 0 because C is positive semi-definite.
    if not (_number(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"must be a number in [0, 1] (rho is a cosine >= 0); got {v!r}")


def _check_weights(v: Any) -> None:
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(w) and 0.0 <= w <= 1.0 for w in v)):
        raise ValueError(f"must be two numbers in [0, 1], fine-tune then safety (e.g. 0.8,0.2); got {v!r}")


def _check_density(v: Any) -> None:
    if v is not None and not (_number(v) and 0.0 < v <= 1.0):
        raise ValueError(f"must be in (0, 1]; got {v!r}")


def _check_svd_rank(v: Any) -> None:
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"must be a whole number >= 1; got {v!r}")


def _check_seed(v: Any) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"must be a non-negative integer; got {v!r}")


def setting(default: Any, help: str, check: Callable | None = None, metavar: str | None = None) -> Any:
    """A settings field: its default, its help (for the CLI and docs) and its check (for MergeSettings and the
    config file's field-by-field validation)."""
    return field(default=default, metadata={"help": help, "check": check, "metavar": metavar})


@dataclass(frozen=True)
class MergeSettings:
    policy: str = setting("safemerge", "safemerge (merge) | safelora (project)", _check_choice(tuple(PolicyName)))
    tau: float = setting(0.35, "similarity threshold: layers with rho below it are repaired", _check_tau)
    weights: tuple[float, float] = setting((0.8, 0.2), "fine-tune,safety weights for merged layers",
                                           _check_weights)
    method: str = setting("linear", f"{' | '.join(METHODS)} (README: methods)", _check_choice(tuple(METHODS)))
    density: float | None = setting(None, "kept fraction for ties/dare/magnitude_prune", _check_density)
    majority_sign_method: str = setting("total", "total | frequency (ties, dare_ties)", _check_choice(SIGN_METHODS))
    seed: int = setting(0, "seed for DARE's random drop", _check_seed)
    # Which layers are repaired (a Selection; `select_value` is K for top_k, F for fraction). The config file
    # writes them as one key (`select: {top_k: 3}`), the command line as --top-k / --fraction.
    select: str = setting("threshold", "which layers are repaired: threshold (tau) | top_k | fraction")
    select_value: float | None = setting(None, "K for top_k, F for fraction")
    svd_rank: int | None = setting(None, "rank of a *_svd method's merged layers (default: the larger of the two "
                                         "LoRA ranks)", _check_svd_rank, metavar="R")

    def __post_init__(self) -> None:
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
        if self.select == Selection.THRESHOLD:
            del d["select"], d["select_value"]
        if self.svd_rank is None:
            del d["svd_rank"]
        return d


# Per-field checks, shared by MergeSettings and the fleet config's field-by-field validation.
FIELD_CHECKS: dict[str, Callable] = {f.name: f.metadata["check"] for f in fields(MergeSettings)
                                     if f.metadata["check"] is not None}
SELECTION_FIELDS = ("select", "select_value")  # one key in a config file, exclusive flags on a command line


def _check_select(mode: str, value: Any) -> None:
    if mode not in tuple(Selection):
        raise SafeMergeError(f"select must be one of {', '.join(Selection)}; got {mode!r}")
    if mode == Selection.THRESHOLD and value is not None:
        raise SafeMergeError("select threshold uses tau and takes no value")
    if mode == Selection.TOP_K and not (_number(value) and float(value).is_integer() and value >= 1):
        raise SafeMergeError(f"select top_k needs a whole number of layers >= 1; got {value!r}")
    if mode == Selection.FRACTION and not (_number(value) and 0 < value <= 1):
        raise SafeMergeError(f"select fraction needs a number in (0, 1]; got {value!r}")
