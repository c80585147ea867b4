"""vqkern.lfq_entropy: values and gradients against fp64 on every backend, the registered
ops under opcheck, bad input, thread invariance of the C++ kernel, bounded memory."""
import math
import os
import subprocess
import sys

import pytest
import torch

from vqkern import backends
from vqkern.backends import lfq_torch
from vqkern.backends.torch_ import _active_cpu_ext
from vqkern.lfq_entropy import lfq_entropy, lfq_entropy_backward_op, lfq_entropy_dense, lfq_entropy_op

from conftest import DEVICE, backend_params

U32 = 2.0 ** -24
EPS = 1e-5


def _cases():
    # (rows, codebooks, bits, input scale): weird row counts, d from 1 to 10 (the dense
    # oracle's limit), inputs from near zero (every code near-uniform, the eps clamp on
    # every code) to confident (most table entries underflow to 0).
    return [(1, 1, 1, 1.0), (33, 2, 3, 1.0), (7, 3, 5, 0.003), (40, 1, 8, 0.05), (17, 2, 10, 1.0), (25, 1, 9, 0.01)]


def _oracle(x, scale, ge, gp):
    """fp64 values and gradient of sum(entropy * ge) + sum(prob_sum * gp)."""
    x64 = x.double().requires_grad_()
    ent, sums = lfq_entropy_dense(x64, scale, EPS)
    ((ent * ge.double()).sum() + (sums * gp.double()).sum()).backward()
    return ent.detach(), sums.detach(), x64.grad


def _plain_fp32_grad(x, scale, ge, gp):
    x32 = x.clone().requires_grad_()
    ent, sums = lfq_entropy_dense(x32, scale, EPS)
    ((ent * ge).sum() + (sums * gp).sum()).backward()
    return x32.grad


@pytest.fixture(params=["cpu_kernel", "tiled"])
def torch_path(request, monkeypatch):
    """The torch backend's two CPU paths: the C++ kernel and tiled PyTorch."""
    if request.param == "cpu_kernel" and _active_cpu_ext()[0] is None:
        pytest.skip("vqkern._cpu is not built here")
    if request.param == "tiled":
        monkeypatch.setenv("VQKERN_CPU_KERNEL", "0")
    return request.param


def _check_backend(backend, n, c, d, sx, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, d, generator=g) * sx).to(DEVICE)
    inv_t, s = 100.0, 0.75
    scale = 4 * inv_t * s
    ge = torch.randn(n, c, generator=g).to(DEVICE)
    gp = torch.randn(c, 1 << d, generator=g).to(DEVICE)
    ent64, sums64, grad64 = _oracle(x, scale, ge, gp)
    xx = x.clone().requires_grad_()
    ent, sums = lfq_entropy(xx, inv_temperature=inv_t, code_scale=s, backend=backend)
    assert ent.dtype == sums.dtype == torch.float32 and ent.shape == (n, c) and sums.shape == (c, 1 << d)
    # Values: sums of nonnegative terms, each accurate to a few roundings per bit.
    torch.testing.assert_close(ent.double(), ent64, rtol=8 * d * U32 + 1e-6, atol=1e-7)
    torch.testing.assert_close(sums.double(), sums64, rtol=8 * d * U32 + 1e-6, atol=1e-7 * n)
    ((ent * ge).sum() + (sums * gp).sum()).backward()
    err = (xx.grad.double() - grad64).abs().max().item()
    err_plain = (_plain_fp32_grad(x, scale, ge, gp).double() - grad64).abs().max().item()
    floor = 8 * U32 * grad64.abs().max().item()
    assert err <= 2 * err_plain + floor, (err, err_plain, floor)


@pytest.mark.parametrize("n,c,d,sx", _cases())
def test_torch_backend_against_fp64(torch_path, n, c, d, sx):
    _check_backend("torch", n, c, d, sx, seed=d)


@pytest.mark.parametrize("backend", backend_params(("triton", "reference")))
@pytest.mark.parametrize("n,c,d,sx", [(33, 2, 3, 1.0), (17, 2, 10, 1.0), (25, 1, 9, 0.01)])
def test_other_backends_against_fp64(backend, n, c, d, sx):
    _check_backend(backend, n, c, d, sx, seed=d + 1)


