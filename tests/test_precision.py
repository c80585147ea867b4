"""Precision where plain fp32 arithmetic fails: many rows summed into one code, and data far
from the origin. Every backend this machine runs, through the public API.

- Codebook-gradient sums: one code takes 10^5 rows of z (fp16/bf16/fp32) against an fp32
  codebook. Residuals e - z of half-precision rows share the code's low-order bits, so a
  plain running fp32 sum rounds the same way at every step and its error grows with the
  rows (300 to 8000 fp32 ulps of sum|e - z| at 10^5 rows against PyTorch autograd's 1 to
  400). The codebook gradient must stay within twice plain PyTorch's error (fp32 autograd
  of the same loss) against fp64, in atomic and deterministic mode (the GPU backends'
  atomic mode with the fuzz test's floor); segment_sum's sums within twice torch.sum's.
- Ranking far from the origin: data 50 standard deviations out (N = 4000, K = 1024,
  D = 128). The fp32 expansion |e|^2 - 2 z.e rounds at the scale of |z|^2 + |e|^2 and chose
  a wrong code on 48 of 4000 rows (up to 0.21% farther); searches ranked in the
  codebook-centred frame find every nearest code within a bound relative to the spread.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import vqkern
from vqkern import backends
from vqkern.check.policy import GRAD_FLOOR_ULPS

from helpers import assert_nearest, exact_distances
from test_fuzz import TARGETS
from test_fuzz import _target as fuzz_target


@pytest.fixture(params=list(TARGETS))
def target(request, monkeypatch):
    """(backend, device) of a target of the fuzz test, skipped with the reason where it cannot run."""
    backend, device, _ = fuzz_target(request.param, monkeypatch)
    return backend, device


@contextlib.contextmanager
def _deterministic(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _max_error(got, exact):
    return (got.double() - exact).abs().max().item()


# ---------------------------------------------------------------- codebook-gradient sums

ROWS = 100_000
# The Triton interpreter runs ~10 ms per program: 10^5 rows take minutes there, so its
# default case has 10^4 rows (the 10^5-row cases run under the slow marker).
INTERPRETER_ROWS = 10_000


def _rows(backend, device, request):
    if backend == "triton" and device == "cpu" and request.node.get_closest_marker("slow") is None:
        return INTERPRETER_ROWS
    return ROWS


def _one_code_rows(kind, z_dtype, n, d, seed=0):
    """z (n, d) in z_dtype whose nearest code is code 0 of codebook (2, d) fp32 (code 1 is
    far away, chosen by no row). near: z = e_0 + noise (a trained quantizer's rows); far:
    z independent of e_0, so the residuals share a common part e_0 - mean(z)."""
    g = torch.Generator().manual_seed(seed)
    e0 = torch.randn(d, generator=g) + 3.0
    codebook = torch.stack([e0, e0 + 1000.0])
    noise = torch.randn(n, d, generator=g)
    z = (e0 + noise) if kind == "near" else (noise + 3.0)
    return z.to(z_dtype), codebook


def _check_codebook_gradient(backend, device, n, kind, z_dtype, deterministic):
    z, codebook = (t.to(device) for t in _one_code_rows(kind, z_dtype, n, 32))
    cb_leaf = codebook.clone().requires_grad_()
    with _deterministic(deterministic):
        out = vqkern.quantize(z, cb_leaf, backend=backend)
        out.codebook_loss.backward()
    assert bool((out.indices == 0).all())
    z64, e64 = z.double(), codebook.double()
    exact = 2.0 / z.numel() * (e64[0] - z64).sum(0)
    # Plain PyTorch: autograd of the same loss in fp32, as the fuzz test's plain computation.
    plain_leaf = codebook.clone().requires_grad_()
    ((z.float() - plain_leaf[out.indices]) ** 2).mean().backward()
    err, plain_err = _max_error(cb_leaf.grad[0], exact), _max_error(plain_leaf.grad[0], exact)
    size = 2.0 / z.numel() * (e64[0] - z64).abs().sum(0).max().item()
    floor = 0.0
    if not deterministic and backend in ("triton", "cuda"):
        # The GPU atomic modes add one partial sum per block of rows with an fp32 atomic, in
        # any order: the fuzz test's rule, with its floor for the order of a sum of n terms.
        floor = GRAD_FLOOR_ULPS * n ** 0.5 * size
    assert err <= 2 * plain_err + floor, (
        f"codebook gradient error {err / size / 2**-24:.3g} fp32 ulps of sum|e - z|, more than twice plain "
        f"PyTorch's {plain_err / size / 2**-24:.3g} + {floor / size / 2**-24:.3g}")
    assert bool((cb_leaf.grad[1] == 0).all())


MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
KINDS = pytest.mark.parametrize("kind", ["near", "far"])


@MODES
@pytest.mark.parametrize("z_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@KINDS
def test_codebook_gradient_of_one_code_over_many_rows(target, kind, z_dtype, deterministic, request):
    backend, device = target
    _check_codebook_gradient(backend, device, _rows(backend, device, request), kind, z_dtype, deterministic)


@pytest.mark.slow
@MODES
@pytest.mark.parametrize("z_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@KINDS
def test_codebook_gradient_of_one_code_over_many_rows_slow(target, kind, z_dtype, deterministic, request):
    backend, device = target
    _check_codebook_gradient(backend, device, _rows(backend, device, request), kind, z_dtype, deterministic)


@MODES
@pytest.mark.parametrize("z_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_segment_sum_of_one_code_over_many_rows(target, z_dtype, deterministic, request):
    """Sums of z rows (the EMA statistic) against fp64. Deterministic mode and the CPU
    backends: within twice torch.sum's error over the same rows (a cascade of fp32 partial
    sums). The GPU backends' atomic mode adds one partial sum per block of 64 rows with an
    fp32 atomic, in any order: its error may grow like the square root of the blocks, one
    rounding of the running sum each (docs/precision.md)."""
    backend, device = target
    n = _rows(backend, device, request)
    z, _ = _one_code_rows("far", z_dtype, n, 32)
    z = z.to(device)
    indices = torch.zeros(n, dtype=torch.int64, device=device)
    indices[::1000] = 1  # a second code, so that the sums are per code
    counts, sums = vqkern.segment_sum(indices, z, 2, backend=backend, deterministic=deterministic)
    assert counts.tolist() == [n - n // 1000, n // 1000]
    rows = z[indices == 0]
    exact = rows.double().sum(0)
    plain_err = _max_error(rows.float().sum(0), exact)
    err = _max_error(sums[0], exact)
    allowance = 0.0
    if not deterministic and backend in ("triton", "cuda"):
        allowance = 2.0**-24 * (rows.shape[0] / 64) ** 0.5 * rows.double().abs().sum(0).max().item()
    assert err <= 2 * plain_err + allowance, (f"segment_sum error {err:.3g} > 2 x torch.sum's {plain_err:.3g} "
                                              f"+ {allowance:.3g}")


# ---------------------------------------------------------------- ranking far from the origin

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@functools.lru_cache(maxsize=4)
def _far_data(n, z_dtype, cb_dtype):
    """z (n, 128) and codebook (1024, 128) 50 standard deviations out on every coordinate,
    on CPU, with their exact (n, 1024) distances."""
    g = torch.Generator().manual_seed(0)
    codebook = (torch.randn(1024, 128, generator=g) + 50.0).to(cb_dtype)
    z = (torch.randn(4000, 128, generator=g)[:n] + 50.0).to(z_dtype)
    return z, codebook, exact_distances(z, codebook)


def _check_far_data(backend, device, n, dtypes):
    z, codebook, exact = _far_data(n, *dtypes)
    indices, distances = vqkern.nearest_code(z.to(device), codebook.to(device), backend=backend)
    centred = backends.centred_ranking(backend, device, z.dtype, codebook.dtype)
    assert_nearest(z, codebook, indices.cpu(), distances.cpu(), centred=centred, exact=exact)
    if dtypes == (FP32, FP32):
        # The data defeats the origin's frame: the fp32 expansion misses beyond that bound.
        expansion = (codebook.square().sum(1) - 2 * z @ codebook.T).argmin(1)
        with pytest.raises(AssertionError, match="farther than the nearest"):
            assert_nearest(z, codebook, expansion, centred=True, exact=exact)


FAR_DTYPES = pytest.mark.parametrize("dtypes", [(FP32, FP32), (BF16, FP32), (BF16, BF16), (FP16, FP16)],
                                     ids=["fp32", "bf16-fp32", "bf16", "fp16"])


@FAR_DTYPES
def test_data_far_from_the_origin(target, dtypes):
    """z and codes 50 standard deviations out on every coordinate (1000 of the rows below).
    The searches that rank in the codebook-centred frame find every nearest code within
    RANK_RTOL of the data's spread (|z - c|^2 + max|e - c|^2), where the plain fp32
    expansion misses by more; the others (fp16/bf16 operands multiplied as they are) keep
    their bound relative to |z|^2 + max|e|^2 (vqkern.backends.centred_ranking)."""
    _check_far_data(*target, 1000, dtypes)


@pytest.mark.slow
@FAR_DTYPES
def test_data_far_from_the_origin_4000_rows(target, dtypes):
    """The case as found: N = 4000, K = 1024, D = 128, where the fp32 expansion and
    torch.cdist chose a farther code on 48 rows (up to 0.21% farther)."""
    _check_far_data(*target, 4000, dtypes)
