"""What each merge method makes of a repaired layer, and what the SVD family costs.

1. Error against the weighted sum a user expects, `w_ft dW_ft + w_safe dW_safe`, per merged layer of the
   demo fleet (`make demo`'s: hidden 128, 4 layers, rank 8), relative Frobenius norm:
   `linear` (PEFT's: it adds cross terms), `cat` (exact, rank r_ft + r_safe), `svd` at the default rank
   (the larger LoRA rank: a truncation) and at r_ft + r_safe (exact).
2. Time of one `svd` merge of a Llama-3-8B MLP layer (out 14336, in 4096, r = 16 + 16): ours, from the
   low-rank factors (two QRs and an R x R SVD), against PEFT's dense path (form the [out, in] update,
   `torch.linalg.svd(full_matrices=True)` as `add_weighted_adapter` calls it), in the same run.

    .venv/bin/python bench/merge_methods.py [--quick]     # --quick: a 4096 x 4096 layer for part 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from safemerge_ray.core import MergeSettings, merged_layer
from safemerge_ray.io import LocalDir, load_adapter
from safemerge_ray.synthetic import SynthSpec, build_fixture


def layer_errors(root: Path, weights=(0.8, 0.2)) -> dict[str, list[float]]:
    finetuned = load_adapter(LocalDir(root / "finetuned" / "gsm8k"), "gsm8k")
    safety = load_adapter(LocalDir(root / "safety"), "safety")
    errors: dict[str, list[float]] = {}
    for module, lora in finetuned.modules.items():
        safe = safety.modules[module]
        pair = [finetuned.read_lora(module), safety.read_lora(module)]
        scalings = [lora.scaling, safe.scaling]
        exact = sum(w * s * (b @ a) for w, s, (a, b) in zip(weights, scalings, pair, strict=True))
        full = lora.rank + safe.rank
        for label, settings in (("linear", MergeSettings(weights=weights)),
                                ("cat", MergeSettings(weights=weights, method="cat")),
                                ("svd (rank max(r))", MergeSettings(weights=weights, method="svd")),
                                (f"svd (rank {full})", MergeSettings(weights=weights, method="svd", svd_rank=full))):
            a, b = merged_layer(settings, module, pair, scalings)
            errors.setdefault(label, []).append(float(torch.linalg.matrix_norm(b @ a - exact)
                                                      / torch.linalg.matrix_norm(exact)))
    return errors


def svd_times(out: int, inp: int, r: int = 16, repeats: int = 3) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(0)
    pair = [(torch.randn(r, inp, generator=gen) * 0.01, torch.randn(out, r, generator=gen) * 0.01) for _ in range(2)]
    settings = MergeSettings(method="svd", weights=(0.8, 0.2))

    def ours():
        return merged_layer(settings, "m", pair, [2.0, 2.0])

    def peft_dense():  # PEFT: get_delta_weight per adapter, task_arithmetic, then the full SVD, truncated
        delta = sum(w * 2.0 * (b @ a) for w, (a, b) in zip((0.8, 0.2), pair, strict=True))
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        return vh[:r], u[:, :r] @ torch.diag(s[:r])

    results = {}
    for name, fn in (("ours", ours), ("peft", peft_dense)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a, b = fn()
            times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times), b @ a)
    agree = float(torch.linalg.matrix_norm(results["ours"][1] - results["peft"][1])
                  / torch.linalg.matrix_norm(results["peft"][1]))
    return results["ours"][0], results["peft"][0], agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        build_fixture(Path(tmp), SynthSpec(hidden=128, layers=4, rank=8), n_finetunes=1)
        errors = layer_errors(Path(tmp))
    print("| method | layers | relative error vs w_ft dW_ft + w_safe dW_safe: mean | max |")
    print("|---|---|---|---|")
    for label, values in errors.items():
        print(f"| {label} | {len(values)} | {statistics.mean(values):.3g} | {max(values):.3g} |")
    out, inp = (4096, 4096) if args.quick else (14336, 4096)
    ours, peft, agree = svd_times(out, inp, repeats=1 if not args.quick else 3)
    print(f"\n| svd merge of one {out} x {inp} layer, r = 16 + 16 | ours s | PEFT dense s | PEFT/ours | "
          "products agree to |")
    print("|---|---|---|---|---|")
    print(f"| {torch.get_num_threads()} CPU threads | {ours:.4f} | {peft:.2f} | {peft / ours:.0f}x | {agree:.1e} |")


if __name__ == "__main__":
    main()
