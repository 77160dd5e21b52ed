"""The CUDA path on a real GPU (`bench/gpu.sh` runs these on a lent GPU machine; skipped where none is).

tests/test_gpu_path.py covers what the code asks of the device on a CPU-only machine; these check the numbers
a real GPU gives: rho within 1e-5 of the CPU's, the same decisions, and bf16 weights accumulated in float32.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import safemerge_ray.engine.merge_command as repair
from safemerge_ray.core import MergeSettings, alignment_delta, lora_rho, rho_reference
from safemerge_ray.fleet.worker import FleetWorker
from safemerge_ray.io import S3Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_rho_on_cuda_from_bf16_weights_matches_float64():
    gen = torch.Generator().manual_seed(0)
    w_un = (torch.randn(1024, 512, generator=gen) * 0.02).bfloat16()
    w_al = (w_un.float() + torch.randn(1024, 8, generator=gen) @ torch.randn(8, 512, generator=gen) * 0.01).bfloat16()
    loras = [(torch.randn(16, 512, generator=gen), torch.randn(1024, 16, generator=gen) * 0.01) for _ in range(32)]
    v = alignment_delta(w_al.cuda(), w_un.cuda(), "m", "cuda")
    assert v.dtype == torch.float32 and v.is_cuda  # bf16 storage, float32 arithmetic
    exact = w_al.double() - w_un.double()
    cuda = lora_rho(v, [(a.cuda(), b.cuda()) for a, b in loras]).tolist()
    for (a, b), rho in zip(loras, cuda, strict=True):
        assert abs(rho - rho_reference(exact, a, b)) < 1e-5


def test_a_worker_on_cuda_scores_as_the_cpu_does(pair):
    from test_gpu_path import _job, _projected  # the same scoring job as the CPU-only test

    cpu_worker = FleetWorker(str(pair / "unaligned"), str(pair / "aligned"), S3Settings(), "cpu")
    gpu_worker = FleetWorker(str(pair / "unaligned"), str(pair / "aligned"), S3Settings(), "cuda")
    (cpu,) = cpu_worker.score(_job(pair, cpu_worker))
    (gpu,) = gpu_worker.score(_job(pair, gpu_worker))
    assert not gpu.errors and gpu.scores.keys() == cpu.scores.keys()
    for name, score in gpu.scores.items():
        assert abs(score.rho - cpu.scores[name].rho) < 1e-5
    projected = _projected(gpu, "gsm8k-safelora")
    assert projected is not None and projected.device.type == "cpu"
    assert torch.allclose(projected, _projected(cpu, "gsm8k-safelora"), atol=1e-6)


def test_merge_on_cuda_makes_the_cpus_decisions_and_nearly_its_bytes(pair, tmp_path):
    outs = {}
    for device in ("cuda", "cpu"):
        outs[device] = repair.merge_to_dir(
            unaligned=str(pair / "unaligned"), aligned=str(pair / "aligned"), safety_adapter=str(pair / "safety"),
            finetuned=str(pair / "finetuned" / "gsm8k"), out=str(tmp_path / device),
            settings=MergeSettings(tau=0.9), device=device, progress=False)
    assert [(r["module"], r["action"]) for r in outs["cuda"]["decisions"]] == \
        [(r["module"], r["action"]) for r in outs["cpu"]["decisions"]]
    for row_gpu, row_cpu in zip(outs["cuda"]["decisions"], outs["cpu"]["decisions"], strict=True):
        assert abs(row_gpu["rho"] - row_cpu["rho"]) < 1e-5
    gpu, cpu = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("cuda", "cpu"))
    assert gpu.keys() == cpu.keys()
    assert all(torch.allclose(gpu[name], cpu[name], atol=1e-6) for name in cpu)
