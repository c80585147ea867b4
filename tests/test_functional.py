"""nearest_code / quantize / segment_sum on every backend against the fp64 reference."""
from types import SimpleNamespace

import pytest
import torch

import vqkern
from vqkern import reference

from conftest import backend_params
from helpers import assert_nearest, exact_distances

BACKENDS = backend_params()
# Shapes off every block size: D = 1, 3, 65; K = 1, 7, 1000; N not a multiple of 16.
SHAPES = [(37, 1, 1), (130, 7, 3), (200, 1000, 16), (77, 65, 65), (64, 129, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(n, k, d, dtype, cb_dtype=None, device="cpu"):
    z = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(cb_dtype or dtype)
    return z, codebook


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_code_fp32(backend, n, k, d, device):
    z, codebook = _inputs(n, k, d, torch.float32, device=device)
    idx, dist = vqkern.nearest_code(z, codebook, backend=backend)
    assert_nearest(z, codebook, idx, dist)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,cb_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                            (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_quantize_dtypes(backend, dtype, cb_dtype, device):
    z, codebook = _inputs(150, 300, 24, dtype, cb_dtype, device)
    out = vqkern.quantize(z, codebook, backend=backend)
    assert out.quantized.dtype == dtype and out.quantized.shape == z.shape
    assert_nearest(z, codebook, out.indices)
    # quantized is exactly the chosen code in z's dtype.
    assert torch.equal(out.quantized, codebook[out.indices].to(dtype))
    exact = exact_distances(z, codebook).gather(1, out.indices.view(-1, 1)).mean().item() / z.shape[1]
    for loss in (out.commitment_loss, out.codebook_loss):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(exact, rel=1e-5)
    assert out.loss.item() == pytest.approx(1.25 * exact, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_indices_on_separated_codes(backend, device):
    # Codes far apart and inputs close to them: no near-ties, so indices must match exactly.
    codebook = torch.randn(100, 32, device=device) * 10
    truth = torch.randint(100, (333,), device=device)
    z = codebook[truth] + 0.01 * torch.randn(333, 32, device=device)
    idx, _ = vqkern.nearest_code(z, codebook, backend=backend)
    assert torch.equal(idx, truth)
    assert torch.equal(idx, reference.nearest_code(z, codebook))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend, device):
    base = torch.randn(5, 16, device=device)
    codebook = torch.cat([base, base, base])  # codes i, i+5, i+10 are identical
    z = base[torch.arange(40, device=device) % 5] + 0.001 * torch.randn(40, 16, device=device)
    idx, _ = vqkern.nearest_code(z, codebook, backend=backend)
    assert torch.equal(idx, torch.arange(40, device=device) % 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_one_and_leading_shape(backend, device):
    z = torch.randn(3, 4, 5, 8, device=device)
    codebook = torch.randn(1, 8, device=device)
    out = vqkern.quantize(z, codebook, backend=backend)
    assert out.indices.shape == (3, 4, 5) and bool((out.indices == 0).all())
    assert torch.equal(out.quantized, codebook.expand(3, 4, 5, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend, device):
    z = torch.randn(0, 7, 16, device=device, requires_grad=True)
    codebook = torch.randn(10, 16, device=device, requires_grad=True)
    out = vqkern.quantize(z, codebook, backend=backend)
    assert out.quantized.shape == (0, 7, 16) and out.indices.shape == (0, 7)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert codebook.grad is not None and bool((codebook.grad == 0).all())
    idx, dist = vqkern.nearest_code(z.detach(), codebook.detach(), backend=backend)
    assert idx.shape == (0, 7) and dist.shape == (0, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device):
    z = torch.randn(16, 50, 12, device=device).transpose(0, 1)[:, ::2]  # (50, 8, 12), strided
    assert not z.is_contiguous()
    codebook = torch.randn(40, 12, device=device)
    out = vqkern.quantize(z, codebook, backend=backend)
    assert_nearest(z.reshape(-1, 12), codebook, out.indices.reshape(-1))
    assert torch.equal(out.quantized, codebook[out.indices])


def _grad_errors(z, codebook, backend, beta=0.25):
    """(vqkern error, plain PyTorch error) of dz and dE against the fp64 reference."""
    g = torch.randn_like(z)

    def grads(fn, zz, cb):
        zz = zz.detach().requires_grad_()
        cb = cb.detach().requires_grad_()
        out = fn(zz, cb)
        # The loss weighted by N*D: its gradient, 2*beta*(z - e) per element, is then as
        # large as the straight-through one (at weight 1 it hid under the fp16 tolerance).
        ((out.quantized.float() * g.float()).sum() + out.loss * zz.numel()).backward()
        return zz.grad, cb.grad, out.indices

    gz64, gc64, idx64 = grads(lambda a, b: reference.quantize(a, b, beta), z.double(), codebook.double())
    gz32, gc32, idx32 = grads(lambda a, b: reference.quantize(a, b, beta), z, codebook)
    gzk, gck, idxk = grads(lambda a, b: vqkern.quantize(a, b, beta=beta, backend=backend), z, codebook)
    assert torch.equal(idxk, idx64) and torch.equal(idx32, idx64), "gradient data must have no near-ties"
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    return (err(gzk, gz64), err(gz32, gz64)), (err(gck, gc64), err(gc32, gc64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_against_reference(backend, dtype, device):
    z, codebook = _inputs(190, 70, 20, dtype, device=device)
    (ez, ez_ref), (ec, ec_ref) = _grad_errors(z, codebook, backend)
    # flash-attention's rule: at most twice the plain PyTorch error in the same precision
    # (plus a floor for the case where the plain computation happens to be exact).
    floor = {torch.float32: 1e-7, torch.float16: 1e-3}[dtype]
    assert ez <= 2 * ez_ref + floor, (ez, ez_ref)
    assert ec <= 2 * ec_ref + floor, (ec, ec_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["offset", "near_duplicates"])
def test_codebook_gradient_does_not_cancel(backend, case, device):
    # z within 0.01 of its code, or everything 100 away from the origin: the codebook
    # gradient as count * e - sum z cancelled to 30-1000 times plain autograd's error.
    g = torch.Generator(device="cpu").manual_seed(3)
    n, k, d = 300, 12, 16
    codebook = torch.randn(k, d, generator=g)
    if case == "near_duplicates":
        codebook[6:] = codebook[:6]  # duplicated codes: ties go to the lowest index
    z = codebook[torch.randint(6, (n,), generator=g)] + 0.01 * torch.randn(n, d, generator=g)
    if case == "offset":
        z, codebook = z + 100.0, codebook + 100.0
    (ez, ez_ref), (ec, ec_ref) = _grad_errors(z.to(device), codebook.to(device), backend)
    assert ez <= 2 * ez_ref + 1e-7, (ez, ez_ref)
    assert ec <= 2 * ec_ref + 1e-7, (ec, ec_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cosine_half_inputs_ranked_in_fp32(backend, dtype, device):
    # Codes a few 1e-4 apart in cosine: rounding the unit vectors to 16 bits (relative
    # error up to 4e-3 in bf16) ranks them wrongly; the search must use fp32 unit vectors.
    g = torch.Generator(device="cpu").manual_seed(5)
    d = 64
    centre = torch.randn(4, d, generator=g)
    codebook = (centre[torch.randint(4, (400,), generator=g)] + 0.02 * torch.randn(400, d, generator=g)).to(dtype)
    z = (centre[torch.randint(4, (200,), generator=g)] + 0.02 * torch.randn(200, d, generator=g)).to(dtype)
    idx, dist = vqkern.nearest_code(z.to(device), codebook.to(device), metric="cosine", backend=backend)
    cos = (torch.nn.functional.normalize(z.double(), dim=1)
           @ torch.nn.functional.normalize(codebook.double(), dim=1).t())
    chosen = cos.gather(1, idx.cpu().view(-1, 1)).squeeze(1)
    # The README's cosine guarantee: 1 - cos of the chosen code within 1e-5 of the best,
    # and the returned distance within 1e-5 of the exact 1 - cos of the chosen code.
    assert (cos.max(1).values - chosen).max().item() <= 1e-5
    assert (dist.cpu().double() - (1 - chosen)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_terms_route_gradients(backend, device):
    z = torch.randn(60, 8, device=device, requires_grad=True)
    codebook = torch.randn(9, 8, device=device, requires_grad=True)
    out = vqkern.quantize(z, codebook, backend=backend)
    out.commitment_loss.backward(retain_graph=True)
    # No gradient at all (None, not zeros: an optimizer treats zeros as a step).
    assert codebook.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
    z.grad = None
    out.codebook_loss.backward()
    assert z.grad is None
    assert codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_metric(backend, device):
    z = torch.randn(120, 16, device=device) * 3
    codebook = torch.randn(50, 16, device=device)
    idx, dist = vqkern.nearest_code(z, codebook, metric="cosine", backend=backend)
    cos = torch.nn.functional.normalize(z.double(), dim=1) @ torch.nn.functional.normalize(codebook.double(), dim=1).t()
    chosen = cos.gather(1, idx.view(-1, 1)).squeeze(1)
    assert (cos.max(1).values - chosen).max().item() <= 1e-5
    torch.testing.assert_close(dist.double(), 1 - chosen, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(backend, metric, value, device):
    z = torch.randn(50, 8, device=device)
    z[7, 3] = value
    out = vqkern.quantize(z, torch.randn(20, 8, device=device), metric=metric, backend=backend)
    assert not torch.isfinite(out.loss)
    if value != value:  # NaN
        assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_segment_sum(backend, deterministic, device):
    n, k, d = 500, 37, 19
    idx = torch.randint(k, (n,), device=device)
    idx[:100] = 3  # one heavy segment
    values = torch.randn(n, d, device=device)
    counts, sums = vqkern.segment_sum(idx, values, k, backend=backend, deterministic=deterministic)
    ref_counts = torch.bincount(idx, minlength=k).double()
    ref_sums = torch.zeros(k, d, dtype=torch.float64, device=device).index_add_(0, idx, values.double())
    assert counts.dtype == sums.dtype == torch.float32
    assert torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    if deterministic:
        again = vqkern.segment_sum(idx, values, k, backend=backend, deterministic=True)
        assert torch.equal(again[1], sums) and torch.equal(again[0], counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_codebook_gradient_bitwise(backend, device):
    z = torch.randn(400, 16, device=device)
    codebook = torch.randn(6, 16, device=device)  # few codes: long segments, many colliding adds
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            cb = codebook.clone().requires_grad_()
            vqkern.quantize(z, cb, backend=backend).loss.backward()
            grads.append(cb.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_reaches_the_segment_sum(backend, monkeypatch, device):
    # On CPU the atomic paths happen to be sequential, so bitwise equality alone cannot
    # show that torch.use_deterministic_algorithms selects the deterministic path.
    seen = []
    get = vqkern.backends.get

    def spying_get(name):
        impl = get(name)

        def segment_sum(indices, values, counts, sums, deterministic):
            seen.append(deterministic)
            impl.segment_sum(indices, values, counts, sums, deterministic)

        def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic):
            seen.append(deterministic)
            impl.backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic)

        return SimpleNamespace(search=impl.search, backward=backward, segment_sum=segment_sum)

    z = torch.randn(40, 8, device=device)
    # The backend's self-check for this key launches too: it runs here, before the spy.
    vqkern.backends.resolve(backend, device, z.dtype, z.dtype, "l2")
    monkeypatch.setattr(vqkern.backends, "get", spying_get)
    layer = vqkern.VectorQuantizer(6, 8, ema=True, backend=backend).to(device)
    for mode in (True, False):
        torch.use_deterministic_algorithms(mode)
        try:
            cb = torch.randn(6, 8, device=device, requires_grad=True)
            vqkern.quantize(z, cb, backend=backend).loss.backward()  # the residual sums
            layer(z)  # EMA statistics
            vqkern.segment_sum(torch.zeros(40, dtype=torch.int64, device=device), z, 6, backend=backend)
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [True] * 3 + [False] * 3


def test_auto_backend_and_environment(monkeypatch, device):
    z, codebook = torch.randn(10, 4, device=device), torch.randn(3, 4, device=device)
    expected = vqkern.backends.resolve("auto", device)
    assert expected in vqkern.backends.BACKENDS
    monkeypatch.setenv("VQKERN_BACKEND", "reference")
    assert vqkern.backends.resolve("auto", device) == "reference"
    idx, _ = vqkern.nearest_code(z, codebook)
    assert_nearest(z, codebook, idx)


def test_explicit_backend_that_cannot_run_raises(device):
    unavailable = [n for n, (ok, _) in vqkern.backends.report(device).items() if not ok]
    if not unavailable:
        pytest.skip("every backend can run on this device")
    name = unavailable[0]
    with pytest.raises(RuntimeError, match=name):
        vqkern.nearest_code(torch.randn(4, 4, device=device), torch.randn(2, 4, device=device), backend=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_generic_path_ranks_in_fp32(dtype):
    # The torch backend's path for non-CPU devices, run here on CPU: codes whose
    # distances differ by ~1e-4 of |z|^2 + |e|^2, which 16-bit scores cannot rank
    # (bf16 scores round at 4e-3 of that scale). It must rank in fp32 with TF32 off.
    from vqkern.backends import torch_
    g = torch.Generator().manual_seed(11)
    d = 32
    base = torch.randn(1, d, generator=g) * 4
    codebook = (base + 0.05 * torch.randn(300, d, generator=g)).to(dtype)
    z = (base + 0.05 * torch.randn(100, d, generator=g)).to(dtype)
    indices = torch.full((100,), -1, dtype=torch.int64)
    torch_._search_blocked(z, codebook, indices)
    assert_nearest(z.float(), codebook.float(), indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA devices")
def test_torch_backend_on_cuda_ignores_tf32_setting():
    # Under set_float32_matmul_precision("high") a plain fp32 matmul uses TF32 (10-bit
    # mantissas): near-ties ~1e-4 of |z|^2 + |e|^2 apart would be ranked wrongly.
    g = torch.Generator().manual_seed(12)
    base = torch.randn(1, 32, generator=g) * 4
    codebook = (base + 0.05 * torch.randn(300, 32, generator=g)).cuda()
    z = (base + 0.05 * torch.randn(100, 32, generator=g)).cuda()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        idx, dist = vqkern.nearest_code(z, codebook, backend="torch")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_nearest(z.cpu(), codebook.cpu(), idx.cpu(), dist.cpu())


@pytest.mark.parametrize("path", ["auto", "tiled", "generic"])
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_torch_backend_non_finite_codes_never_win(path, poison, monkeypatch):
    # torch's min/argmin return a NaN as the minimum: without the mapping to +inf a NaN
    # (or inf - inf) score would pick the poisoned code for every row of its tile.
    from vqkern.backends import torch_
    z = torch.randn(90, 8)
    codebook = torch.randn(200, 8)
    bad = torch.tensor([0, 31, 32, 150, 199])
    codebook[bad, 2] = float(poison)
    good = torch.ones(200, dtype=torch.bool)
    good[bad] = False
    if path == "generic":
        indices = torch.full((90,), -1, dtype=torch.int64)
        torch_._search_blocked(z, codebook, indices)
    else:
        if path == "tiled":
            monkeypatch.setenv("VQKERN_CPU_KERNEL", "0")
            monkeypatch.setenv("VQKERN_TORCH_TILE_CODES", "64")  # bad codes in several tiles
        indices, _ = vqkern.nearest_code(z, codebook, backend="torch")
    assert bool(good[indices].all())
    kept = torch.nonzero(good).flatten()
    assert_nearest(z, codebook[kept], torch.searchsorted(kept, indices))


def test_backward_op_reads_no_scalar_on_the_host(monkeypatch):
    # A host read of grad_commitment (float(), .item()) is a device sync per backward and
    # breaks CUDA graph capture: the scales must reach the backend as device tensors.
    impl = vqkern.backends.get("reference")
    seen = []

    def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic):
        seen.append(scale)
        impl.backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic)

    monkeypatch.setattr(vqkern.backends, "get", lambda name: SimpleNamespace(
        search=impl.search, backward=backward, segment_sum=impl.segment_sum))
    z = torch.randn(30, 5, requires_grad=True)
    codebook = torch.randn(7, 5, requires_grad=True)
    out = vqkern.quantize(z, codebook, backend="reference")
    loss = out.loss + out.quantized.sum()

    def refuse(self, *args):
        raise AssertionError("host read of a tensor during the backward")
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    loss.backward()
    monkeypatch.undo()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].device == z.device
    assert z.grad is not None and codebook.grad is not None
