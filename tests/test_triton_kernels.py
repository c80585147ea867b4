"""Triton kernels called through their launchers, against plain fp64 computations.

Without CUDA these run in the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before vqkern is imported); with CUDA, compiled. Shapes
stay small because the interpreter executes every block operation in numpy.
"""
import importlib
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():  # also when this file is collected without conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vqkern
from vqkern import backends
from vqkern.backends._frame import frame_centre

from helpers import assert_nearest, dist_rtol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OK, _WHY = backends.availability("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(not _OK, reason=f"triton: {_WHY}"),
    # The interpreter turns runtime loop bounds into 1-element arrays and numpy warns.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

if _OK:
    from vqkern.backends import triton as tk


def _poisoned(n, d, dtype):
    return (torch.full((n,), -1, dtype=torch.int64, device=DEVICE),
            torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE),
            torch.full((n, d), float("nan"), dtype=dtype, device=DEVICE))


def _search(z, codebook, **knobs):
    indices, distances, quantized = _poisoned(z.shape[0], z.shape[1], z.dtype)
    tk.launch_search(z, codebook, indices, distances, quantized, **knobs)
    return indices, distances, quantized


def _check(z, codebook, indices, distances, quantized):
    assert_nearest(z, codebook, indices, distances)
    # quantized is the chosen code converted (round to nearest even) to z's dtype.
    assert quantized.dtype == z.dtype
    assert torch.equal(quantized, codebook[indices].to(z.dtype))


# D = 1, 3, 65 and K = 1, 7, 1000: off every block size; block_d=16 forces the
# chunked-D loop (65 = 5 chunks, the last one 1 column wide); block_n=64 makes
# several code tiles with a partial last one (the interpreter's default tile is big).
@pytest.mark.parametrize("n,k,d,block_d,block_n", [
    (37, 1, 1, None, None), (130, 7, 3, None, None), (200, 1000, 16, None, None),
    (200, 1000, 16, None, 64), (77, 65, 65, None, 16), (100, 300, 65, 16, 64),
    (64, 129, 32, 16, None), (1, 5, 8, None, None),
])
def test_search_fp32(n, k, d, block_d, block_n):
    z = torch.randn(n, d, device=DEVICE)
    codebook = torch.randn(k, d, device=DEVICE)
    _check(z, codebook, *_search(z, codebook, block_d=block_d, block_n=block_n))


@pytest.mark.parametrize("zt,ct", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
])
def test_search_dtypes(zt, ct):
    z = torch.randn(150, 24, device=DEVICE).to(zt)
    codebook = torch.randn(300, 24, device=DEVICE).to(ct)
    _check(z, codebook, *_search(z, codebook))


def test_search_exact_indices_well_separated():
    # Codes far apart, inputs close to them: no near-ties, so indices are exact.
    codebook = torch.randn(200, 32, device=DEVICE) * 10
    truth = torch.randint(200, (333,), device=DEVICE)
    z = codebook[truth] + 0.01 * torch.randn(333, 32, device=DEVICE)
    for splits in (1, 3):
        indices, distances, _ = _search(z, codebook, num_splits=splits, block_n=32)
        assert torch.equal(indices, truth)
        expected = ((z.double() - codebook[truth].double()) ** 2).sum(1)
        torch.testing.assert_close(distances.double(), expected, rtol=dist_rtol(32), atol=1e-6)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_ties_lowest_index_across_tiles_and_splits(splits):
    # Codes i, i+50, i+100 are identical and fall in different 32-code tiles
    # (and in the same tile with the default tile size).
    base = torch.randn(50, 16, device=DEVICE)
    codebook = torch.cat([base, base, base])
    want = torch.arange(90, device=DEVICE) % 50
    z = base[want] + 0.001 * torch.randn(90, 16, device=DEVICE)
    for block_n in (None, 32):
        indices, _, _ = _search(z, codebook, num_splits=splits, block_n=block_n)
        assert torch.equal(indices, want)


