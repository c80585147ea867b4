"""torch.library.opcheck on every registered op, for every backend that can run here."""
import pytest
import torch

import vqkern  # noqa: F401  (registers the ops)

from conftest import backend_params

BACKENDS = backend_params()


def _samples(device):
    z = torch.randn(45, 10, device=device)
    codebook = torch.randn(13, 10, device=device)
    return z, codebook


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_search(backend, device):
    z, codebook = _samples(device)
    torch.library.opcheck(torch.ops.vqkern.search.default, (z, codebook, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_quantize(backend, device):
    z, codebook = _samples(device)
    torch.library.opcheck(torch.ops.vqkern.quantize.default,
                          (z.requires_grad_(), codebook.requires_grad_(), backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_quantize_backward(backend, need, deterministic, device):
    z, codebook = _samples(device)
    indices = torch.randint(13, (45,), device=device)
    args = (torch.randn_like(z), z, codebook, indices, torch.tensor(0.25, device=device),
            torch.tensor(1.5, device=device), backend, *need, deterministic)
    torch.library.opcheck(torch.ops.vqkern.quantize_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_segment_sum(backend, deterministic, device):
    z, _ = _samples(device)
    indices = torch.randint(13, (45,), device=device)
    torch.library.opcheck(torch.ops.vqkern.segment_sum.default, (indices, z, 13, backend, deterministic))


@pytest.mark.parametrize("backend", backend_params(("triton", "torch", "reference")))
@pytest.mark.parametrize("cosine", [False, True])
def test_opcheck_sample(backend, cosine, device):
    z, codebook = _samples(device)
    if cosine:
        z, codebook = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(codebook, dim=1)
    torch.library.opcheck(torch.ops.vqkern.sample.default, (z, codebook, 2.0, 123, cosine, backend))
