"""The backends' self-check: a backend whose launcher is wrong on purpose never serves.

Each test wraps a real launcher so that it returns a wrong answer (the second-nearest
code, a scaled gradient, a segment sum missing a row, a biased sampler), clears the
process's verdicts, and checks that ``auto`` warns and serves the correct answer from
the next candidate (on CPU: the reference backend), that an explicit choice raises with
the backend, device, case and mismatch, and that ``report`` shows the verdict.
"""
import warnings

import pytest
import torch

import vqkern
from vqkern import backends
from vqkern.backends import torch_
from vqkern.check import selfcheck

from helpers import assert_nearest

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Every test starts and ends with no verdict cached (a wrong launcher's verdict must not
    outlive its test), with the self-check on."""
    monkeypatch.delenv("VQKERN_SELFCHECK", raising=False)
    monkeypatch.delenv("VQKERN_BACKEND", raising=False)
    selfcheck.clear()
    yield
    selfcheck.clear()


def _second_best(z, codebook, indices):
    """Each row's second-nearest code (fp64), where there are two codes."""
    d = ((z.double()[:, None, :] - codebook.double()[None]) ** 2).sum(-1)
    order = d.argsort(dim=1, stable=True)
    return order[:, 1] if codebook.shape[0] > 1 else indices


def wrong_search(module, monkeypatch, from_row=0):
    """module.search returns the second-nearest code (and its true distance and row) for
    rows from ``from_row`` on: a kernel that launches fine and answers wrong."""
    real = module.search

    def search(z, codebook, indices, distances, quantized):
        real(z, codebook, indices, distances, quantized)
        rows = slice(from_row, None)
        idx = _second_best(z[rows], codebook, indices[rows])
        indices[rows] = idx
        distances[rows] = ((z[rows].float() - codebook[idx].float()) ** 2).sum(1)
        quantized[rows] = codebook[idx].to(quantized.dtype)

    monkeypatch.setattr(module, "search", search)


def wrong_gradient(module, monkeypatch):
    real = module.backward

    def backward(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic):
        real(grad_quantized, z, codebook, indices, scale, grad_z, diff_sums, deterministic)
        if grad_z is not None:
            grad_z.mul_(1.01)

    monkeypatch.setattr(module, "backward", backward)


def wrong_segment_sum(module, monkeypatch):
    real = module.segment_sum

    def segment_sum(indices, values, counts, sums, deterministic):
        real(indices[:-1], values[:-1], counts, sums, deterministic)  # the last row is lost

    monkeypatch.setattr(module, "segment_sum", segment_sum)


def test_every_cpu_backend_passes(device):
    for name in ("torch", "reference"):
        for z_dtype, cb_dtype, metric in ((torch.float32, torch.float32, "l2"), (torch.bfloat16, torch.float32, "l2"),
                                          (torch.float16, torch.float16, "cosine")):
            key, verdict = selfcheck.verdict(name, device, z_dtype, cb_dtype, metric)
            assert verdict.ok, verdict.failures
            assert verdict.cases == len(selfcheck.plan(name, device, key[2], key[3], metric))