@pytest.mark.parametrize("splits", [2, 3, 7, 40])
def test_split_k_equals_single_pass(splits):
    # Split boundaries fall on tile boundaries, so the scores are the same numbers
    # and every output must be bitwise equal; 40 splits of 16 tiles leave some empty.
    z = torch.randn(50, 20, device=DEVICE)
    codebook = torch.randn(1000, 20, device=DEVICE)
    single = _search(z, codebook, num_splits=1, block_n=64)
    split = _search(z, codebook, num_splits=splits, block_n=64)
    _check(z, codebook, *split)
    for a, b in zip(single, split):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("splits", [1, 3])
def test_tensor_core_fp32_search_rechecks_to_the_ieee_codes(precision, splits):
    # Duplicated and nearly duplicated codes: the rows the re-check must catch. The
    # interpreter ignores input_precision, so here this checks the mechanism; on a GPU,
    # that tf32 / tf32x3 with the re-check give exactly the ieee search's codes.
    z = torch.randn(300, 40, device=DEVICE)
    codebook = torch.randn(500, 40, device=DEVICE)
    codebook[250:300] = codebook[:50] + 1e-4 * torch.randn(50, 40, device=DEVICE)
    codebook[300:310] = codebook[:10]
    z[:100] = codebook[torch.randint(310, (100,), device=DEVICE)] + 1e-3 * torch.randn(100, 40, device=DEVICE)
    exact = _search(z, codebook, num_splits=splits, block_n=64, fp32_precision="ieee")
    fast = _search(z, codebook, num_splits=splits, block_n=64, fp32_precision=precision)
    assert torch.equal(fast[0], exact[0])
    assert torch.equal(fast[1], exact[1]) and torch.equal(fast[2], exact[2])


@pytest.mark.parametrize("splits", [1, 3])
def test_runner_up_scores(splits):
    search_module = importlib.import_module("vqkern.backends.triton.search")
    n, k, d = 150, 300, 20
    z = torch.randn(n, d, device=DEVICE)
    codebook = torch.randn(k, d, device=DEVICE)
    codebook[7] = codebook[3]  # an exact tie: the runner-up equals the best
    z[0] = codebook[3]
    # Scores in the frame centred on the rows: |e - c|^2 - 2 (z - c).(e - c).
    centre = frame_centre(z)
    norms = ((codebook - centre) ** 2).sum(1)
    best, second = (torch.full((n,), float("nan"), device=DEVICE) for _ in range(2))
    out = _poisoned(n, d, z.dtype)
    search_module._search_pass(z, codebook, norms, *out, splits, True, "ieee", None, 32,
                               DEVICE == "cpu", centre, best=best, second=second)
    zc, ec = z.double() - centre.double(), codebook.double() - centre.double()
    scores = (norms[None, :].double() - 2 * zc @ ec.t())
    top2 = scores.topk(2, dim=1, largest=False).values
    scale = (zc ** 2).sum(1) + (norms.double()).max()
    assert ((best - top2[:, 0]).abs() / scale).max() <= 1e-6
    assert ((second - top2[:, 1]).abs() / scale).max() <= 1e-6
    assert best[0] == second[0]


