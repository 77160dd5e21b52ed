"""The controls beside a rho-selected repair, and the numbers about direction and size.

A control repairs a *given* set of layers with the same merge (the package's own per-layer arithmetic,
`merged_layer` and `kept_layer`, and its output config), so a control differs from SafeMERGE's repair only in
which layers it chose: random layers at the same count, or the largest updates (||s B A||_F) at the same count.
`tests/test_experiment.py` holds the writer equal to the fleet's output for the rho-chosen layers.

Direction: beta = <dW, V> / ||V||_F^2 (the share of what alignment changed that the update adds, negative:
undoes) and the signed cosine <dW, V> / (||dW|| ||V||), each against a null of random rank-r updates of the same
shape (Gaussian factors: the cosine does not depend on their scale).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors import safe_open

from safemerge_ray.core import MergeSettings, kept_layer, merged_layer, natural_key
from safemerge_ray.engine.assemble import output_config
from safemerge_ray.io import PREFIX, LocalDir, LoraAdapter, adapter_files, load_adapter, published_version


def adapter(path: str | Path) -> LoraAdapter:
    """A PEFT adapter directory (a `train-safety` output: the version its manifest names)."""
    return load_adapter(published_version(LocalDir(Path(path)), str(path)), str(path))


def _update_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||s B A||_F without forming B A: s sqrt(tr(B^T B A A^T))."""
    return scaling * torch.sqrt(torch.trace((b.T @ b) @ (a @ a.T)))


def update_norms(lora: LoraAdapter) -> dict[str, float]:
    """||s B A||_F per module."""
    out = {}
    for module, info in lora.modules.items():
        a, b = (t.double() for t in lora.read_lora(module))
        out[module] = float(_update_norm(a, b, info.scaling))
    return out


def random_layers(modules: list[str], count: int, seed: int) -> set[str]:
    return set(random.Random(seed).sample(sorted(modules, key=natural_key), count))


def largest_layers(norms: dict[str, float], count: int) -> set[str]:
    return set(sorted(norms, key=lambda m: (-norms[m], natural_key(m)))[:count])


def repair_layers(finetuned: str, safety: str, layers: set[str], weights: tuple[float, float], out: Path) -> str:
    """The fine-tune with exactly `layers` merged with the safety adapter (linear, `weights`), the others kept;
    written as a PEFT adapter directory. Returns its path."""
    ft, safe = adapter(finetuned), adapter(safety)
    settings = MergeSettings(weights=weights)
    tensors, ranks = {}, {}
    for module, info in ft.modules.items():
        lora = ft.read_lora(module)
        if module in layers:
            other = safe.modules[module]
            a, b = merged_layer(settings, module, [lora, safe.read_lora(module)], [info.scaling, other.scaling])
        else:
            a, b = kept_layer(lora, info.scaling)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
        ranks[module] = a.shape[0]
    tensors.update(ft.read_extra())
    out.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(tensors, output_config(ft.config, ranks)).items():
        (out / name).write_bytes(data)
    return str(out)


def deltas(unaligned: Path, aligned: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """V = W_aligned - W_unaligned per module, float64."""
    with safe_open(unaligned / "model.safetensors", "pt") as un, safe_open(aligned / "model.safetensors", "pt") as al:
        return {m: al.get_tensor(f"{m}.weight").double() - un.get_tensor(f"{m}.weight").double() for m in modules}


def direction(lora: LoraAdapter, v: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per module: beta = <dW, V>/||V||^2 and the signed cosine, dW = s B A (never formed for the inner product)."""
    out = {}
    for module, info in lora.modules.items():
        a, b = (t.double() for t in lora.read_lora(module))
        inner = info.scaling * torch.sum((b.T @ v[module]) * a)
        norm_dw = _update_norm(a, b, info.scaling)
        norm_v = torch.linalg.matrix_norm(v[module])
        out[module] = {"beta": float(inner / norm_v ** 2), "cosine": float(inner / (norm_dw * norm_v))}
    return out


def null_cosines(v: dict[str, torch.Tensor], rank: int, draws: int, seed: int = 0) -> list[float]:
    """The mean signed cosine over modules of `draws` random rank-`rank` updates (one per module per draw)."""
    gen = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(draws):
        total = 0.0
        for vm in v.values():
            a = torch.randn(rank, vm.shape[1], generator=gen, dtype=torch.float64)
            b = torch.randn(vm.shape[0], rank, generator=gen, dtype=torch.float64)
            dw = b @ a
            total += float(torch.sum(dw * vm) / (torch.linalg.matrix_norm(dw) * torch.linalg.matrix_norm(vm)))
        means.append(total / len(v))
    return means