@pytest.mark.parametrize("backend", backend_params(("torch", "triton")))
def test_each_term_alone_and_non_contiguous_input(backend):
    """A loss on one output only (the other gradient arrives as None), non-contiguous x."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 20, 3, generator=g).to(DEVICE) * 0.02
    x = base.transpose(0, 1)[:, :, :]  # (20, 6, 3) -> take 2 codebooks of 3 bits: (20, 2, 3)
    x = x[:, ::3]
    assert not x.is_contiguous()
    for which in ("entropy", "sums"):
        xx = x.clone().requires_grad_()
        ent, sums = lfq_entropy(xx, backend=backend)
        (ent.sum() if which == "entropy" else (sums * sums).sum()).backward()
        x64 = x.double().requires_grad_()
        e64, s64 = lfq_entropy_dense(x64, 400.0, EPS)
        (e64.sum() if which == "entropy" else (s64 * s64).sum()).backward()
        torch.testing.assert_close(xx.grad.double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())


def test_no_rows_and_non_finite_rows():
    ent, sums = lfq_entropy(torch.empty(0, 2, 4))
    assert ent.shape == (0, 2) and torch.equal(sums, torch.zeros(2, 16))
    x = torch.randn(5, 1, 6)
    x[2, 0, 4] = float("nan")
    for backend in ("torch", "reference"):
        ent, sums = lfq_entropy(x, backend=backend)
        assert torch.isnan(ent[2, 0]) and torch.isfinite(ent[[0, 1, 3, 4]]).all(), backend


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 5)), "x must have shape"),
    (dict(x=torch.randn(4, 0, 3)), "C >= 1"),
    (dict(x=torch.randn(4, 1, 25)), "last dimension d"),
    (dict(x=torch.randn(4, 1, 0)), "last dimension d"),
    (dict(x=torch.ones(4, 1, 3, dtype=torch.int64)), "floating dtype"),
    (dict(inv_temperature=float("inf")), "inv_temperature must be finite"),
    (dict(code_scale=float("nan")), "code_scale must be finite"),
    (dict(eps=0.0), "eps must lie in"),
    (dict(backend="nope"), "backend must be one of"),
])
def test_bad_input_names_the_argument(bad, match):
    kwargs = dict(x=torch.randn(4, 1, 3))
    kwargs.update(bad)
    x = kwargs.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        lfq_entropy(x, **kwargs)


def test_opcheck():
    x = torch.randn(9, 2, 5, device=DEVICE)
    backend = backends.resolve("auto", DEVICE)
    torch.library.opcheck(lfq_entropy_op, (x, 300.0, EPS, backend))
    torch.library.opcheck(lfq_entropy_op, (x.requires_grad_(), 300.0, EPS, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    ge, gp = torch.randn(9, 2, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    torch.library.opcheck(lfq_entropy_backward_op, (x.detach(), ge, gp, 300.0, EPS, backend))
    torch.library.opcheck(lfq_entropy_backward_op, (x.detach(), None, gp, 300.0, EPS, backend))


def test_compiles_fullgraph():
    def loss(x):
        ent, sums = lfq_entropy(x, inv_temperature=50.0)
        avg = sums / x.shape[0]
        return ent.mean() + (avg * avg.clamp(min=EPS).log()).sum()

    x = torch.randn(12, 1, 6, device=DEVICE, requires_grad=True)
    expected = loss(x)
    (g_eager,) = torch.autograd.grad(expected, x)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (g_comp,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.skipif(_active_cpu_ext()[0] is None, reason="vqkern._cpu is not built here")
@pytest.mark.parametrize("d", [2, 11, 14])
def test_cpu_kernel_is_bitwise_thread_invariant(d):
    ext = _active_cpu_ext()[0]
    g = torch.Generator().manual_seed(d)
    n, c = 301, 2
    x = torch.randn(n, c, d, generator=g) * 0.02
    x[::7] *= 100  # confident rows: most half-table entries are exactly 0 and skipped
    ge, gp = torch.randn(n, c, generator=g), torch.randn(c, 1 << d, generator=g)

    def run(threads):
        ent = torch.full((n, c), float("nan"))
        sums = torch.zeros(c, 1 << d)
        grad = torch.full_like(x, float("nan"))
        ext.lfq_entropy(x.data_ptr(), n, c, d, 400.0, EPS, ent.data_ptr(), sums.data_ptr(), threads)
        ext.lfq_entropy_backward(x.data_ptr(), n, c, d, 400.0, EPS, ge.data_ptr(), gp.data_ptr(), grad.data_ptr(),
                                 threads)
        return ent, sums, grad

    one, four = run(1), run(4)
    for a, b in zip(one, four):
        assert not torch.isnan(a).any() and torch.equal(a, b)
    # d = 14 is too large for the dense oracle here; the tiled path checks it.
    ent, sums = torch.empty(n, c), torch.zeros(c, 1 << d)
    lfq_torch.lfq_entropy_tiled(x, 400.0, EPS, ent, sums)
    torch.testing.assert_close(one[0], ent, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(one[1], sums, rtol=2e-6, atol=1e-7 * n)


def test_entropy_clamp_matters_and_is_kept():
    """At 2^17 codes a near-uniform row has every p below eps = 1e-5: the clamped entropy
    is -log(1e-5) = 11.51, not 17 log 2 = 11.78, as vector_quantize_pytorch defines it."""
    x = torch.full((3, 1, 17), 1e-6)
    ent, sums = lfq_entropy(x)
    torch.testing.assert_close(ent, torch.full((3, 1), -math.log(EPS)), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums.sum(), torch.tensor(3.0), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_memory_at_2_to_16_codes_stays_far_below_n_by_codes():
    """Peak resident memory of forward + backward at 16,384 rows and 2^16 codes (the dense
    (N, 2^d) fp32 matrix alone is 4 GiB), in a fresh process."""
    code = (
        "import resource, torch, vqkern\n"
        "from vqkern.lfq_entropy import lfq_entropy\n"
        "torch.manual_seed(0)\n"
        "x = (torch.randn(16384, 1, 16) * 0.05).requires_grad_()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ent, sums = lfq_entropy(x)\n"
        "avg = sums / x.shape[0]\n"
        "(ent.mean() + (avg * avg.clamp(min=1e-5).log()).sum()).backward()\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ), timeout=1200)
    growth = int(out.stdout.split()[-1])
    dense = 16384 * (1 << 16) * 4
    assert growth < dense / 50, f"peak memory grew by {growth / 2**20:.0f} MiB (dense: {dense / 2**20:.0f} MiB)"