def test_row_filter_searches_and_writes_only_flagged_rows():
    search_module = importlib.import_module("vqkern.backends.triton.search")
    n, k, d = 150, 70, 12
    z = torch.randn(n, d, device=DEVICE)
    codebook = torch.randn(k, d, device=DEVICE)
    flags = torch.zeros(n, dtype=torch.int8, device=DEVICE)
    flags[::7] = 1
    flags[64:128] = 0  # a whole block without a flagged row scans nothing
    indices, distances, quantized = _poisoned(n, d, z.dtype)
    search_module._search_pass(z, codebook, (codebook * codebook).sum(1), indices, distances, quantized, 1, True,
                               "ieee", None, 32, DEVICE == "cpu", torch.zeros(d, device=DEVICE), flags=flags)
    on = flags.bool()
    _check(z[on], codebook, indices[on], distances[on], quantized[on])
    assert bool((indices[~on] == -1).all()) and bool(torch.isnan(distances[~on]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 rounding exists only on a GPU")
def test_tf32_without_recheck_differs_and_with_it_does_not():
    # Near-ties within tf32's error: the unchecked tf32 search must miss some (else this
    # data would not test the re-check), the re-checked one none.
    g = torch.Generator(device="cpu").manual_seed(1)
    base = torch.randn(1, 64, generator=g) * 3
    codebook = (base + 0.02 * torch.randn(4096, 64, generator=g)).cuda()
    z = (base + 0.02 * torch.randn(4096, 64, generator=g)).cuda()
    exact = _search(z, codebook, fp32_precision="ieee")[0]
    unchecked = _search(z, codebook, fp32_precision="tf32", recheck=False)[0]
    assert not torch.equal(unchecked, exact)
    for precision in ("tf32", "tf32x3"):
        assert torch.equal(_search(z, codebook, fp32_precision=precision)[0], exact)


def test_split_k_env_reaches_public_api(monkeypatch):
    z = torch.randn(40, 12, device=DEVICE)
    codebook = torch.randn(500, 12, device=DEVICE)
    monkeypatch.setenv("VQKERN_TRITON_NUM_SPLITS", "5")
    search_module = importlib.import_module("vqkern.backends.triton.search")  # the package exports a search()
    launched = []
    reduce_kernel = search_module._split_reduce_kernel

    class Spy:  # records the split count of every reduce launch (there is none without a split)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(args[-1])  # num_splits, the last run-time argument
                return reduce_kernel[grid](*args, **kwargs)
            return launch

    # The self-check of this key (forced splits are a code path of their own) runs first.
    vqkern.backends.resolve("triton", DEVICE, z.dtype, codebook.dtype, "l2")
    monkeypatch.setattr(search_module, "_split_reduce_kernel", Spy())
    indices, distances = vqkern.nearest_code(z, codebook, backend="triton")
    assert launched == [5], "the split-K path did not run"
    assert_nearest(z, codebook, indices, distances)
    assert torch.equal(indices, _search(z, codebook, num_splits=1)[0])


def test_split_k_chosen_when_rows_cannot_fill_the_gpu(monkeypatch):
    # The choice only, on a stand-in CUDA tensor: few row blocks and many codes split K,
    # enough row blocks do not, and each split keeps at least MIN_CODES_PER_SPLIT codes.
    from types import SimpleNamespace

    search_module = importlib.import_module("vqkern.backends.triton.search")
    monkeypatch.delenv("VQKERN_TRITON_NUM_SPLITS", raising=False)
    monkeypatch.setattr(search_module, "_sm_count", lambda index: 132)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert search_module._choose_splits(on_gpu, 16, 2**16) == 2**16 // search_module.MIN_CODES_PER_SPLIT
    assert search_module._choose_splits(on_gpu, 256, 2**20) == 66  # 4 row blocks x 66 = 2 per SM
    assert search_module._choose_splits(on_gpu, 65536, 2**20) == 1  # rows alone fill the GPU
    assert search_module._choose_splits(on_gpu, 16, 1000) == 1  # too few codes to split


def test_search_large_k():
    # K = 70001: many tiles and a partial last one; split so each program scans fewer.
    z = torch.randn(20, 4, device=DEVICE)
    codebook = torch.randn(70001, 4, device=DEVICE)
    indices, distances, quantized = _search(z, codebook, num_splits=4)
    _check(z, codebook, indices, distances, quantized)


def test_nan_row_gives_valid_index_and_nan_distance():
    z = torch.randn(70, 8, device=DEVICE)
    z[3, 2] = float("nan")
    codebook = torch.randn(100, 8, device=DEVICE)
    for splits in (1, 3):
        indices, distances, quantized = _search(z, codebook, num_splits=splits)
        assert 0 <= int(indices[3]) < 100
        assert torch.isnan(distances[3])
        keep = torch.arange(70, device=DEVICE) != 3
        _check(z[keep], codebook, indices[keep], distances[keep], quantized[keep])


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("splits", [1, 3])
def test_non_finite_codebook_rows_never_win(poison, splits):
    # Non-finite codes in several tiles and splits, among them the tile of the true
    # nearest code: Triton's min keeps an operand when a comparison with NaN is false,
    # so without the mapping to +inf a NaN score could drop that tile's true minimum.
    z = torch.randn(70, 8, device=DEVICE)
    codebook = torch.randn(300, 8, device=DEVICE)
    nearest = torch.cdist(z.double(), codebook.double()).argmin(dim=1)
    bad = torch.tensor([0, 5, 63, 64, 130, 299], device=DEVICE)
    bad = bad[~torch.isin(bad, nearest)]
    codebook[bad, 1] = float(poison)
    codebook[int(nearest[0]) - 1 if int(nearest[0]) > 0 else 1, 3] = float("nan")
    indices, distances, quantized = _search(z, codebook, num_splits=splits, block_n=32)
    assert torch.isfinite(codebook[indices]).all()
    finite = torch.isfinite(codebook).all(dim=1)
    keep_codes = torch.nonzero(finite).flatten()
    assert_nearest(z, codebook[keep_codes], torch.searchsorted(keep_codes, indices), distances)


def test_split_count_is_a_run_time_argument():
    # A constexpr split count would recompile (and re-autotune) at every new N.
    search_module = importlib.import_module("vqkern.backends.triton.search")
    for kernel in (search_module._search_kernel, search_module._split_reduce_kernel):
        params = inspect.signature(kernel.fn).parameters  # JITFunction and InterpretedFunction
        constexprs = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        assert "num_splits" in params and not {"num_splits", "NUM_SPLITS"} & constexprs


def test_launches_run_under_the_tensors_device(monkeypatch):
    # Triton launches on the current device: every launcher must make z's device current.
    from vqkern.backends.triton import _device
    bmod, smod, gmod = (importlib.import_module(f"vqkern.backends.triton.{name}")
                        for name in ("backward", "search", "segment_sum"))
    entered = []

    def recording(t):
        entered.append(t.device)
        return _device.on_device(t)
    for module in (bmod, smod, gmod):
        monkeypatch.setattr(module, "on_device", recording)
    z = torch.randn(20, 4, device=DEVICE)
    codebook = torch.randn(6, 4, device=DEVICE)
    indices, _, _ = _search(z, codebook)
    _search(z, codebook, num_splits=2)
    for deterministic in (False, True):
        _backward(z, z, codebook, indices, 0.5, deterministic)
        _segment(indices, z, 6, deterministic)
    # two searches, the fused backward, its deterministic pair, two segment sums
    assert len(entered) == 7 and all(dev == z.device for dev in entered)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one():
    z = torch.randn(300, 16, device="cuda:1")
    codebook = torch.randn(50, 16, device="cuda:1")
    with torch.cuda.device(0):
        indices, distances, quantized = _search(z, codebook)
        out, sums = _backward(z, z, codebook, indices, 0.5, False)
    _check(z, codebook, indices, distances, quantized)
    torch.testing.assert_close(sums.double(), _diff_sums_ref(z, codebook, indices), rtol=1e-5, atol=1e-4)


def _grad_ref(gq, z, codebook, indices, scale, dtype):
    return gq.to(dtype) + scale * (z.to(dtype) - codebook[indices].to(dtype))


def _diff_sums_ref(z, codebook, indices):
    return torch.zeros(codebook.shape, dtype=torch.float64, device=DEVICE).index_add_(
        0, indices, codebook.double()[indices] - z.double())


def _backward(gq, z, codebook, indices, scale, deterministic, grad_z=True, sums=True):
    out = torch.full(z.shape, float("nan"), dtype=z.dtype, device=DEVICE) if grad_z else None
    diff_sums = torch.zeros(codebook.shape, dtype=torch.float32, device=DEVICE) if sums else None
    scale_t = torch.tensor([scale], dtype=torch.float32, device=DEVICE)
    tk.backward(gq, z, codebook, indices, scale_t, out, diff_sums, deterministic)
    return out, diff_sums


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("zt,ct", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                   (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("n,d", [(129, 3), (64, 65)])
def test_backward(zt, ct, n, d, deterministic):
    z = torch.randn(n, d, device=DEVICE).to(zt)
    gq = torch.randn(n, d, device=DEVICE).to(zt)
    codebook = torch.randn(57, d, device=DEVICE).to(ct)
    indices = torch.randint(57, (n,), device=DEVICE)
    scale = 2 * 0.25 / (n * d) * 1000.0
    out, diff_sums = _backward(gq, z, codebook, indices, scale, deterministic)
    exact = _grad_ref(gq, z, codebook, indices, scale, torch.float64)
    # The kernel (fp32 math, one rounding to zt) against torch in zt's precision.
    plain = _grad_ref(gq, z, codebook, indices, scale, zt).double()
    torch_err = (plain - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert out.dtype == zt
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    # Residual sums: each difference exact-ish in fp32, at most ~n terms per code.
    torch.testing.assert_close(diff_sums.double(), _diff_sums_ref(z, codebook, indices),
                               rtol=1e-5, atol=n * 2.0 ** -24 * 8)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_residual_sums_do_not_cancel(deterministic):
    # z within 0.01 of its code, everything 100 away from the origin: count * e - sum z
    # loses ~2^-24 * 100 * count per element; the residual sums keep fp32 accuracy
    # relative to the residuals themselves (~0.01).
    n, d, k = 600, 8, 3
    codebook = torch.randn(k, d, device=DEVICE) + 100.0
    indices = torch.randint(k, (n,), device=DEVICE)
    z = codebook[indices] + 0.01 * torch.randn(n, d, device=DEVICE)
    _, diff_sums = _backward(z, z, codebook, indices, 0.0, deterministic, grad_z=False)
    ref = _diff_sums_ref(z, codebook, indices)
    # Plain fp32 cancellation, what the count * e - sum z form computed.
    counts = torch.bincount(indices, minlength=k).float()
    cancel = counts[:, None] * codebook - torch.zeros(k, d, device=DEVICE).index_add_(0, indices, z)
    cancel_err = (cancel.double() - ref).abs().max().item()
    err = (diff_sums.double() - ref).abs().max().item()
    assert err < cancel_err / 20, (err, cancel_err)
    assert err <= 1e-5 * ref.abs().max().item() + n * 0.01 * 2.0 ** -22


def test_backward_parts_alone():
    z = torch.randn(50, 6, device=DEVICE)
    gq = torch.randn(50, 6, device=DEVICE)
    codebook = torch.randn(9, 6, device=DEVICE)
    indices = torch.randint(9, (50,), device=DEVICE)
    full_out, full_sums = _backward(gq, z, codebook, indices, 0.5, False)
    out, none = _backward(gq, z, codebook, indices, 0.5, False, sums=False)
    none2, sums = _backward(gq, z, codebook, indices, 0.5, False, grad_z=False)
    assert none is None and none2 is None
    assert torch.equal(out, full_out)
    torch.testing.assert_close(sums, full_sums)


def test_backward_strided_grad():
    z = torch.randn(40, 24, device=DEVICE)
    gq = torch.randn(24, 40, device=DEVICE).t()  # column stride != 1
    codebook = torch.randn(9, 24, device=DEVICE)
    indices = torch.randint(9, (40,), device=DEVICE)
    out, _ = _backward(gq, z, codebook, indices, 0.5, False, sums=False)
    exact = _grad_ref(gq, z, codebook, indices, 0.5, torch.float64)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)


def test_backward_reads_the_scale_on_the_device(monkeypatch):
    # A host read of the scale is a device sync per backward and breaks CUDA graph capture.
    def refuse(self, *args):
        raise AssertionError("host read of a tensor during the backward")
    z = torch.randn(30, 5, device=DEVICE)
    codebook = torch.randn(4, 5, device=DEVICE)
    indices = torch.randint(4, (30,), device=DEVICE)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    for deterministic in (False, True):
        out, _ = _backward(z, z, codebook, indices, 0.5, deterministic)
        assert torch.isfinite(out).all()


def _segment_ref(indices, values, k):
    counts = torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(
        0, indices, torch.ones_like(indices, dtype=torch.float64))
    sums = torch.zeros(k, values.shape[1], dtype=torch.float64, device=values.device).index_add_(
        0, indices, values.double())
    return counts, sums


def _segment(indices, values, k, deterministic):
    counts = torch.zeros(k, dtype=torch.float32, device=DEVICE)
    sums = torch.zeros(k, values.shape[1], dtype=torch.float32, device=DEVICE)
    tk.segment_sum(indices, values, counts, sums, deterministic)
    return counts, sums


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("n,k,d,dtype,skew", [
    (300, 40, 65, torch.float32, False), (257, 130, 3, torch.float32, False),
    (200, 7, 16, torch.bfloat16, False), (150, 30, 8, torch.float16, False),
    (500, 20, 33, torch.float32, True),
])
def test_segment_sum(deterministic, n, k, d, dtype, skew):
    values = torch.randn(n, d, device=DEVICE).to(dtype)
    # skew: every row to one code (the deterministic path's longest segment).
    indices = torch.full((n,), 7, device=DEVICE) if skew else torch.randint(k, (n,), device=DEVICE)
    counts, sums = _segment(indices, values, k, deterministic)
    ref_counts, ref_sums = _segment_ref(indices, values, k)
    assert torch.equal(counts.double(), ref_counts)
    # fp32 sums of up to n terms of size ~1: n * 2^-24 relative to the sum of |v|.
    atol = n * 2.0 ** -24 * 4
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=atol)


def test_segment_sum_deterministic_is_bitwise_reproducible():
    values = torch.randn(2000, 40, device=DEVICE)
    indices = torch.randint(25, (2000,), device=DEVICE)
    first = _segment(indices, values, 25, True)
    second = _segment(indices, values, 25, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Rows reach each code in the stable-sorted order: the sum is independent of
    # how the rows were laid out, as long as each code's rows keep their order.
    perm = torch.argsort(indices, stable=True)
    third = _segment(indices[perm], values[perm], 25, True)
    assert torch.equal(first[1], third[1])


@pytest.mark.parametrize("piece", [4, 512])
@pytest.mark.parametrize("collapse", [False, True])
def test_segment_sum_deterministic_pieces(monkeypatch, piece, collapse):
    # Small pieces: many codes of several pieces (pass 2), codes of one piece beside
    # them, empty codes; collapse: every row on one code, the longest segment.
    G = importlib.import_module("vqkern.backends.triton.segment_sum")
    monkeypatch.setattr(G, "INTERPRET_PIECE" if DEVICE == "cpu" else "GPU_PIECE", piece)
    n, k, d = 1500, 40, 5
    values = torch.randn(n, d, device=DEVICE)
    indices = (torch.full((n,), 11, device=DEVICE) if collapse
               else torch.randint(k, (n,), device=DEVICE) ** 2 // k)  # skewed, some codes empty
    counts, sums = _segment(indices, values, k, True)
    ref_counts, ref_sums = _segment_ref(indices, values, k)
    assert torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=n * 2.0 ** -24 * 4)
    again = _segment(indices, values, k, True)
    assert torch.equal(again[1], sums)
    base = torch.randn(k, d, device=DEVICE)
    residual = torch.zeros(k, d, device=DEVICE)
    G.launch_segment_sum(indices, values, None, residual, True, base=base)
    ref = torch.zeros(k, d, dtype=torch.float64, device=DEVICE).index_add_(
        0, indices, base.double()[indices] - values.double())
    torch.testing.assert_close(residual.double(), ref, rtol=1e-5, atol=n * 2.0 ** -24 * 8)


def test_segment_sum_adds_into_outputs_and_strided_values():
    values = torch.randn(16, 90, device=DEVICE).t()  # (90, 16), column stride != 1
    indices = torch.randint(5, (90,), device=DEVICE)
    ref_counts, ref_sums = _segment_ref(indices, values, 5)
    for deterministic in (False, True):
        counts = torch.ones(5, device=DEVICE)
        sums = torch.ones(5, 16, device=DEVICE)
        tk.segment_sum(indices, values, counts, sums, deterministic)
        assert torch.equal(counts.double(), ref_counts + 1)
        torch.testing.assert_close(sums.double(), ref_sums + 1, rtol=1e-5, atol=1e-5)


def test_availability_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = tk.availability(torch.device("cpu"))
    assert not ok and reason == "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.availability(torch.device("cpu"))[0]
    assert tk.availability(torch.device("cuda"))[0] == torch.cuda.is_available()


# Compiles every kernel for sm_90 with Triton's own ptxas, no GPU needed: the
# interpreter accepts tile shapes and dtypes the GPU compiler rejects, so this is
# the check of GPU legality on a machine without one (run with TRITON_INTERPRET=0
# in a subprocess: under the interpreter @triton.jit functions cannot be compiled).
# About 70 s on 2 cores with a cold Triton cache: kept in the default run, as it is
# the only check of GPU legality that CI can make.
_AOT_SCRIPT = r'''
import importlib, itertools, os, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
S = importlib.import_module("vqkern.backends.triton.search")
B = importlib.import_module("vqkern.backends.triton.backward")
G = importlib.import_module("vqkern.backends.triton.segment_sum")
target = GPUTarget("cuda", 90, 32)
FULL = os.environ.get("VQKERN_AOT_FULL") == "1"
P = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
failures = []
def compile_(fn, sig, consts, warps=4, stages=3):
    try:
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:
        failures.append(f"{fn.__name__} {consts} warps={warps}: {type(exc).__name__}: {str(exc)[:200]}")
for (zt, ct), d in itertools.product([("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")],
                                     [3, 64, 256]):
    dot_fp32 = zt != ct or zt == "fp32"
    sig = {"z_ptr": P[zt], "cb_ptr": P[ct], "norms_ptr": "*fp32", "idx_out_ptr": "*i64", "dist_ptr": "*fp32",
           "q_ptr": P[zt], "part_val_ptr": "*fp32", "part_idx_ptr": "*i64", "second_ptr": "*fp32", "flag_ptr": "*i8",
           "zn2_ptr": "*fp32", "centre_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "stride_zm": "i32",
           "stride_k": "i32",
           "stride_qm": "i32", "num_splits": "i32", "inv_temperature": "fp32", "seed": "i64"}
    # (precision, tracks the runner-up, re-check pass): ieee alone; tensor-core fp32
    # searches with the runner-up, then the ieee re-check of flagged rows.
    # The tensor-core modes share their code with the ieee one but for the runner-up and
    # the row filter: compiled for fp32 operands at one D with the z tile held (3) and one
    # streamed in chunks (64) only, to keep this check near its former 70 s cold.
    # (precision, runner-up, row filter, Gumbel sampling, cosine logits)
    modes = [("ieee", False, False, False, False)]
    if zt == ct == "fp32" and d in (3, 64):
        modes += [("tf32", True, False, False, False), ("tf32x3", True, False, False, False),
                  ("ieee", False, True, False, False)]
    if d == 64 and zt == ct and zt != "fp16":
        modes += [("ieee", False, False, True, False), ("ieee", False, False, True, True)]
    for precision, track, row_filter, sample, cosine in modes:
        bd = S._block_d(d, dot_fp32, precision, False)
        configs = S._search_configs()
        if not FULL and (track or row_filter or sample):
            # The default run compiles the new modes at the two largest tiles only (the
            # register-heaviest); the slow run compiles every autotune config of every mode.
            configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128]
        for cfg in configs:
            for split in ((False, True) if not row_filter else (False,)):
                consts = dict(SPLIT=split, INTERPRET=False, ONE_CHUNK=d <= bd, DOT_FP32=dot_fp32,
                              INPUT_PRECISION=precision, CENTRE=dot_fp32 and not cosine, TRACK_SECOND=track,
                              ROW_FILTER=row_filter, SAMPLE=sample, COSINE=cosine, BLOCK_D=bd,
                              EPI_BLOCK_D=S.EPI_BLOCK_D, **cfg.kwargs)
                compile_(S._search_kernel, dict(sig, **{k: "constexpr" for k in consts}), consts, cfg.num_warps,
                         cfg.num_stages)
    for track in (False, True):
        consts = dict(INTERPRET=False, TRACK_SECOND=track, BLOCK_S=S.REDUCE_BLOCK_S, BLOCK_M=64, BLOCK_D=S.EPI_BLOCK_D)
        compile_(S._split_reduce_kernel, {"z_ptr": P[zt], "cb_ptr": P[ct], "part_val_ptr": "*fp32",
                 "part_idx_ptr": "*i64", "idx_out_ptr": "*i64", "dist_ptr": "*fp32", "q_ptr": P[zt],
                 "part_second_ptr": "*fp32", "best_ptr": "*fp32", "second_ptr": "*fp32", "N": "i32", "D": "i32",
                 "stride_zm": "i32", "stride_k": "i32", "stride_qm": "i32", "num_splits": "i32",
                 **{k: "constexpr" for k in consts}}, consts)
    consts = dict(CENTRE=dot_fp32, BLOCK_K=64, BLOCK_D=32)
    compile_(S._code_norms_kernel, {"cb_ptr": P[ct], "centre_ptr": "*fp32", "norms_ptr": "*fp32", "K": "i32",
             "D": "i32", "stride_k": "i32", **{k: "constexpr" for k in consts}}, consts)
    for write_z, write_sums in ((True, True), (True, False), (False, True)):
        bm, bd, warps = ((G.GPU_SUM_BLOCK_M, G.GPU_SUM_BLOCK_D, G.GPU_SUM_WARPS) if write_sums
                         else (B.GPU_BLOCK_M, B.GPU_BLOCK_D, B.GPU_WARPS))
        consts = dict(WRITE_GRAD_Z=write_z, WRITE_SUMS=write_sums, INTERPRET=False, BLOCK_M=bm, BLOCK_D=bd)
        compile_(B._backward_kernel, {"gq_ptr": P[zt], "z_ptr": P[zt], "cb_ptr": P[ct], "idx_ptr": "*i64",
                 "scale_ptr": "*fp32", "out_ptr": P[zt], "sums_ptr": "*fp32", "N": "i32", "D": "i32",
                 **{s: "i32" for s in ("stride_gq", "stride_gq_d", "stride_z", "stride_z_d", "stride_k", "stride_k_d",
                 "stride_out", "stride_out_d")}, **{k: "constexpr" for k in consts}}, consts, warps)
    seg = {"val_ptr": P[zt], "counts_ptr": "*fp32", "sums_ptr": "*fp32", "D": "i32", "stride_v": "i32",
           "stride_v_d": "i32", "stride_s": "i32"}
    consts = dict(BLOCK_M=G.GPU_SUM_BLOCK_M, BLOCK_D=G.GPU_SUM_BLOCK_D)
    compile_(G._segment_sum_atomic_kernel, {"idx_ptr": "*i64", **seg, "N": "i32", **{k: "constexpr" for k in consts}},
             consts, G.GPU_SUM_WARPS)
    for has_base in (False, True):
        consts = dict(HAS_BASE=has_base, PIECE=G.GPU_PIECE, PIECES_PER_PROGRAM=G.GPU_PIECES_PER_PROGRAM,
                      BLOCK_R=G.GPU_BLOCK_R, BLOCK_D=G.GPU_BLOCK_D)
        compile_(G._segment_pieces_kernel, {"order_ptr": "*i64", "bounds_ptr": "*i64", "piece_code_ptr": "*i64",
                 "piece_start_ptr": "*i64", "pieces_ptr": "*i64", "multi_start_ptr": "*i64", "val_ptr": P[zt],
                 "base_ptr": P[ct],
                 "sums_ptr": "*fp32", "partial_ptr": "*fp32", "K": "i32", "D": "i32", "num_pieces": "i32",
                 "stride_v": "i32", "stride_v_d": "i32", "stride_b": "i32", "stride_s": "i32",
                 **{k: "constexpr" for k in consts}}, consts)
    consts = dict(BLOCK_P=G.GPU_BLOCK_P, BLOCK_D=G.GPU_BLOCK_D)
    compile_(G._segment_combine_kernel, {"multi_ptr": "*i64", "multi_start_ptr": "*i64", "pieces_ptr": "*i64",
             "sums_ptr": "*fp32", "partial_ptr": "*fp32", "K": "i32", "D": "i32", "stride_s": "i32",
             **{k: "constexpr" for k in consts}}, consts)
print("\n".join(failures))
sys.exit(1 if failures else 0)
'''


def _compile_for_sm90(full: bool):
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", VQKERN_AOT_FULL="1" if full else "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_kernels_compile_for_sm90():
    _compile_for_sm90(full=False)


@pytest.mark.slow
def test_kernels_compile_for_sm90_every_config():
    _compile_for_sm90(full=True)
