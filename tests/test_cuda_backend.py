"""The CUDA C++ backend (vqkern._C).

Without a GPU: the extension was built and imports, reports why it cannot run
on CPU, and refuses CPU tensors with a clear error. With a GPU: the kernels
against fp64 ground truth, split-K, the fused backward, both segment-sum paths,
agreement with the Triton backend, and 64-bit offsets past 2^31 elements (slow).
GPU tests skip on the backend's own availability (a probe launch), so a driver
older than the toolkit is reported as the reason rather than failing every call.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

import vqkern
from vqkern import backends
from vqkern.backends import cuda as cuda_backend

from helpers import assert_nearest, exact_distances


def _cuda_backend_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    return backends.availability("cuda", "cuda")


_CUDA_OK, _CUDA_WHY = _cuda_backend_ok()
needs_gpu = pytest.mark.skipif(not _CUDA_OK, reason=f"cuda backend: {_CUDA_WHY}")


def _nvcc_present() -> bool:
    if shutil.which("nvcc"):
        return True
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    return any(h and (Path(h) / "bin" / "nvcc").is_file() for h in homes)


def _ext():
    ext = cuda_backend._load()
    if ext is None:
        pytest.skip(f"vqkern._C is not available: {cuda_backend._ext_error}")
    return ext


# ---------------------------------------------------------------- any machine

def test_extension_builds_and_imports():
    if os.environ.get("VQKERN_SKIP_CUDA_BUILD", "") == "1":
        pytest.skip("VQKERN_SKIP_CUDA_BUILD=1: installed without vqkern._C")
    if not _nvcc_present():
        pytest.skip("nvcc not found: setup.py installed without vqkern._C")
    import vqkern._C as ext  # a failure here is the build or load error, shown in full

    for name in ("search", "backward", "segment_sum_atomic", "segment_sum_sorted"):
        assert callable(getattr(ext, name))
    assert ext.SEARCH_ROWS == 64 and ext.SEGMENT_CHUNK_ROWS > 0 and ext.CUDA_VERSION >= 11000


def test_not_imported_with_vqkern():
    import subprocess
    import sys
    code = "import sys, vqkern; assert 'vqkern._C' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_availability_on_cpu_says_why():
    ok, reason = backends.availability("cuda", "cpu")
    assert not ok
    if cuda_backend._load() is None:
        assert "vqkern._C" in reason and ("not built" in reason or "failed to load" in reason)
    else:
        assert reason == "the CUDA backend takes CUDA tensors, got cpu"


def test_explicit_cuda_backend_on_cpu_raises_with_reason():
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        vqkern.nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="cuda")


def test_launchers_refuse_cpu_tensors():
    _ext()
    z, cb = torch.randn(6, 3), torch.randn(5, 3)
    idx = torch.zeros(6, dtype=torch.int64)
    msg = "must be a CUDA tensor, got a tensor on cpu"
    with pytest.raises(ValueError, match="z " + msg):
        cuda_backend.search(z, cb, idx, torch.empty(6), torch.empty(6, 3))
    with pytest.raises(ValueError, match="z " + msg):
        cuda_backend.backward(torch.randn(6, 3), z, cb, idx, torch.ones(1), torch.empty(6, 3), None, False)
    with pytest.raises(ValueError, match="values " + msg):
        cuda_backend.segment_sum(idx, z, torch.zeros(5), torch.zeros(5, 3), True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_binding_without_gpu_raises_naming_the_call():
    ext = _ext()
    # Null pointers never reach a kernel: the device query fails first, and the error
    # names the CUDA call instead of crashing the interpreter.
    with pytest.raises(RuntimeError, match=r"vqkern\._C: cudaGetDevice failed"):
        ext.backward(0, 0, 0, 0, 0, 0, 0, 0, 4, 3, 0, 0, 0, 0)


def test_split_choice():
    assert cuda_backend.choose_splits(65536, 16384, 132) == 1  # rows alone fill the GPU
    assert cuda_backend.choose_splits(256, 2**20, 132) == 66  # 4 row blocks x 66 splits
    assert cuda_backend.choose_splits(10, 100, 132) == 1  # 2 code tiles: nothing to split
    assert cuda_backend.choose_splits(1, 10**6, 132) == 264


# ---------------------------------------------------------------- GPU only

def _poisoned(n, d, dtype, device="cuda"):
    return (torch.full((n,), -7, dtype=torch.int64, device=device),
            torch.full((n,), float("nan"), device=device),
            torch.full((n, d), float("nan"), dtype=dtype, device=device))


def _run_search(z, cb, **kw):
    idx, dist, q = _poisoned(z.shape[0], z.shape[1], z.dtype, z.device)
    cuda_backend.search(z, cb, idx, dist, q, **kw)
    return idx, dist, q


CASES = [(1, 1, 1), (37, 7, 3), (130, 1000, 65), (300, 70001, 16), (65, 129, 1000)]


@needs_gpu
@pytest.mark.parametrize("n,k,d", CASES)
@pytest.mark.parametrize("z_dtype,cb_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_search_against_fp64(n, k, d, z_dtype, cb_dtype):
    _ext()
    z = torch.randn(n, d, device="cuda").to(z_dtype)
    cb = torch.randn(k, d, device="cuda").to(cb_dtype)
    idx, dist, q = _run_search(z, cb)
    assert_nearest(z, cb, idx, dist)
    assert torch.equal(q, cb[idx].to(z_dtype))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_k_matches_single_pass(dtype):
    _ext()
    # Each code's score is computed the same way whatever split holds it, so the
    # chosen indices must be identical, not merely close.
    z = torch.randn(50, 64, device="cuda").to(dtype)
    cb = torch.randn(5000, 64, device="cuda").to(dtype)
    runs = [_run_search(z, cb, splits=s) for s in (1, 2, 7, 79, 1000)]
    assert_nearest(z, cb, runs[0][0], runs[0][1])
    for idx, dist, q in runs[1:]:
        assert torch.equal(idx, runs[0][0]) and torch.equal(dist, runs[0][1]) and torch.equal(q, runs[0][2])


@needs_gpu
@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("splits", [1, 5])
def test_ties_lowest_index_across_tiles_and_splits(tensor_cores, splits):
    _ext()
    base = torch.randn(70, 32, device="cuda").half()
    cb = torch.cat([base] * 4)  # copies 70 apart: in other tiles and other splits
    z = base[torch.arange(300, device="cuda") % 70]
    idx, _, _ = _run_search(z, cb, splits=splits, tensor_cores=tensor_cores)
    assert torch.equal(idx, torch.arange(300, device="cuda") % 70)


@needs_gpu
def test_exact_indices_and_triton_agreement():
    _ext()
    cb = torch.randn(3000, 48, device="cuda") * 10
    truth = torch.randint(3000, (2000,), device="cuda")
    z = cb[truth] + 0.01 * torch.randn(2000, 48, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        idx, dist, _ = _run_search(z.to(dtype), cb.to(dtype))
        assert torch.equal(idx, truth)
    ok, reason = backends.availability("triton", "cuda")
    if not ok:
        pytest.skip(f"triton backend unavailable: {reason}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        zz, cc = torch.randn(999, 40, device="cuda").to(dtype), torch.randn(777, 40, device="cuda").to(dtype)
        ic, dc = vqkern.nearest_code(zz, cc, backend="cuda")
        it, dt = vqkern.nearest_code(zz, cc, backend="triton")
        exact = exact_distances(zz, cc)
        # Where the two differ, both choices must be (near-)ties in fp64.
        gap = (exact.gather(1, ic[:, None]) - exact.gather(1, it[:, None])).abs()
        assert (gap.squeeze(1)[ic != it] <= 1e-4 * exact.max()).all()
        same = ic == it
        torch.testing.assert_close(dc[same], dt[same], rtol=1e-5, atol=1e-5)


def _backward(g, z, cb, idx, scale, deterministic, grad_z=True, sums=True):
    out = torch.full_like(z, float("nan")) if grad_z else None
    diff_sums = torch.zeros(cb.shape, device=z.device) if sums else None
    cuda_backend.backward(g, z, cb, idx, torch.tensor([scale], device=z.device), out, diff_sums, deterministic)
    return out, diff_sums


@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("z_dtype,cb_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32)])
def test_backward_against_fp64(z_dtype, cb_dtype, deterministic):
    _ext()
    n, k, d = 513, 97, 67
    z = torch.randn(n, d, device="cuda").to(z_dtype)
    cb = torch.randn(k, d, device="cuda").to(cb_dtype)
    g = torch.randn(n, d, device="cuda").to(z_dtype)
    idx = torch.randint(k, (n,), device="cuda")
    out, diff_sums = _backward(g, z, cb, idx, 0.375, deterministic)
    ref = g.double() + 0.375 * (z.double() - cb.double()[idx])
    plain = (g.float() + 0.375 * (z.float() - cb[idx].float())).to(z_dtype)
    err, plain_err = (out.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert out.dtype == z_dtype and err <= 2 * plain_err + 1e-6
    residual = cb.float()[idx] - z.float()  # each difference as the kernel forms it
    _assert_sums_close(diff_sums, idx, residual, k)


@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_residual_sums_when_every_row_picks_one_code(deterministic):
    _ext()
    n, k, d = 70000, 5, 32
    cb = torch.randn(k, d, device="cuda") + 100.0
    idx = torch.full((n,), 3, device="cuda")
    z = cb[idx] + 0.01 * torch.randn(n, d, device="cuda")
    _, diff_sums = _backward(z, z, cb, idx, 0.0, deterministic, grad_z=False)
    _assert_sums_close(diff_sums, idx, cb[idx] - z, k)
    if deterministic:
        assert torch.equal(_backward(z, z, cb, idx, 0.0, True, grad_z=False)[1], diff_sums)


def _assert_sums_close(sums, idx, values, k):
    """Within the worst-case bound of fp32 summation in any order: an fp32 sum of m
    terms is off by at most (m - 1) * 2^-24 * sum|x_i| (recursive or tree order)."""
    ref = torch.zeros(k, values.shape[1], dtype=torch.float64, device=values.device)
    abs_sum = torch.zeros_like(ref)
    for start in range(0, idx.shape[0], 2**20):  # fp64 copies of huge inputs a chunk at a time
        part, rows = idx[start:start + 2**20], values[start:start + 2**20].double()
        ref.index_add_(0, part, rows)
        abs_sum.index_add_(0, part, rows.abs())
    m = torch.bincount(idx, minlength=k).double()[:, None]
    bound = (m * 2.0**-24) * abs_sum + 1e-30
    err = (sums.double() - ref).abs()
    assert bool((err <= bound).all()), f"worst error {(err / bound).max().item():.3g} x the fp32 bound"


@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n,k,d,heavy", [(1, 1, 1, 0), (1000, 37, 19, 300), (5000, 3, 130, 5000),
                                         (777, 5000, 8, 0), (4096, 64, 256, 2000)])
def test_segment_sum_paths(deterministic, n, k, d, heavy):
    _ext()
    idx = torch.randint(k, (n,), device="cuda")
    idx[:heavy] = k // 2  # one code spanning many chunks of sorted rows
    idx = idx[torch.randperm(n, device="cuda")]
    values = torch.randn(n, d, device="cuda").bfloat16()
    counts, sums = torch.zeros(k, device="cuda"), torch.zeros(k, d, device="cuda")
    cuda_backend.segment_sum(idx, values, counts, sums, deterministic)
    assert torch.equal(counts.double(), torch.bincount(idx, minlength=k).double())
    _assert_sums_close(sums, idx, values, k)
    if deterministic:
        again_c, again_s = torch.zeros_like(counts), torch.zeros_like(sums)
        cuda_backend.segment_sum(idx, values, again_c, again_s, True)
        assert torch.equal(again_c, counts) and torch.equal(again_s, sums)


@needs_gpu
def test_segment_sum_adds_into_given_outputs():
    _ext()
    idx = torch.randint(10, (600,), device="cuda")
    # Small integers: every partial sum is exact in fp32, so any order gives the same sums.
    values = torch.randint(-8, 9, (600, 4), device="cuda").float()
    for deterministic in (False, True):
        counts, sums = torch.ones(10, device="cuda"), torch.ones(10, 4, device="cuda")
        cuda_backend.segment_sum(idx, values, counts, sums, deterministic)
        assert torch.equal(sums, torch.ones(10, 4, device="cuda").index_add_(0, idx, values))
        assert torch.equal(counts, 1 + torch.bincount(idx, minlength=10).float())


@needs_gpu
def test_quantize_backward_through_public_api():
    # Codes far apart relative to the noise: no near-ties, so the indices (and with
    # them the gradients) must match the fp64 reference exactly.
    cb = (3 * torch.randn(50, 24, device="cuda")).requires_grad_()
    z = (cb.detach()[torch.randint(50, (333,), device="cuda")]
         + 0.3 * torch.randn(333, 24, device="cuda")).requires_grad_()
    out = vqkern.quantize(z, cb, backend="cuda")
    (out.quantized.square().sum() + out.loss).backward()
    z_ref, cb_ref = z.detach().double().requires_grad_(), cb.detach().double().requires_grad_()
    ref = vqkern.reference.quantize(z_ref, cb_ref, 0.25)
    (ref.quantized.square().sum() + ref.loss).backward()
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.grad.double(), cb_ref.grad, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.slow
def test_offsets_past_2_to_31_elements():
    _ext()
    # N * D = 2^31 + 192 elements of fp16: a 32-bit element offset would wrap.
    n, d, k = 2**25 + 3, 64, 96
    cb = torch.randn(k, d, device="cuda").half()
    truth = torch.randint(k, (n,), device="cuda")
    z = cb[truth]
    z[-5:] += 0.01 * torch.randn(5, d, device="cuda").half()
    idx, dist, q = _run_search(z, cb)
    assert torch.equal(idx, truth) and torch.equal(q[:-5], z[:-5])
    assert bool((dist[:-5] == 0).all()) and bool((dist[-5:] > 0).all())
    del q, dist
    out, _ = _backward(z, z, cb, idx, 1.0, False, sums=False)
    tail = slice(n - 1000, n)
    assert torch.equal(out[tail], (z[tail].float() + (z[tail].float() - cb[idx[tail]].float())).half())
    del out
    for deterministic in (False, True):
        counts, sums = torch.zeros(k, device="cuda"), torch.zeros(k, d, device="cuda")
        cuda_backend.segment_sum(idx, z, counts, sums, deterministic)
        assert torch.equal(counts.double(), torch.bincount(idx, minlength=k).double())
        _assert_sums_close(sums, idx, z, k)
