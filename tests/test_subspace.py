import pytest
import torch

from safemerge_ray.core import lora_rho, project_lora_b, rho_reference


def _random_case(gen, out, inn, r, low_rank=None):
    if low_rank:
        v = torch.randn(out, low_rank, generator=gen) @ torch.randn(low_rank, inn, generator=gen)
    else:
        v = torch.randn(out, inn, generator=gen)
    return v * 0.01, torch.randn(r, inn, generator=gen), torch.randn(out, r, generator=gen) * 0.02


@pytest.mark.parametrize("out,inn,r,low_rank", [
    (16, 16, 1, None), (48, 32, 4, None), (32, 96, 8, 3), (128, 64, 16, 8), (200, 40, 2, None), (64, 64, 8, 64),
])
def test_rho_identity_matches_direct_definition(out, inn, r, low_rank):
    gen = torch.Generator().manual_seed(out * 1000 + inn + r)
    v, a, b = _random_case(gen, out, inn, r, low_rank)
    (rho,) = lora_rho(v, [(a, b)]).tolist()
    assert abs(rho - rho_reference(v, a, b)) < 1e-5


def test_batched_rho_equals_one_at_a_time_with_mixed_ranks():
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(40, 24, generator=gen)
    loras = [(torch.randn(r, 24, generator=gen), torch.randn(40, r, generator=gen)) for r in (2, 8, 4, 8, 1)]
    batched = lora_rho(v, loras)
    for (a, b), rho in zip(loras, batched.tolist(), strict=True):
        assert abs(rho - rho_reference(v, a, b)) < 1e-5
        assert abs(rho - lora_rho(v, [(a, b)]).item()) < 1e-6


def test_rho_extremes():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(32, 3, generator=gen))
    v = u @ torch.randn(3, 16, generator=gen)
    a = torch.randn(4, 16, generator=gen)
    inside = u @ torch.randn(3, 4, generator=gen)  # update inside span(V): rho = 1 when V's spectrum is flat-ish
    orth = torch.randn(32, 4, generator=gen)
    orth = orth - u @ (u.T @ orth)  # no component in span(V): C dW = 0
    zero = torch.zeros(32, 4)
    rhos = lora_rho(v, [(a, inside), (a, orth), (a, zero)]).tolist()
    assert rhos[0] == pytest.approx(rho_reference(v, a, inside), abs=1e-5) and rhos[0] > 0.5
    assert rhos[1] == pytest.approx(0.0, abs=1e-4)
    assert rhos[2] == 0.0


def test_safelora_projection_is_c_times_b():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(24, 16, generator=gen, dtype=torch.float64).float()
    b = torch.randn(24, 4, generator=gen)
    c = v.double() @ v.double().T / torch.linalg.matrix_norm(v.double())
    assert torch.allclose(project_lora_b(v, b).double(), c @ b.double(), rtol=1e-5, atol=1e-6)


def test_an_adapters_projection_has_the_same_bits_in_any_batch():
    """P = V V^T B (hence rho and SafeLoRA's C B) for one adapter is bit-identical alone (as `merge` scores it) and
    beside any peers (as a fleet's batch of any size does): every projection GEMM has one shape. One wide GEMM
    of N * r columns gave different last bits for different N."""
    from safemerge_ray.core import PANEL, project

    gen = torch.Generator().manual_seed(7)
    v = torch.randn(256, 256, generator=gen)
    b = torch.randn(1, 256, 8, generator=gen)
    alone = project(v, b)[0]
    for peers in (1, 2, 7, 8, 20):
        batch = torch.cat([torch.randn(peers, 256, 8, generator=gen), b])  # b last: at every offset in a panel
        assert torch.equal(project(v, batch)[-1], alone), peers
    assert torch.allclose(alone, v @ (v.T @ b[0]), rtol=1e-4, atol=1e-3) and PANEL % 8 == 0
