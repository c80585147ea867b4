"""vqkern.sample_code: draws from softmax(logit / T) on every backend, never N x K."""
import math

import pytest
import torch

import vqkern

from conftest import backend_params

BACKENDS = backend_params()


def _chi_square(indices, probs):
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=probs.numel()).double()
    expected = probs.double() * indices.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square with 7 degrees of freedom: P(X > 24.3) = 0.001.
CHI2_7DOF_0001 = 24.32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_draws_follow_the_softmax(backend, metric, device):
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(8, 5, generator=g)
    z = torch.randn(1, 5, generator=g).expand(4000, 5).contiguous()
    temperature = 0.7
    idx, dist = vqkern.sample_code(z.to(device), codebook.to(device), temperature, metric=metric, seed=11,
                                   backend=backend)
    if metric == "cosine":
        logit = torch.nn.functional.normalize(codebook.double(), dim=1) @ torch.nn.functional.normalize(
            z[0].double(), dim=0)
    else:
        logit = -(z[0].double() - codebook.double()).norm(dim=1)
    probs = torch.softmax(logit / temperature, dim=0)
    assert _chi_square(idx, probs) < CHI2_7DOF_0001
    # The returned distance is the drawn code's, as nearest_code's.
    if metric == "l2":
        exact = ((z.double() - codebook.double()[idx.cpu()]) ** 2).sum(1)
        torch.testing.assert_close(dist.cpu().double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_temperature_is_rejected_by_the_check(backend, device):
    # The chi-square check is able to fail: draws at T = 0.7 tested against T = 1.4.
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(8, 5, generator=g)
    z = torch.randn(1, 5, generator=g).expand(4000, 5).contiguous()
    idx, _ = vqkern.sample_code(z.to(device), codebook.to(device), 0.7, seed=11, backend=backend)
    probs = torch.softmax(-(z[0].double() - codebook.double()).norm(dim=1) / 1.4, dim=0)
    assert _chi_square(idx, probs) > CHI2_7DOF_0001


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_and_low_temperature(backend, device):
    z = torch.randn(300, 6, device=device)
    codebook = torch.randn(40, 6, device=device)
    a, _ = vqkern.sample_code(z, codebook, 1.0, seed=5, backend=backend)
    b, _ = vqkern.sample_code(z, codebook, 1.0, seed=5, backend=backend)
    c, _ = vqkern.sample_code(z, codebook, 1.0, seed=6, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d, _ = vqkern.sample_code(z, codebook, 1.0, backend=backend)
    torch.manual_seed(3)
    e, _ = vqkern.sample_code(z, codebook, 1.0, backend=backend)
    assert torch.equal(d, e)
    # As T -> 0 the draw is the nearest code (gaps here are far above T * Gumbel noise).
    nearest, _ = vqkern.nearest_code(z, codebook, backend=backend)
    cold, _ = vqkern.sample_code(z, codebook, 1e-6, seed=1, backend=backend)
    assert (cold == nearest).float().mean() > 0.99


def test_triton_draw_is_the_same_whatever_the_tiling():
    ok, why = vqkern.backends.availability("triton", "cuda" if torch.cuda.is_available() else "cpu")
    if not ok:
        pytest.skip(f"triton: {why}")
    import importlib
    search = importlib.import_module("vqkern.backends.triton.search")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = torch.randn(100, 12, device=device)
    codebook = torch.randn(300, 12, device=device)
    runs = []
    for splits, block_n in ((1, None), (3, 32), (2, 64)):
        idx = torch.full((100,), -1, dtype=torch.int64, device=device)
        search.launch_sample(z, codebook, idx, torch.empty(100, device=device), torch.empty_like(z), 0.5, 77, False,
                             num_splits=splits, block_n=block_n)
        runs.append(idx)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_bad_arguments():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            vqkern.sample_code(z, codebook, bad)
    with pytest.raises(ValueError, match="seed"):
        vqkern.sample_code(z, codebook, 1.0, seed=-1)
    with pytest.raises(ValueError, match="D"):
        vqkern.sample_code(torch.randn(4, 2), codebook, 1.0)
