"""The torch backend's CPU search paths: the fused C++ kernel (vqkern._cpu) on each
ISA path the CPU can run (VQKERN_CPU_ISA=avx2|avx512|avx512bf16|amx; the others skip
with the instructions they lack) and the tiled PyTorch path (VQKERN_CPU_KERNEL=0),
each against the fp64 reference; the paths against each other; the one-pass
backward kernel against fp64 and plain PyTorch."""
import ast
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vqkern
from vqkern.backends import torch_

from helpers import assert_nearest

THREADS = torch.get_num_threads()

os.environ.pop("VQKERN_CPU_ISA", None)  # the tests choose the path themselves
KERNEL_OK, KERNEL_REASON = torch_.cpu_kernel()
needs_kernel = pytest.mark.skipif(not KERNEL_OK, reason=f"vqkern._cpu unavailable: {KERNEL_REASON}")


def _isa_param(isa):
    missing = torch_.cpu_isa_missing(isa)
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(bool(missing), reason=f"no {isa} path here: {missing}"))


ISA_PARAMS = [_isa_param(isa) for isa in torch_.CPU_ISAS]


@pytest.fixture(params=[*ISA_PARAMS, "tiled"])
def path(request, monkeypatch):
    kernel = request.param != "tiled"
    monkeypatch.setenv("VQKERN_CPU_KERNEL", "1" if kernel else "0")
    if kernel:
        monkeypatch.setenv("VQKERN_CPU_ISA", request.param)
    ok, reason = torch_.cpu_kernel()
    assert ok == kernel and (not kernel or f"({request.param}:" in reason), reason
    return request.param


@pytest.fixture(params=[p for p in ISA_PARAMS if p.values[0] not in torch_.BF16_ISAS])
def fp32_isa(request):
    """An fp32 kernel path of vqkern._cpu (avx512bf16's and amx's fp32 kernel is avx512's)."""
    return request.param


@pytest.fixture(params=[p for p in ISA_PARAMS if p.values[0] in torch_.BF16_ISAS])
def bf16_isa(request):
    """A path of vqkern._cpu that searches bf16 as bf16."""
    return request.param


def needs_isa(isa):
    missing = torch_.cpu_isa_missing(isa)
    return pytest.mark.skipif(bool(missing), reason=f"no {isa} path here: {missing}")


def _ext():
    return torch_._load_cpu_ext()[0]


def _direct(z, codebook, threads=2, isa="avx2"):
    """(indices, distances, quantized) from one direct kernel call, outputs poisoned first."""
    n, d = z.shape
    idx = torch.full((n,), -1, dtype=torch.int64)
    dist = torch.full((n,), float("nan"))
    quantized = torch.full((n, d), float("nan"), dtype=z.dtype)
    args = (z.data_ptr(), n, z.stride(0), codebook.data_ptr(), codebook.shape[0], codebook.stride(0), d,
            idx.data_ptr(), dist.data_ptr(), quantized.data_ptr(), quantized.stride(0), threads)
    (_ext().search_l2_bf16 if z.dtype == torch.bfloat16 else _ext().search_l2)(*args, isa)
    return idx, dist, quantized


# Rows: every remainder of the 6-row micro-kernel and of the 96-row work item;
# codes: every remainder of the 16-code panel; D: 1, odd, past one L2 block.
SHAPES = [(1, 1, 1), (5, 7, 3), (13, 17, 65), (97, 16, 8), (203, 1000, 64), (50, 70001, 3),
          (11, 33, 1000), (100, 300, 256)]


@pytest.mark.parametrize("n,k,d", SHAPES, ids=[f"{n}x{k}x{d}" for n, k, d in SHAPES])
def test_nearest_matches_reference(path, n, k, d):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    indices, distances = vqkern.nearest_code(z, codebook, backend="torch")
    assert_nearest(z, codebook, indices, distances)


def test_exact_indices_on_separated_codes(path):
    # Codes far apart and inputs near them: no near-ties, so the index is exact.
    codebook = torch.randn(300, 32) * 10
    truth = torch.randint(0, 300, (1000,))
    z = codebook[truth] + 0.01 * torch.randn(1000, 32)
    indices, _ = vqkern.nearest_code(z, codebook, backend="torch")
    assert torch.equal(indices, truth)