def test_report_runs_and_shows_the_verdicts():
    assert all("not yet run" in reason for ok, reason in backends.report("cpu").values() if ok)
    report = backends.report("cpu", check=True)
    for name in ("torch", "reference"):
        ok, reason = report[name]
        assert ok and "z fp32, codebook fp32, metric l2" in reason and reason.endswith("passed")
        assert [v.ok for v in report[name].verdicts.values()] == [True]
    assert not report["cuda"].available and report["cuda"].verdicts == {}


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu-kernel", "tiled"])
def test_the_key_holds_the_code_path(kernel, monkeypatch):
    # VQKERN_CPU_KERNEL=0 switches the torch backend to another search: checked afresh.
    monkeypatch.setenv("VQKERN_CPU_KERNEL", kernel)
    if kernel == "1" and not torch_.cpu_kernel()[0]:
        pytest.skip(torch_.cpu_kernel()[1])
    key, verdict = selfcheck.verdict("torch", "cpu", torch.float32, torch.float32, "l2")
    assert verdict.ok, verdict.failures
    assert key[5] == ("tiled PyTorch" if kernel == "0" else "vqkern._cpu " + key[5].split()[-1])
    t = selfcheck.tiles("torch", "cpu", torch.float32, torch.float32)
    shapes = {case["name"]: (case["n"], case["k"]) for case in selfcheck.plan("torch", "cpu", torch.float32,
                                                                             torch.float32, "l2")}
    # The cases cross the backend's own tiles (at once, or rows and codes apart when large).
    if "row and code tiles" in shapes:
        n, k = shapes["row and code tiles"]
        assert n > t["rows"] and k > t["codes"]
    else:
        assert shapes["row tiles"][0] > t["rows"] and shapes["code tiles"][1] > t["codes"]
    if t["split_rows"]:
        n, k = shapes["code splits"]
        assert n <= t["split_rows"] and k > 2 * t["split_codes"]
    assert ("code splits" in shapes) == (kernel == "1" and torch.get_num_threads() > 1)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_plans_follow_each_backend_s_own_split_rule(name, monkeypatch):
    # No GPU here: the plans for a 132-SM GPU, judged by the split rules the launchers use.
    import importlib
    from types import SimpleNamespace

    from vqkern.backends import cuda

    triton_search = importlib.import_module("vqkern.backends.triton.search")  # the package exports a search()

    monkeypatch.delenv("VQKERN_TRITON_NUM_SPLITS", raising=False)
    monkeypatch.setattr(triton_search, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cuda, "_sm_count", lambda index: 132)
    if name == "cuda" and cuda._load() is None:
        pytest.skip(f"vqkern._C not built: {cuda._ext_error}")
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    splits = {"triton": lambda n, k: triton_search._choose_splits(on_gpu, n, k),
              "cuda": lambda n, k: cuda.choose_splits(n, k, 132, cuda._load().SEARCH_ROWS)}[name]
    for z_dtype in (torch.float32, torch.bfloat16):
        t = selfcheck.tiles(name, "cuda:0", z_dtype, z_dtype)
        cases = {c["name"]: c for c in selfcheck.plan(name, "cuda:0", z_dtype, z_dtype, "l2")}
        tile = cases["row and code tiles"]
        assert tile["n"] > t["rows"] and tile["k"] > t["codes"]
        assert splits(tile["n"], tile["k"]) == 1  # the unsplit search, across row blocks and code tiles
        assert splits(cases["code splits"]["n"], cases["code splits"]["k"]) >= 2
        assert cases["D chunks and backward row blocks"]["d"] > t["d_block"]
        assert cases["a code holding more rows than a segment piece"]["n"] > t["piece"] > 0


@pytest.mark.parametrize("wrong", [wrong_search, wrong_gradient, wrong_segment_sum],
                         ids=["second-best-code", "gradient", "segment-sum"])
def test_auto_skips_a_wrong_backend_with_one_warning(wrong, monkeypatch):
    wrong(torch_, monkeypatch)
    z, codebook = torch.randn(50, 6), torch.randn(20, 6)
    with pytest.warns(RuntimeWarning, match=r"backend 'torch' failed its self-check on cpu.*case '.*'.*report") as w:
        idx, dist = vqkern.nearest_code(z, codebook)
    assert len([x for x in w if "self-check" in str(x.message)]) == 1
    assert_nearest(z, codebook, idx, dist)  # served by the reference backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is cached: no second warning, no second battery
        assert backends.resolve("auto", "cpu") == "reference"
    entry = backends.report("cpu")["torch"]
    ok, reason = entry
    assert ok and "FAILED" in reason and not next(iter(entry.verdicts.values())).ok


@pytest.mark.parametrize("wrong", [wrong_search, wrong_gradient, wrong_segment_sum],
                         ids=["second-best-code", "gradient", "segment-sum"])
def test_an_explicit_wrong_backend_raises(wrong, monkeypatch):
    wrong(torch_, monkeypatch)
    z, codebook = torch.randn(50, 6), torch.randn(20, 6)
    with pytest.raises(RuntimeError, match=r"backend='torch' failed its self-check.*cpu.*case '.*'"):
        vqkern.quantize(z, codebook, backend="torch")
    with pytest.raises(RuntimeError, match="failed its self-check"):  # again, from the cached verdict
        vqkern.nearest_code(z, codebook, backend="torch")


def test_the_mismatch_is_named():
    # The second-best code only from the first row tile on: the tile-crossing case catches it.
    with pytest.MonkeyPatch.context() as mp:
        rows = selfcheck.tiles("torch", "cpu", torch.float32, torch.float32)["rows"]
        wrong_search(torch_, mp, from_row=rows)
        _, verdict = selfcheck.verdict("torch", "cpu", torch.float32, torch.float32, "l2")
    assert not verdict.ok
    assert verdict.failures[0].startswith("case 'row and code tiles'")
    assert "search rank: row" in verdict.failures[0] and "exceeds the nearest's" in verdict.failures[0]


