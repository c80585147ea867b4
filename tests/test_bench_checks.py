"""What makes a benchmark figure a result: checked codes, a true floor, files that survive.

- Every provider's codes are checked against the fp32 expansion before it is timed;
  wrong codes are recorded as ``wrong`` with the mismatch, never timed.
- The matmul floor is the fastest way the machine multiplies (``a @ b``, ``out=``,
  and on CPU for 16-bit dtypes the widened fp32 product), each try recorded.
- The runner rewrites its JSON after every case (a process killed at its time limit
  keeps what it measured) and starts a case only when its estimate fits ``--budget``.
- The GPU grid covers the GPU targets' shapes, in order of importance.
All on CPU with tiny shapes, a few seconds each.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import codes, gpu_grid, measure, run
from benchmarks.providers import PROVIDERS, Provider

FAST = ["--device", "cpu", "--reps", "1", "--floor-sizes", "256", "--no-plots"]


def _records(tmp_path, name):
    (path,) = (tmp_path / "cpu").glob(f"*-{name}.json")
    return json.loads(path.read_text())


def test_check_accepts_ties_and_rejects_a_farther_code():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 8, generator=g)
    codebook[30] = codebook[3]  # an exact tie: either index is right
    z = codebook[torch.randint(50, (200,), generator=g)] + 0.05 * torch.randn(200, 8, generator=g)
    z[0] = codebook[3]
    ref = codes.reference(z, codebook)
    right = ref["indices"].clone()
    right[0] = 30
    verdict = codes.check(ref, right)
    assert verdict["ok"] and verdict["wrong_rows"] == 0 and verdict["same_index_rows"] == 199
    second = torch.cdist(z, codebook).topk(2, largest=False).indices[:, 1]
    verdict = codes.check(ref, second)
    assert not verdict["ok"] and verdict["wrong_rows"] > 150 and "WRONG CODES" in verdict["summary"]
    assert not codes.check(ref, torch.full((200,), 50))["ok"]  # out of range
    assert "want (200,)" in codes.check(ref, right[:10])["summary"]


def test_wrong_codes_are_recorded_and_never_timed(tmp_path, monkeypatch):
    # A provider that returns the second nearest code of every row: fast, and not a result.
    def build(case, data, pass_):
        def fn(i):
            z = data["zs"][i % len(data["zs"])].float()
            return torch.cdist(z, data["codebook"].float()).topk(2, largest=False).indices[:, 1], None
        return fn
    monkeypatch.setitem(PROVIDERS, "second-best", Provider("second-best", ("forward",), build))
    assert run.main([*FAST, "--shapes", "300,40,6", "--dtypes", "fp32", "--passes", "forward",
                     "--providers", "vqkern-torch,expansion,second-best", "--out", str(tmp_path),
                     "--name", "wrong"]) == 0
    by = {r["provider"]: r for r in _records(tmp_path, "wrong")["records"]}
    bad = by["second-best"]
    assert bad["status"] == "wrong" and "median_ms" not in bad and "rows chose a code farther" in bad["reason"]
    assert bad["check"]["wrong_rows"] > 250
    for name in ("vqkern-torch", "expansion"):
        assert by[name]["status"] == "ok" and by[name]["check"]["ok"] and by[name]["median_ms"] > 0
    assert "| second-best | WRONG |" in next((tmp_path / "cpu").glob("*-wrong.md")).read_text()


def test_one_code_data_collapses_every_row():
    case = run.Case(500, 64, 8, torch.float32, torch.device("cpu"), "one-code")
    data = run.make_data(case, seed=1)
    ref = codes.reference(data["zs"][0], data["codebook"])
    assert torch.equal(ref["indices"], torch.zeros(500, dtype=torch.int64))


def test_floor_takes_the_fastest_way_and_records_every_try(monkeypatch):
    rate = measure.matmul_rate(torch.device("cpu"), torch.float32, sizes=(256, 384), reps=2)
    timed = [t for t in rate["matmul_tries"] if t["flops_per_s"] is not None]
    assert {t["method"] for t in timed} == {"a @ b", "torch.mm(a, b, out=c)"}
    assert {t["shape"][0] for t in timed} == {256, 384}
    assert rate["matmul_flops"] == max(t["flops_per_s"] for t in timed)
    assert (rate["matmul_method"], rate["matmul_shape"]) in [(t["method"], t["shape"]) for t in timed
                                                            if t["flops_per_s"] == rate["matmul_flops"]]
    # The rules, with made-up rates (a real host's load would make them flaky): a way 100x
    # slower at the probe is not timed further (bf16 on a CPU without bf16 instructions);
    # a loaded host times the smallest size and skips the sizes whose call would be too long.
    def fast(a, b, out):
        return a @ b

    def slow(a, b, out):
        return a @ b
    rates = {fast: lambda n: 1e8 * n / 256, slow: lambda n: 1e6}  # FLOP/s
    monkeypatch.setattr(measure, "_matmul_methods", lambda device, dtype: {"fast": fast, "slow": slow})
    monkeypatch.setattr(measure, "_time_matmul", lambda fn, n, *args: 2.0 * n**3 / rates[fn](n))
    rate = measure.matmul_rate(torch.device("cpu"), torch.float32, sizes=(512, 1024, 2048), reps=1)
    tries = {(t["method"], t["shape"][0]): t for t in rate["matmul_tries"]}
    assert (rate["matmul_method"], rate["matmul_shape"]) == ("fast", [512] * 3)
    assert rate["matmul_flops"] == pytest.approx(2e8) and tries[("slow", 256)]["note"].startswith("the probe")
    assert "10.7 s a call at the rate reached at 512^3" in tries[("fast", 1024)]["note"]
    assert tries[("fast", 2048)]["flops_per_s"] is None
    for n in (512, 1024, 2048):
        slow = tries[("slow", n)]
        assert slow["flops_per_s"] is None and "100x slower than the fastest" in slow["note"]


def test_bf16_cpu_floor_includes_the_widened_product():
    names = set(measure._matmul_methods(torch.device("cpu"), torch.bfloat16))
    assert names == {"a @ b", "torch.mm(a, b, out=c)", "a.float() @ b.float()"}
    assert set(measure._matmul_methods(torch.device("cuda"), torch.bfloat16)) == {"a @ b", "torch.mm(a, b, out=c)"}


def test_budget_records_the_cases_that_do_not_fit(tmp_path):
    # Item 1's estimates (seconds per pass) do not fit in 1 s: every case is recorded, none run.
    assert run.main([*FAST, "--item", "1", "--shapes", "64,32,8", "--budget", "1", "--out", str(tmp_path)]) == 0
    data = _records(tmp_path, "gpu-" + gpu_grid.GPU_GRID[0].name)
    assert data["meta"]["complete"] and data["meta"]["item"] == "1"
    statuses = {r["status"] for r in data["records"]}
    assert statuses == {"not-run", "n/a"}
    assert all("not started: needs about" in r["reason"] for r in data["records"] if r["status"] == "not-run")
    budget = run.Budget(100, {"start": 5, "forward": 10})
    assert budget.refusal("forward") is None and budget.need("train") == 0  # no estimate, nothing seen yet
    budget.done("forward", 30.0)  # three times the estimate: later estimates scale with it
    assert budget.need("forward") == pytest.approx(30 * run.MARGIN)
    budget.done("train", 200.0)
    assert "not started" in budget.refusal("train")


def test_results_survive_a_kill(tmp_path, monkeypatch):
    # The process dies in its second (shape, pass), as at a time limit: the JSON already on
    # disk holds the first case, whole, marked incomplete.
    real, calls = run.run_case, []

    def dies_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed at the time limit")
        return real(*args, **kwargs)
    monkeypatch.setattr(run, "run_case", dies_second)
    with pytest.raises(KeyboardInterrupt):
        run.main([*FAST, "--dtypes", "fp32", "--shapes", "256,64,8", "--passes", "forward,backward,train",
                  "--providers", "vqkern-torch,expansion", "--out", str(tmp_path), "--name", "killed"])
    data = _records(tmp_path, "killed")
    assert data["meta"]["complete"] is False
    done = {(r["pass"], r["provider"]): r["status"] for r in data["records"]}
    assert done == {("forward", "vqkern-torch"): "ok", ("forward", "expansion"): "ok"}
    assert "## forward, N=256 K=64 D=8" in next((tmp_path / "cpu").glob("*-killed.md")).read_text()


def test_gpu_grid_covers_the_gpu_targets_in_order():
    grid = gpu_grid.GPU_GRID
    key = [(i.shape, i.dtype, i.data) for i in grid]
    assert key[:3] == [((65536, 16384, 256), "bf16", "randn"), ((65536, 262144, 64), "bf16", "randn"),
                       ((65536, 16384, 256), "fp32", "randn")]
    for want in [((256, 1048576, 256), "bf16", "randn"), ((1048576, 65536, 8), "bf16", "randn"),
                 ((65536, 16384, 256), "bf16", "one-code")]:
        assert want in key
    first, fp32, onecode = grid[0], grid[2], next(i for i in grid if i.data == "one-code")
    assert {"forward", "backward", "train"} <= set(first.passes)
    assert {"vqkern-cuda-det", "vqkern-triton-det", "gemm", "flash-kmeans", "vqpt-train-beta"} <= set(first.providers)
    assert "vqkern-triton-tf32x3" in fp32.providers and "expansion" in fp32.providers
    assert "backward" in onecode.passes and "vqkern-triton-det" in onecode.providers
    for item in grid:
        assert set(item.providers) <= set(PROVIDERS), item.name
        assert item.est["start"] > 0 and all(item.est.get(p, 0) > 0 for p in item.passes), item.name
    assert gpu_grid.find("2") is grid[1] and gpu_grid.find(grid[3].name) is grid[3]
    with pytest.raises(KeyError):
        gpu_grid.find("0")


def _sweep(date, bf16_rate, copy, median_ms):
    rates = {"matmul_flops": bf16_rate, "matmul_shape": [4096] * 3, "bandwidth_bytes": copy, "copy_bytes": 1}
    meta = {**measure.provenance(torch.device("cpu"), []), "cpu_model": "Some CPU", "date": date,
            "mem_method": "rss", "floor_rates": {"bf16": rates}, "shapes": [[64, 32, 8]], "passes": ["forward"],
            "providers": ["vqkern-torch"], "dtypes": ["bf16"]}
    flops, nbytes = 2.0 * 64 * 32 * 8 * 1000, 1e6
    floor = measure.floor_ms(flops, nbytes, rates)
    rec = {"n": 64, "k": 32, "d": 8, "dtype": "bfloat16", "pass": "forward", "provider": "vqkern-torch",
           "status": "ok", "reason": "", "median_ms": median_ms, "min_ms": median_ms, "max_ms": median_ms,
           "flops": flops, "bytes": nbytes, "floor_ms": floor, "floor_fraction": floor / median_ms, **rates}
    return {"meta": meta, "records": [rec]}


def test_recompute_puts_the_fastest_recorded_floor_under_every_table(tmp_path):
    from benchmarks import floors

    slow, fast = _sweep("a", 1e9, 2e9, median_ms=1.0), _sweep("b", 4e9, 1e9, median_ms=2.0)
    paths = []
    for name, data in (("slow", slow), ("fast", fast)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    for _ in range(2):  # a second run changes nothing: the maxima come from the in-run rates
        assert floors.recompute([str(p) for p in paths], [], ["recompute"]) == 0
        done = {p.stem: json.loads(p.read_text()) for p in paths}
        for data in done.values():
            rec, meta = data["records"][0], data["meta"]
            assert meta["floor_rates"]["bf16"]["matmul_flops"] == 4e9 and rec["bandwidth_bytes"] == 2e9
            assert "fast.json" in meta["floor_rates"]["bf16"]["source"] and meta["floor_correction"]["why"]
            assert rec["floor_ms"] == pytest.approx(measure.floor_ms(rec["flops"], rec["bytes"], rec))
            assert rec["floor_fraction"] == pytest.approx(rec["floor_ms"] / rec["median_ms"])
        kept = done["slow"]["records"][0]
        assert kept["floor_fraction_in_run"] == pytest.approx(slow["records"][0]["floor_fraction"])
        assert kept["floor_fraction"] == pytest.approx(kept["floor_fraction_in_run"] / 4)  # a floor 4x faster
        assert "the fastest recorded on this machine" in (tmp_path / "slow.md").read_text()
    other = _sweep("c", 1e9, 1e9, 1.0)
    other["meta"]["cpu_model"] = "Another CPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="one machine"):
        floors.recompute([str(paths[0]), str(tmp_path / "other.json")], [], ["recompute"])