def test_identical_codes_tie_to_lowest_index(path):
    # Three copies of 50 codes, so copies sit in different lanes and panels; every
    # input is one of the codes: its nearest distance is 0, tied three ways.
    base = torch.randn(50, 16)
    codebook = torch.cat([base, base, base])
    pick = torch.randint(0, 150, (400,))
    indices, distances = vqkern.nearest_code(codebook[pick], codebook, backend="torch")
    assert torch.equal(indices, pick % 50)
    assert torch.equal(distances, torch.zeros(400))


def test_all_codes_equal_picks_first(path):
    codebook = torch.ones(37, 5)
    indices, _ = vqkern.nearest_code(torch.randn(20, 5), codebook, backend="torch")
    assert torch.equal(indices, torch.zeros(20, dtype=torch.int64))


@pytest.mark.parametrize("d", [1, 7, 8, 67, 1000])
def test_quantize_outputs_and_distances(path, d):
    # fp32 takes the kernel's fused epilogue, bf16 z the PyTorch one: both must give
    # the code rows exactly and distances from the residual.
    codebook = torch.randn(50, d)
    for z in (torch.randn(77, d), torch.randn(77, d).bfloat16()):
        out = vqkern.quantize(z, codebook, backend="torch")
        assert out.quantized.dtype == z.dtype
        assert torch.equal(out.quantized, codebook[out.indices].to(z.dtype))
        _, distances = vqkern.nearest_code(z, codebook, backend="torch")
        assert_nearest(z.float(), codebook, out.indices, distances)


def test_non_contiguous_and_half_inputs(path):
    z = torch.randn(40, 64, 3)[:, :, 1]          # stride (192, 3)
    codebook = torch.randn(100, 64)
    indices, distances = vqkern.nearest_code(z, codebook, backend="torch")
    assert_nearest(z, codebook, indices, distances)
    zb = torch.randn(40, 64).bfloat16()
    indices, _ = vqkern.nearest_code(zb, codebook, backend="torch")
    assert_nearest(zb.float(), codebook, indices)


def test_nan_row_gives_valid_index_and_nan_distance(path):
    z, codebook = torch.randn(10, 8), torch.randn(20, 8)
    z[3, 2] = float("nan")
    indices, distances = vqkern.nearest_code(z, codebook, backend="torch")
    assert 0 <= int(indices[3]) < 20
    assert torch.isnan(distances[3]) and torch.isfinite(distances[torch.arange(10) != 3]).all()
    keep = torch.arange(10) != 3
    assert_nearest(z[keep], codebook, indices[keep])


@pytest.mark.parametrize("isa,dtype", [
    pytest.param(isa, torch.bfloat16 if isa in torch_.BF16_ISAS else torch.float32, id=isa, marks=needs_isa(isa))
    for isa in torch_.CPU_ISAS])