def test_when_no_backend_passes_auto_raises_with_every_reason(monkeypatch):
    from vqkern.backends import reference
    wrong_search(torch_, monkeypatch)
    wrong_gradient(reference, monkeypatch)
    with pytest.raises(RuntimeError, match=r"no vqkern backend passed(?s:.*)torch: .*search(?s:.*)reference: .*grad_z"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vqkern.nearest_code(torch.randn(5, 3), torch.randn(4, 3))


def test_wrong_sampler_is_caught(monkeypatch):
    # A sampler that always returns the nearest code (temperature ignored): validity and
    # determinism hold, only the distribution check sees it.
    def sample(z, codebook, inv_temperature, seed, cosine, indices, distances, quantized):
        torch_.search(z, codebook, indices, distances, quantized)

    monkeypatch.setattr(torch_, "sample", sample)
    with pytest.raises(RuntimeError, match=r"case 'sampling distribution'.*chi-square"):
        vqkern.sample_code(torch.randn(8, 4), torch.randn(5, 4), 1.0, backend="torch")


def test_selfcheck_off(monkeypatch):
    # VQKERN_SELFCHECK=0: nothing runs, and a wrong backend is trusted (the switch's cost).
    monkeypatch.setenv("VQKERN_SELFCHECK", "0")
    wrong_search(torch_, monkeypatch)
    z, codebook = torch.randn(50, 6), torch.randn(20, 6)
    idx, _ = vqkern.nearest_code(z, codebook, backend="torch")
    assert not selfcheck.verdicts() and torch.equal(idx, _second_best(z, codebook, idx))
    assert "self-check: off" in backends.report("cpu")["torch"][1]


def test_verdicts_are_cached_per_key(monkeypatch):
    calls = []
    real = torch_.search
    monkeypatch.setattr(torch_, "search", lambda *a: (calls.append(1), real(*a))[1])
    z, codebook = torch.randn(7, 4), torch.randn(5, 4)
    vqkern.nearest_code(z, codebook, backend="torch")
    first = len(calls)
    assert first > 1  # the battery, then the call
    vqkern.nearest_code(z, codebook, backend="torch")
    assert len(calls) == first + 1
    vqkern.nearest_code(z.bfloat16(), codebook, backend="torch")  # a new key: a new battery
    assert len(calls) > first + 2
    assert len(selfcheck.verdicts("cpu")) == 2


def test_cosine_keys_share_one_check():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        vqkern.nearest_code(torch.randn(6, 3, dtype=dtype), torch.randn(4, 3), metric="cosine", backend="torch")
    assert [k[2:5] for k in selfcheck.verdicts()] == [(torch.float32, torch.float32, "cosine")]


def test_runs_eagerly_while_a_compiled_function_is_traced(monkeypatch):
    # fullgraph=True, first call compiled: the battery runs while the call is traced, and
    # a wrong backend under auto is skipped inside the compiled graph as well.
    wrong_search(torch_, monkeypatch)
    z, codebook = torch.randn(30, 5), torch.randn(9, 5)
    compiled = torch.compile(lambda z, cb: vqkern.quantize(z, cb).indices, fullgraph=True)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        idx = compiled(z, codebook)
    assert_nearest(z, codebook, idx)
    assert {k[0] for k in selfcheck.verdicts()} == {"torch", "reference"}


def test_capture_without_an_eager_call_raises(monkeypatch):
    # Under CUDA graph capture the battery must not launch: a clear error, or the cache.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="Run one eager call"):
        backends.resolve("torch", "cuda", torch.float32, torch.float32, "l2")
    key = selfcheck.key("torch", "cuda", torch.float32, torch.float32, "l2")
    selfcheck._VERDICTS[key] = selfcheck.Verdict(True, (), 1, 0.0)  # as an eager call leaves it
    assert backends.resolve("torch", "cuda", torch.float32, torch.float32, "l2") == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_capture_after_an_eager_call():
    z, codebook = torch.randn(64, 8, device="cuda"), torch.randn(16, 8, device="cuda")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="Run one eager call"):
        with torch.cuda.graph(graph):
            vqkern.nearest_code(z, codebook)
    vqkern.nearest_code(z, codebook)  # eager: the self-check runs here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, _ = vqkern.nearest_code(z, codebook)
    graph.replay()
    assert_nearest(z, codebook, idx)


def test_triton_in_the_interpreter(monkeypatch):
    if not backends.availability("triton", "cpu")[0]:
        pytest.skip(backends.availability("triton", "cpu")[1])
    from vqkern.backends import triton as triton_backend
    wrong_search(triton_backend, monkeypatch)
    z, codebook = torch.randn(20, 4), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match=r"backend='triton' failed its self-check.*case 'row and code tiles'"):
        vqkern.nearest_code(z, codebook, backend="triton")
    monkeypatch.undo()
    selfcheck.clear()
    wrong_gradient(triton_backend, monkeypatch)
    with pytest.raises(RuntimeError, match=r"backend='triton' failed its self-check.*backward grad_z"):
        vqkern.quantize(z, codebook, backend="triton")
