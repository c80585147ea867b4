"""The torch backend's two CPU search paths: the fused C++ kernel (vqkern._cpu) and
the tiled PyTorch path (VQKERN_CPU_KERNEL=0), each against the fp64 reference."""
import os
import platform
import shutil

import pytest
import torch

import vqkern
from vqkern.backends import torch_

from helpers import assert_nearest

KERNEL_OK, KERNEL_REASON = torch_.cpu_kernel()
needs_kernel = pytest.mark.skipif(not KERNEL_OK, reason=f"vqkern._cpu unavailable: {KERNEL_REASON}")


@pytest.fixture(params=[pytest.param("kernel", marks=needs_kernel), "tiled"])
def path(request, monkeypatch):
    monkeypatch.setenv("VQKERN_CPU_KERNEL", "1" if request.param == "kernel" else "0")
    assert torch_.cpu_kernel()[0] == (request.param == "kernel")
    return request.param


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


@needs_kernel
@pytest.mark.parametrize("n,k", [(1000, 500), (30, 5000), (150, 9000)], ids=["row-blocks", "code-splits", "both"])
def test_kernel_same_answer_for_any_thread_count(n, k):
    # Few rows and many codes: the codes are split across threads too, and the merge
    # across splits must keep the lowest index on ties (duplicated codes below).
    ext = torch_._load_cpu_ext()[0]
    base = torch.randn(k // 2, 24)
    codebook = torch.cat([base, base, torch.randn(k - 2 * (k // 2), 24)])
    z = torch.cat([torch.randn(n - 10, 24), base[torch.randint(0, k // 2, (10,))]])
    z[3, 5] = float("nan")
    runs = []
    for threads in (1, 2, 3, 8):
        idx = torch.full((n,), -1, dtype=torch.int64)
        dist = torch.full((n,), -1.0)
        ext.search_l2(z.data_ptr(), n, 24, codebook.data_ptr(), k, 24, 24, idx.data_ptr(), dist.data_ptr(), 0, 0,
                      threads)
        runs.append((idx, dist))
    for idx, dist in runs[1:]:
        assert torch.equal(runs[0][0], idx) and torch.equal(runs[0][1].nan_to_num(-2), dist.nan_to_num(-2))
    idx = runs[0][0]
    keep = torch.arange(n) != 3
    assert 0 <= int(idx[3]) < k
    assert_nearest(z[keep], codebook, idx[keep], runs[0][1][keep])
    assert bool((idx[-10:] < k // 2).all())  # exact copies: the first copy wins


@needs_kernel
def test_kernel_writes_only_its_rows():
    # A row stride wider than D, and indices poisoned past n: only [0, n) is written.
    ext = torch_._load_cpu_ext()[0]
    z = torch.randn(30, 20)[:, :7]
    codebook = torch.randn(9, 7)
    idx = torch.full((40,), -7, dtype=torch.int64)
    dist = torch.full((40,), float("nan"))
    quantized = torch.full((40, 11), float("nan"))  # row stride 11 > D
    ext.search_l2(z.data_ptr(), 30, 20, codebook.data_ptr(), 9, 7, 7, idx.data_ptr(), dist.data_ptr(),
                  quantized.data_ptr(), 11, 2)
    assert bool((idx[30:] == -7).all()) and bool(dist[30:].isnan().all()) and bool(quantized[30:].isnan().all())
    assert bool(quantized[:30, 7:].isnan().all())
    assert_nearest(z, codebook, idx[:30], dist[:30])
    assert torch.equal(quantized[:30, :7], codebook[idx[:30]])


def test_availability_names_the_cpu_path(monkeypatch):
    ok, reason = vqkern.backends.availability("torch", "cpu")
    assert ok and ("vqkern._cpu" in reason)
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
