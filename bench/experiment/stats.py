"""Statistics for the evidence page: rates with bootstrap intervals, paired comparisons of two variants over the
same prompts (a paired bootstrap of the difference and McNemar's exact test), Holm's correction, and agreement
between a judge and hand labels (Cohen's kappa, precision and recall)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from safemerge_ray.loop import bootstrap_ci

RESAMPLES = 2000


def rate(values: Sequence[float], seed: int = 0) -> dict:
    """The mean with its 95% percentile-bootstrap interval (the package's, as `eval` reports it)."""
    if not values:
        return {"mean": None, "ci95": [None, None], "n": 0}
    return {"mean": sum(values) / len(values), "ci95": list(bootstrap_ci(list(values), RESAMPLES, seed)),
            "n": len(values)}


def mcnemar_p(before: Sequence[float], after: Sequence[float]) -> float:
    """McNemar's exact two-sided p-value for paired 0/1 outcomes (a binomial test on the discordant pairs)."""
    b = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    c = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_flip_p(before: Sequence[float], after: Sequence[float], seed: int = 0, draws: int = 10000) -> float:
    """Two-sided p of a paired permutation test: each prompt's difference flips sign at random under the null."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if not d.any():
        return 1.0
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(draws, d.size))
    null = np.abs((signs * d).mean(axis=1))
    return float((1 + np.sum(null >= abs(d.mean()) - 1e-12)) / (draws + 1))


def paired(before: Sequence[float], after: Sequence[float], seed: int = 0) -> dict:
    """after - before over the same prompts: the mean difference, its paired-bootstrap 95% interval (prompts
    resampled, both answers kept together) and a p-value: McNemar's exact test for 0/1 outcomes, a sign-flip
    permutation test otherwise (a control averaged over seeds)."""
    x, y = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    assert x.shape == y.shape and x.size, "paired outcomes need the same prompts"
    idx = np.random.default_rng(seed).integers(0, x.size, (RESAMPLES, x.size))
    diffs = (y[idx] - x[idx]).mean(axis=1)
    binary = set(np.unique(np.concatenate([x, y]))) <= {0.0, 1.0}
    interval = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
    p = mcnemar_p(before, after) if binary else sign_flip_p(before, after, seed)
    return {"diff": float((y - x).mean()), "ci95": interval, "p": p, "test": "mcnemar" if binary else "sign-flip",
            "n": int(x.size)}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa between two labelings of the same items."""
    n = len(a)
    labels = sorted(set(a) | set(b))
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((list(a).count(k) / n) * (list(b).count(k) / n) for k in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement(judge: Sequence[str], hand: Sequence[str], positive: str = "complied") -> dict:
    """The judge against hand labels: kappa, accuracy, and precision and recall of `positive`."""
    tp = sum(j == positive and h == positive for j, h in zip(judge, hand, strict=True))
    said, truly = sum(j == positive for j in judge), sum(h == positive for h in hand)
    return {"n": len(hand), "kappa": kappa(judge, hand),
            "accuracy": sum(j == h for j, h in zip(judge, hand, strict=True)) / len(hand),
            "precision": tp / said if said else None, "recall": tp / truly if truly else None}
