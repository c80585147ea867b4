"""The sweep runner end to end on a tiny case: files, provenance, statuses."""
from __future__ import annotations

import json

import pytest

from benchmarks import run
from vqkern.backends import torch_

REQUIRED = ("device", "torch", "triton", "cuda", "git_commit", "date", "command", "n", "k", "d", "dtype",
            "provider", "pass", "floor_ms", "status", "cpu_model", "cpu_isa", "load_average")


def test_runner_writes_results(tmp_path, capsys):
    rc = run.main(["--device", "cpu", "--dtypes", "fp32", "--shapes", "300,70,5;300,140,5", "--providers",
                   "vqkern-torch,expansion,faiss,flash-kmeans,gemm", "--reps", "2", "--out", str(tmp_path),
                   "--name", "smoke"])
    assert rc == 0
    folder = tmp_path / "cpu"
    (json_path,) = folder.glob("*-smoke.json")
    assert json_path.with_suffix(".md").exists()
    summary = (folder / f"{json_path.stem}-summary.md").read_text()
    assert "| 300 x 70 x 5 | float32 |" in summary and "**train**" in summary
    assert (folder / f"{json_path.stem}-time.png").exists()
    records = json.loads(json_path.read_text())["records"]
    assert len(records) == 2 * 3 * 5
    for rec in records:
        assert all(key in rec for key in REQUIRED), rec
    by = {(r["provider"], r["pass"], r["k"]): r for r in records}
    ok = by[("vqkern-torch", "forward", 70)]
    assert ok["status"] == "ok" and ok["min_ms"] <= ok["median_ms"] <= ok["max_ms"]
    assert ok["peak_mem_bytes"] is not None and 0 < ok["floor_fraction"]
    assert by[("flash-kmeans", "forward", 70)]["status"] == "skipped"
    assert "CUDA" in by[("flash-kmeans", "forward", 70)]["reason"]
    assert by[("faiss", "train", 70)]["status"] == "n/a"
    assert by[("vqkern-torch", "train", 140)]["status"] == "ok"
    out = capsys.readouterr().out
    assert "skip flash-kmeans" in out and "## forward, N=300 K=70 D=5" in out


def test_bf16_cases_and_their_floor_rate(tmp_path):
    assert run.parse_args(["--device", "cpu"]).dtypes == ["fp32", "bf16"]
    run.main(["--device", "cpu", "--shapes", "200,64,32", "--dtypes", "bf16", "--passes", "forward,backward",
              "--providers", "vqkern-torch,vqkern-torch-avx2,vqkern-cpu-backward", "--reps", "1",
              "--out", str(tmp_path), "--name", "bf16", "--no-plots"])
    (json_path,) = (tmp_path / "cpu").glob("*-bf16.json")
    data = json.loads(json_path.read_text())
    assert set(data["meta"]["floor_rates"]) == {"bf16"}  # the matmul rate of torch.mm in bf16
    by = {(r["provider"], r["pass"]): r for r in data["records"]}
    fwd = by[("vqkern-torch", "forward")]
    assert fwd["status"] == "ok" and fwd["dtype"] == "bfloat16" and "vqkern._cpu" in fwd["cpu_isa"]
    ok, _ = torch_.cpu_kernel()
    assert by[("vqkern-cpu-backward", "backward")]["status"] == ("ok" if ok else "skipped")  # the bf16 entry


def test_cpu_oom_is_recorded_not_run(tmp_path):
    run.main(["--device", "cpu", "--shapes", "4096,4096,64", "--providers", "reference", "--passes", "forward",
              "--dtypes", "fp32",
              "--mem-limit-gb", "0.5", "--out", str(tmp_path), "--name", "oom", "--no-plots"])
    (json_path,) = (tmp_path / "cpu").glob("*-oom.json")
    (rec,) = json.loads(json_path.read_text())["records"]
    assert rec["status"] == "oom" and "GiB" in rec["reason"]


@pytest.mark.parametrize("bad", [["--passes", "sideways"], ["--shapes", "1,2"], ["--providers", "nope"]])
def test_bad_options_are_refused(bad):
    with pytest.raises(SystemExit):
        run.parse_args(bad)