@pytest.mark.parametrize("n,k", [(1000, 500), (30, 5000), (150, 9000)], ids=["row-blocks", "code-splits", "both"])
def test_kernel_same_answer_for_any_thread_count(isa, dtype, n, k):
    # Few rows and many codes: the codes are split across threads too, and the merge
    # across splits must keep the lowest index on ties (duplicated codes below).
    base = torch.randn(k // 2, 24)
    codebook = torch.cat([base, base, torch.randn(k - 2 * (k // 2), 24)]).to(dtype)
    z = torch.cat([torch.randn(n - 10, 24), base[torch.randint(0, k // 2, (10,))]]).to(dtype)
    z[3, 5] = float("nan")
    runs = [_direct(z, codebook, threads, isa) for threads in (1, 2, 3, 8)]
    for idx, dist, quantized in runs[1:]:
        assert torch.equal(runs[0][0], idx) and torch.equal(runs[0][1].nan_to_num(-2), dist.nan_to_num(-2))
        assert torch.equal(runs[0][2], quantized)
    idx, dist, quantized = runs[0]
    keep = torch.arange(n) != 3
    assert 0 <= int(idx[3]) < k and torch.isnan(dist[3])
    assert_nearest(z[keep].float(), codebook.float(), idx[keep], dist[keep])
    assert torch.equal(quantized, codebook[idx])
    assert bool((idx[-10:] < k // 2).all())  # exact copies: the first copy wins


@needs_kernel
def test_kernel_threads_share_pytorchs_openmp_runtime():
    """On Linux with GCC the module is built with OpenMP and resolves to the libgomp
    PyTorch loaded (one worker pool: a kernel right after a PyTorch op would otherwise
    wait for PyTorch's spinning worker)."""
    if sys.platform != "linux":
        pytest.skip("the OpenMP build is checked on Linux")
    assert _ext().threading() == "OpenMP"
    assert "OpenMP threads" in torch_.cpu_kernel()[1]
    # In a fresh interpreter: other libraries the suite imports bring OpenMP runtimes of
    # their own (sentencepiece's wheel bundles a libgomp), which says nothing of vqkern's.
    code = ("import torch, vqkern; from pathlib import Path\n"
            "vqkern.nearest_code(torch.randn(64, 8), torch.randn(32, 8), backend='torch')\n"
            "maps = Path('/proc/self/maps').read_text()\n"
            "print(sorted({l.split()[-1] for l in maps.splitlines() if 'libgomp' in l}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VQKERN_SELFCHECK": "0"})
    assert out.returncode == 0, out.stderr
    gomp = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(gomp) == 1, f"more than one OpenMP runtime loaded: {gomp}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_isa("avx512bf16"))],
                         ids=["fp32", "bf16"])
def test_kernel_concurrent_callers_get_their_own_answers(dtype):
    """Python threads calling at once (the GIL is released in the kernel; each calling
    thread keeps its own packed-codebook buffer): every call answers for its inputs."""
    cases = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        k = 300 + 97 * seed
        cases.append((torch.randn(700, 40, generator=g).to(dtype), torch.randn(k, 40, generator=g).to(dtype)))
    want = [_direct(z, cb, 2, "auto") for z, cb in cases]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            got = list(pool.map(lambda c: _direct(c[0], c[1], 2, "auto"), cases))
            for (i1, d1, q1), (i2, d2, q2) in zip(want, got):
                assert torch.equal(i1, i2) and torch.equal(d1, d2) and torch.equal(q1, q2)


def test_kernel_repeatable_on_near_ties_with_code_splits(fp32_isa):
    # Unit vectors a few ulps of score apart: which code wins hangs on the last bit
    # of each code's norm. One row block and 20000 codes, so the panels are packed
    # by every thread (about 20 packing items) and the codes split across threads.
    # The norms were once rounded differently by the main thread (fma) and the
    # workers (mul + add), so the answer changed with the thread timing: about half
    # of such calls differed from the 1-thread answer on this machine.
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(19, generator=gen)
    codebook = torch.nn.functional.normalize(base + 1e-3 * torch.randn(20000, 19, generator=gen), dim=1)
    z = torch.nn.functional.normalize(base + 1e-3 * torch.randn(33, 19, generator=gen), dim=1)
    want = _direct(z, codebook, 1, fp32_isa)
    assert_nearest(z, codebook, want[0], want[1])
    for threads in (2, 3, 4) * 10:
        got = _direct(z, codebook, threads, fp32_isa)
        for x, y in zip(want, got):
            assert torch.equal(x, y), f"threads={threads}"


def test_kernel_writes_only_its_rows(fp32_isa):
    # A row stride wider than D, and indices poisoned past n: only [0, n) is written.
    ext = _ext()
    z = torch.randn(30, 20)[:, :7]
    codebook = torch.randn(9, 7)
    idx = torch.full((40,), -7, dtype=torch.int64)
    dist = torch.full((40,), float("nan"))
    quantized = torch.full((40, 11), float("nan"))  # row stride 11 > D
    ext.search_l2(z.data_ptr(), 30, 20, codebook.data_ptr(), 9, 7, 7, idx.data_ptr(), dist.data_ptr(),
                  quantized.data_ptr(), 11, 2, fp32_isa)
    assert bool((idx[30:] == -7).all()) and bool(dist[30:].isnan().all()) and bool(quantized[30:].isnan().all())
    assert bool(quantized[:30, 7:].isnan().all())
    assert_nearest(z, codebook, idx[:30], dist[:30])
    assert torch.equal(quantized[:30, :7], codebook[idx[:30]])


def test_availability_names_the_cpu_path(monkeypatch):
    ok, reason = vqkern.backends.availability("torch", "cpu")
    assert ok and ("vqkern._cpu" in reason)
    if KERNEL_OK:  # the path in use, by name: the best this CPU runs unless forced
        best = _ext().best_isa()
        assert f"({'avx512' if best == 'avx512bf16' else best}:" in reason  # vdpbf16ps only when forced
        monkeypatch.setenv("VQKERN_CPU_ISA", "avx2")
        assert "(avx2: AVX2 + FMA;" in vqkern.backends.report("cpu")["torch"][1]
        monkeypatch.delenv("VQKERN_CPU_ISA")
    monkeypatch.setenv("VQKERN_CPU_KERNEL", "0")
    assert "tiled PyTorch" in vqkern.backends.availability("torch", "cpu")[1]


def test_cpu_extension_builds_where_it_should():
    # Where setup.py builds vqkern._cpu, the kernel must be what runs: a build that
    # went missing would otherwise only show as skipped kernel tests.
    if os.environ.get("VQKERN_SKIP_CPU_BUILD", "") == "1":
        pytest.skip("VQKERN_SKIP_CPU_BUILD=1: installed without vqkern._cpu")
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("cmake") is None:
        pytest.skip("not x86-64 or no cmake: setup.py installs without vqkern._cpu")
    import vqkern._cpu as ext  # a failure here is the build or load error, shown in full

    assert callable(ext.search_l2)
    if ext.supported():
        assert KERNEL_OK, KERNEL_REASON


# ---- the ISA paths against each other, and VQKERN_CPU_ISA ------------------------------------

WEIRD = [(n, k, d) for d in (1, 3, 65, 1000) for k in (1, 7, 1000) for n in (1, 29)] + [(333, 70001, 3)]


@needs_isa("avx512")
@pytest.mark.parametrize("n,k,d", WEIRD, ids=[f"{n}x{k}x{d}" for n, k, d in WEIRD])
def test_avx512_and_avx2_give_bitwise_the_same_answer(n, k, d):
    # Same operations in the same order per score (fma over d, then fma(acc, -2, |e|^2)
    # with the same norms) and the same tie rule: the indices, distances and code rows
    # of the two paths must be equal, not merely close, whatever the blocking.
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    a, b = _direct(z, codebook, 2, "avx2"), _direct(z, codebook, 2, "avx512")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_nearest(z, codebook, b[0], b[1])
    assert torch.equal(b[2], codebook[b[0]])


@needs_isa("avx512")
def test_paths_agree_on_ties_across_lanes_and_panels():
    # 40 codes repeated 5 times: copies land in different lanes of a 16- and a 32-code
    # panel and in different panels; z are copies of codes (distance 0, five-way ties)
    # plus NaN rows and a NaN code, which must never win.
    base = torch.randn(40, 33)
    codebook = torch.cat([base] * 5)
    codebook[3] = float("nan")
    pick = torch.randint(0, 200, (300,))
    z = codebook[pick].clone()
    z[pick % 40 == 3] = base[4]  # rows whose code is the NaN one take another code
    z[7, 0] = z[100, 32] = float("nan")
    answers = [_direct(z, codebook, t, isa) for isa in ("avx2", "avx512") for t in (1, 2)]
    for other in answers[1:]:
        assert torch.equal(answers[0][0], other[0])
    idx = answers[0][0]
    rows = torch.ones(300, dtype=torch.bool)
    rows[[7, 100]] = False
    want = torch.where(pick % 40 == 3, torch.full_like(pick, 4), pick % 40)
    assert torch.equal(idx[rows], want[rows]) and bool((idx % 40 != 3).all())


def test_cpu_isa_variable_errors_name_it(monkeypatch):
    monkeypatch.setenv("VQKERN_CPU_KERNEL", "1")
    if not KERNEL_OK:
        pytest.skip(f"vqkern._cpu unavailable: {KERNEL_REASON}")
    monkeypatch.setenv("VQKERN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="VQKERN_CPU_ISA='sse9': choose from avx2, avx512, avx512bf16, amx"):
        vqkern.nearest_code(torch.randn(4, 8), torch.randn(5, 8), backend="torch")
    assert "VQKERN_CPU_ISA" in vqkern.backends.availability("torch", "cpu")[1]
    # An ISA this CPU lacks: every path may be present here, so the lack is simulated
    # where the check reads it.
    monkeypatch.setenv("VQKERN_CPU_ISA", "avx512")
    monkeypatch.setattr(torch_, "cpu_isa_missing", lambda isa: "AVX512F (cpuid leaf 7 EBX bit 16)")
    with pytest.raises(ValueError, match="VQKERN_CPU_ISA=avx512: this CPU cannot run it, it lacks AVX512F"):
        vqkern.nearest_code(torch.randn(4, 8), torch.randn(5, 8), backend="torch")


@needs_kernel
def test_isa_report_is_consistent():
    ext = _ext()
    assert ext.isas() == list(torch_.CPU_ISAS)
    # Each path needs what the previous one needs: a machine lacking one lacks the next.
    present = [not ext.isa_missing(isa) for isa in ext.isas()]
    assert present == sorted(present, reverse=True)
    assert ext.isa_missing(ext.best_isa()) == ""
    with pytest.raises(ValueError, match="unknown isa"):
        ext.isa_missing("avx1024")


# ---- bf16 searched as bf16 ---------------------------------------------------------------

BF16_SHAPES = [(n, k, d) for d in (1, 3, 64, 65, 1000) for k in (1, 7, 1000) for n in (1, 31)] + [(300, 70001, 8)]


@pytest.mark.parametrize("n,k,d", BF16_SHAPES, ids=[f"{n}x{k}x{d}" for n, k, d in BF16_SHAPES])
def test_bf16_kernel_meets_the_precision_policy(bf16_isa, n, k, d, monkeypatch):
    # The guarantee on the widened values: the chosen code's exact distance is within
    # 1e-5 (|z|^2 + max|e|^2) of the true minimum; distances from the fp32 residual;
    # quantized rows are the bf16 code rows exactly.
    monkeypatch.setenv("VQKERN_CPU_ISA", bf16_isa)
    z, codebook = torch.randn(n, d).bfloat16(), torch.randn(k, d).bfloat16()
    out = vqkern.quantize(z, codebook, backend="torch")
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.quantized, codebook[out.indices])
    idx, dist, quantized = _direct(z, codebook, isa=bf16_isa)
    assert torch.equal(idx, out.indices) and torch.equal(quantized, out.quantized)
    assert_nearest(z.float(), codebook.float(), idx, dist)


def test_bf16_exact_indices_on_separated_codes(bf16_isa):
    codebook = (torch.randn(300, 40) * 10).bfloat16()
    truth = torch.randint(0, 300, (1000,))
    z = (codebook[truth].float() + 0.01 * torch.randn(1000, 40)).bfloat16()
    idx, _, _ = _direct(z, codebook, isa=bf16_isa)
    assert torch.equal(idx, truth)


def test_bf16_kernel_agrees_with_fp32_kernel_on_widened_values(bf16_isa):
    # Products of bf16 values are exact in fp32: only the order of the fp32 additions
    # differs from the fp32 kernel on the widened values, so any disagreement is a
    # near-tie within the policy's slack, checked against fp64.
    z, codebook = torch.randn(500, 96).bfloat16(), torch.randn(700, 96).bfloat16()
    half = _direct(z, codebook, isa=bf16_isa)
    full = _direct(z.float(), codebook.float(), isa="avx512")
    assert (half[0] == full[0]).float().mean() > 0.99
    assert torch.equal(half[1], full[1].where(half[0] == full[0], half[1]))  # same residual code
    assert_nearest(z.float(), codebook.float(), half[0], half[1])


def test_bf16_large_offset_and_near_ties(bf16_isa, monkeypatch):
    # A common offset of 100 (|z|^2 ~ 1e4 D) and codes closer together than bf16's
    # spacing there: the guarantee is relative to |z|^2 + max|e|^2.
    monkeypatch.setenv("VQKERN_CPU_ISA", bf16_isa)
    codebook = (100 + 0.5 * torch.randn(64, 32)).bfloat16()
    z = (codebook[torch.randint(0, 64, (400,))].float() + 0.3 * torch.randn(400, 32)).bfloat16()
    indices, distances = vqkern.nearest_code(z, codebook, backend="torch")
    assert_nearest(z.float(), codebook.float(), indices, distances)


def test_mixed_dtypes_are_widened(bf16_isa, monkeypatch):
    monkeypatch.setenv("VQKERN_CPU_ISA", bf16_isa)
    z, codebook = torch.randn(50, 24).bfloat16(), torch.randn(70, 24)
    out = vqkern.quantize(z, codebook, backend="torch")
    assert out.quantized.dtype == torch.bfloat16
    idx, _, _ = _direct(z.float(), codebook, isa="avx512")
    assert torch.equal(out.indices, idx)


# ---- one-pass backward -------------------------------------------------------------------

def _backward_case(n, k, d, offset=0.0, near=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k // 2, d, generator=g)
    codebook = torch.cat([base, base, torch.randn(k - 2 * (k // 2), d, generator=g)]) + offset
    indices = torch.randint(0, k, (n,), generator=g)
    spread = near if near is not None else 1.0
    z = codebook[indices] + spread * torch.randn(n, d, generator=g)
    return torch.randn(n, d, generator=g), z, codebook, indices


def _autograd_backward(gq, z, codebook, indices, beta, dtype):
    """Plain PyTorch autograd of the straight-through + commitment + codebook loss in
    ``dtype``: (grad of z, grad of the codebook)."""
    z = z.to(dtype).requires_grad_(True)
    e = codebook.to(dtype).requires_grad_(True)
    q = e[indices]
    loss = torch.nn.functional.mse_loss(q, z.detach()) + beta * torch.nn.functional.mse_loss(z, q.detach())
    out = z + (q - z).detach()
    torch.autograd.backward([out, loss], [gq.to(dtype), torch.ones((), dtype=dtype)])
    return z.grad, e.grad


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "offset100-near-duplicates", "weird-d"])
def test_cpu_backward_error_within_twice_pytorch(case, dtype):
    """fp32, or bf16 rows in and grad_z out (fp32 arithmetic, rounded once) with fp32
    sums: within twice plain PyTorch autograd's error in the same dtype, against fp64
    of the same input values."""
    n, k, d = {"plain": (3000, 256, 64), "offset100-near-duplicates": (4000, 64, 32), "weird-d": (999, 7, 65)}[case]
    offset, near = (100.0, 0.01) if case.startswith("offset") else (0.0, None)
    gq, z, codebook, indices = (t.to(dtype) if t.is_floating_point() else t
                                for t in _backward_case(n, k, d, offset, near))
    beta = 0.25
    scale = 2 * beta / (n * d)
    grad_z = torch.full((n, d), float("nan"), dtype=dtype)
    diff_sums = torch.zeros(k, d)
    assert torch_.cpu_backward(gq, z, codebook, indices, scale, grad_z, diff_sums, deterministic=False)
    assert grad_z.dtype == dtype
    grad_e = diff_sums * (2.0 / (n * d))  # d/de of mse(e[idx], z) = 2 (e - z) / numel, summed per code
    ref_z, ref_e = _autograd_backward(gq.double(), z.double(), codebook.double(), indices, beta, torch.float64)
    plain_z, plain_e = _autograd_backward(gq, z, codebook, indices, beta, dtype)
    for mine, plain, ref in ((grad_z, plain_z, ref_z), (grad_e, plain_e, ref_e)):
        err = (mine.double() - ref).abs().max().item()
        plain_err = (plain.double() - ref).abs().max().item()
        assert err <= 2 * plain_err, f"kernel error {err:.3g} > 2 x PyTorch {dtype} error {plain_err:.3g}"
    if dtype == torch.bfloat16:
        # grad_z is the fp64 value rounded once to bf16, up to the fp32 arithmetic before
        # it: never more than one bf16 step away.
        once = ref_z.to(torch.bfloat16)
        step = (once.double().abs() * 2.0**-7).clamp_min(2.0**-126)
        assert bool(((grad_z.double() - once.double()).abs() <= step).all())


@needs_kernel
def test_cpu_backward_bf16_nan_and_bitwise_repeatable():
    gq, z, codebook, indices = (t.bfloat16() if t.is_floating_point() else t
                                for t in _backward_case(5000, 300, 48, offset=3.0))
    z[7, 3] = float("nan")
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            grad_z, diff_sums = torch.empty_like(z), torch.zeros(300, 48)
            assert torch_.cpu_backward(gq, z, codebook, indices, 0.3, grad_z, diff_sums, True)
        finally:
            torch.set_num_threads(THREADS)
        results.append((grad_z, diff_sums))
    for grad_z, diff_sums in results[1:]:
        assert torch.equal(grad_z.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.equal(diff_sums.isnan(), results[0][1].isnan())
        assert torch.equal(diff_sums.nan_to_num(), results[0][1].nan_to_num())
    grad_z = results[0][0]
    assert bool(grad_z[7, 3].isnan()) and int(grad_z.isnan().sum()) == 1
    assert bool(results[0][1][indices[7], 3].isnan())


@needs_kernel
def test_cpu_backward_bitwise_repeatable_for_any_threads():
    gq, z, codebook, indices = _backward_case(5000, 300, 48, offset=3.0)
    results = []
    for threads in (1, 2, 3, 2):
        torch.set_num_threads(threads)
        try:
            grad_z, diff_sums = torch.empty_like(z), torch.zeros_like(codebook)
            assert torch_.cpu_backward(gq, z, codebook, indices, torch.tensor([0.3]), grad_z, diff_sums, True)
        finally:
            torch.set_num_threads(THREADS)
        results.append((grad_z, diff_sums))
    for grad_z, diff_sums in results[1:]:
        assert torch.equal(grad_z, results[0][0]) and torch.equal(diff_sums, results[0][1])
    # The sums are those of the blocked order: each code's rows in pieces of PIECE rows in
    # row order; a code of more than one piece adds the pairwise sum of its full pieces to
    # its last, open one.
    piece = _ext().BACKWARD_PIECE_ROWS
    diff = codebook[indices] - z
    want = torch.zeros_like(codebook)
    for code in range(codebook.shape[0]):
        rows = diff[indices == code]
        sums = []
        for start in range(0, rows.shape[0], piece):
            acc = torch.zeros(rows.shape[1])
            for row in rows[start:start + piece]:
                acc += row
            sums.append(acc)
        if rows.shape[0] <= piece:
            want[code] = sums[0] if sums else 0.0
            continue
        full, last = (sums, torch.zeros(rows.shape[1])) if rows.shape[0] % piece == 0 else (sums[:-1], sums[-1])
        step = 1
        while step < len(full):
            for j in range(0, len(full) - step, 2 * step):
                full[j] = full[j] + full[j + step]
            step *= 2
        want[code] = last + full[0]
    assert torch.equal(results[0][1], want)


@needs_kernel
def test_cpu_backward_outputs_optional_and_fallbacks():
    gq, z, codebook, indices = _backward_case(200, 16, 8)
    full_z, full_s = torch.empty_like(z), torch.zeros_like(codebook)
    assert torch_.cpu_backward(gq, z, codebook, indices, 0.5, full_z, full_s, False)
    only_z = torch.full_like(z, float("nan"))
    assert torch_.cpu_backward(gq, z, codebook, indices, 0.5, only_z, None, False)
    only_s = torch.zeros_like(codebook)
    assert torch_.cpu_backward(None, z, codebook, indices, 0.5, None, only_s, False)
    assert torch.equal(only_z, full_z) and torch.equal(only_s, full_s)
    torch.testing.assert_close(full_z, gq + 0.5 * (z - codebook[indices]))
    # What the kernel does not take, it leaves to the caller, untouched.
    untouched = torch.zeros_like(codebook)
    assert not torch_.cpu_backward(gq, z.bfloat16(), codebook, indices, 0.5, None, untouched, False)  # mixed
    assert not torch_.cpu_backward(gq.half(), z.half(), codebook.half(), indices, 0.5, None, untouched, False)
    assert not torch_.cpu_backward(gq.bfloat16(), z.bfloat16(), codebook.bfloat16(), indices, 0.5, None,
                                   untouched.bfloat16(), False)  # the sums are fp32
    wide = torch.randn(200, 16)[:, ::2]
    assert not torch_.cpu_backward(gq, wide, codebook, indices, 0.5, None, untouched, False)
    assert not torch_.cpu_backward(gq, z, codebook, indices.int(), 0.5, None, untouched, False)
    assert bool((untouched == 0).all())


@needs_kernel
def test_cpu_backward_rejects_bad_input_before_writing():
    gq, z, codebook, indices = _backward_case(100, 16, 8)
    grad_z, diff_sums = torch.full_like(z, 7.0), torch.zeros_like(codebook)
    bad = indices.clone()
    bad[57] = 16
    with pytest.raises(IndexError, match=r"indices\[57\] = 16 is outside \[0, 16\)"):
        torch_.cpu_backward(gq, z, codebook, bad, 0.5, grad_z, diff_sums, False)
    assert bool((grad_z == 7).all()) and bool((diff_sums == 0).all())
    with pytest.raises(ValueError, match="diff_sums has shape"):
        torch_.cpu_backward(gq, z, codebook, indices, 0.5, grad_z, torch.zeros(15, 8), False)
