"""Which way each fine-tune moved its layers relative to alignment: the signed cosine between a layer's update
dW = s B A and what alignment changed there, V = W_aligned - W_unaligned. rho (the projection cosine) cannot tell
these apart: an update along -V (undoing alignment) lies in V's subspace as much as one along +V."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from safemerge_ray.io import LocalDir, load_adapter


def signed_cosines(unaligned: Path, aligned: Path, adapter: Path) -> dict[str, float]:
    """module -> <dW, V> / (||dW|| ||V||) for every layer the adapter adapts."""
    lora = load_adapter(LocalDir(adapter), adapter.name)
    out: dict[str, float] = {}
    with safe_open(unaligned / "model.safetensors", "pt") as un, safe_open(aligned / "model.safetensors", "pt") as al:
        for module, info in lora.modules.items():
            v = al.get_tensor(f"{module}.weight").double() - un.get_tensor(f"{module}.weight").double()
            a, b = (t.double() for t in lora.read_lora(module))
            inner = info.scaling * torch.sum((b.T @ v) * a)  # <s B A, V> without forming B A
            norm = info.scaling * torch.linalg.matrix_norm(b @ a)
            out[module] = float(inner / (norm * torch.linalg.matrix_norm(v)))
    return out


def summary(cosines: dict[str, float]) -> dict:
    values = list(cosines.values())
    return {"mean": sum(values) / len(values), "negative": sum(c < 0 for c in values), "layers": len(values),
            "min": min(values), "max": max(values)}
