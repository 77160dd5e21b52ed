"""The CUDA path, covered on a CPU-only machine.

Where a GPU would be, a stand-in maps "cuda" to the CPU and records what the code asks of the device:
page-locked reads, asynchronous copies, TF32 off. The arithmetic itself is the float32 path that the
GPU runs too; its precision with bf16/fp16 storage is checked against float64 here.
"""

import pytest
import torch

import safemerge_ray.engine.merge_command as repair
import safemerge_ray.io.tensors as tensors
from safemerge_ray.core import MergeSettings, ModuleCost, alignment_delta, lora_rho, rho_reference
from safemerge_ray.fleet.jobs import ModuleJob, ScoreRequest, ScoreTask
from safemerge_ray.fleet.worker import FleetWorker
from safemerge_ray.io import S3Settings


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rho_from_half_precision_storage_matches_float64(dtype):
    gen = torch.Generator().manual_seed(0)
    w_un = (torch.randn(96, 64, generator=gen) * 0.02).to(dtype)
    w_al = (w_un.float() + torch.randn(96, 4, generator=gen) @ torch.randn(4, 64, generator=gen) * 0.01).to(dtype)
    loras = [(torch.randn(16, 64, generator=gen), torch.randn(96, 16, generator=gen) * 0.01) for _ in range(8)]
    v = alignment_delta(w_al, w_un, "m", "cpu")
    assert v.dtype == torch.float32
    exact_v = w_al.double() - w_un.double()  # the stored values, differenced exactly
    for (a, b), rho in zip(loras, lora_rho(v, loras).tolist(), strict=True):
        assert abs(rho - rho_reference(exact_v, a, b)) < 1e-5


class FakeCuda:
    """Stands in for a GPU: 'cuda' tensors live on the CPU; every request is recorded."""

    def __init__(self, monkeypatch):
        self.pinned_reads, self.copies = [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        real_read, real_to = tensors.SafetensorsFile.read, torch.Tensor.to
        fake = self

        def read(self_, tname, pin_memory=False):
            fake.pinned_reads.append((tname, pin_memory))
            return real_read(self_, tname, False)  # page-locked memory needs a real GPU

        def to(t, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if isinstance(device, (str, torch.device)) and str(device).startswith("cuda"):
                fake.copies.append(kwargs.get("non_blocking", False))
                args = ("cpu", *args[1:]) if args else args
                kwargs = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
            return real_to(t, *args, **kwargs)

        monkeypatch.setattr(tensors.SafetensorsFile, "read", read)
        monkeypatch.setattr(torch.Tensor, "to", to)


def _job(fx, worker):
    module = "model.layers.1.mlp.up_proj"
    plan_nbytes = worker.aligned.info(f"{module}.weight").nbytes * 2
    requests = tuple(ScoreRequest(n, str(fx / "finetuned" / n), MergeSettings(policy=p, tau=0.9))
                     for n, p in (("gsm8k", "safemerge"),) ) + (
        ScoreRequest("gsm8k-safelora", str(fx / "finetuned" / "gsm8k"), MergeSettings(policy="safelora", tau=0.9)),)
    out, inp = worker.aligned.info(f"{module}.weight").shape
    cost = ModuleCost(module, out, inp, plan_nbytes, (4,) * len(requests), projected=1)
    return ScoreTask((ModuleJob(module, f"{module}.weight", False, plan_nbytes, requests, cost),))


def test_worker_on_cuda_reads_pinned_copies_async_and_matches_cpu(pair, monkeypatch):
    cpu_worker = FleetWorker(str(pair / "unaligned"), str(pair / "aligned"), S3Settings(), "cpu")
    (cpu,) = cpu_worker.score(_job(pair, cpu_worker))
    torch.backends.cuda.matmul.allow_tf32 = True
    fake = FakeCuda(monkeypatch)
    gpu_worker = FleetWorker(str(pair / "unaligned"), str(pair / "aligned"), S3Settings(), "cuda")
    (gpu,) = gpu_worker.score(_job(pair, gpu_worker))
    assert torch.backends.cuda.matmul.allow_tf32 is False  # full float32 GEMMs on the GPU
    model_reads = [pin for name, pin in fake.pinned_reads if "lora_" not in name]
    assert model_reads and all(model_reads)  # model weights land in page-locked memory (LoRA reads are tiny)
    assert fake.copies and all(fake.copies)  # and cross to the device asynchronously
    assert not gpu.errors and gpu.scores.keys() == cpu.scores.keys()
    for name, score in gpu.scores.items():
        assert abs(score.rho - cpu.scores[name].rho) < 1e-6
    projected = _projected(gpu, "gsm8k-safelora")
    assert projected is not None and projected.device.type == "cpu"  # results come back to the host
    assert torch.allclose(projected, _projected(cpu, "gsm8k-safelora"), atol=1e-7)


def _projected(result, adapter):
    """SafeLoRA's projected B (or the layer it repaired): in Ray's object store where a session runs (an earlier
    test's), else inline."""
    projected, repaired = result.scores[adapter].projected_b, result.scores[adapter].repaired
    if adapter in result.carried:
        import ray

        projected, repaired = ray.get(result.carried[adapter])
    return projected if repaired is None else repaired.lora[1]


def test_cpu_path_never_pins(pair, monkeypatch):
    seen = []
    real_read = tensors.SafetensorsFile.read
    monkeypatch.setattr(tensors.SafetensorsFile, "read",
                        lambda self, t, pin_memory=False: seen.append(pin_memory) or real_read(self, t, False))
    worker = FleetWorker(str(pair / "unaligned"), str(pair / "aligned"), S3Settings(), "cpu")
    worker.score(_job(pair, worker))
    assert seen and not any(seen)


def test_merge_cli_device_cuda_uses_the_same_path(pair, monkeypatch, tmp_path):
    FakeCuda(monkeypatch)
    assert repair.resolve_device("cuda") == "cuda"
    summary = repair.merge_to_dir(unaligned=str(pair / "unaligned"), aligned=str(pair / "aligned"),
                                  safety_adapter=str(pair / "safety"), finetuned=str(pair / "finetuned" / "gsm8k"),
                                  out=str(tmp_path / "gpu"), settings=MergeSettings(), device="cuda", progress=False)
    monkeypatch.undo()
    reference = repair.merge_to_dir(unaligned=str(pair / "unaligned"), aligned=str(pair / "aligned"),
                                    safety_adapter=str(pair / "safety"), finetuned=str(pair / "finetuned" / "gsm8k"),
                                    out=str(tmp_path / "cpu"), settings=MergeSettings(), progress=False)
    assert [r["action"] for r in summary["decisions"]] == [r["action"] for r in reference["decisions"]]
    assert (tmp_path / "gpu" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "cpu" / "adapter_model.safetensors").read_bytes()
