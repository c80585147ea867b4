"""The GPU session's script (benchmarks/gpu/) on this CPU, so no GPU minute goes to a script error.

The dry run (DRY_RUN=1) is the same session.sh end to end: the time budget and the
per-step limits, the parallel test groups with the quick grid, the kernel launcher
script of the sanitizer step, the benchmark runner on a tiny shape, the summary and
the results packed into $OUT. Without a GPU it skips only the nvcc build and runs
sanitize.py without compute-sanitizer. About 45 s of CPU, most of it Python start-ups
and the benchmark runner's floor measurement.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import gpu_quick

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
_spec = importlib.util.spec_from_file_location("gpu_session_tools", GPU / "tools.py")
tools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tools)

needs_bash = pytest.mark.skipif(sys.platform == "win32", reason="session.sh is a bash script")


def _session(tmp_path, *steps, **env):
    e = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
             WORK=str(tmp_path / "work"), BUDGET="900")
    e.pop("VQKERN_GPU_QUICK", None)
    e.update(env)
    return subprocess.run(["bash", str(GPU / "session.sh"), *steps], env=e, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)


@needs_bash
def test_dry_run_end_to_end(tmp_path):
    before = {p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file()}
    started = time.time()
    # Call 1's steps, then a step killed at a 1 s limit and one skipped for want of time:
    # both must be reported and make the exit status 1, and neither may stop what follows.
    done = _session(tmp_path, "build", "tests", "sanitize", "racecheck", "pytest", "bench",
                    LIMIT_RACECHECK="1", NEED_PYTEST="100000")
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lines = summary.splitlines()
    assert lines[0].startswith("# vqkern GPU session (DRY RUN on CPU): steps build tests sanitize racecheck")
    for want in ("SKIP build: dry run", "PASS tests-cuda", "PASS tests-triton", "PASS tests-api", "PASS sanitize",
                 "TIMEOUT racecheck", "SKIP pytest: needs about 100000s", "PASS bench-300x70x8-fp32"):
        assert any(line.startswith(want) for line in lines), f"no line '{want}' in\n{summary}"
    assert "sanitize.py: 50 of 50 cases ok, 0 failed" in summary
    assert "VQKERN_GPU_QUICK=1:" in summary  # the quick grid reached the test groups
    assert any("forward" in line and "300x70x8" in line and "triton" in line for line in lines)
    assert lines[-1].startswith("# done:") and lines[-1].endswith("NOT ALL PASSED")
    assert done.stdout.rstrip().splitlines()[-1].endswith("summary.txt")  # the listing of $OUT closes the output
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.txt"]

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        logs = "build/gpu-session/logs/"
        for log in ("tests-cuda.log", "tests-triton.log", "tests-api.log", "sanitize.log", "racecheck.log",
                    "bench-300x70x8-fp32.log", "machine.txt"):
            assert logs + log in names, sorted(names)
        jsons = [n for n in names if n.startswith("benchmarks/results/cpu/") and n.endswith("-gpu-300x70x8-fp32.json")]
        assert len(jsons) == 1, sorted(names)
        data = json.load(tar.extractfile(jsons[0]))
        record = [n for n in names if "-gpu-session-" in n and n.endswith(".md")]
        assert len(record) == 1 and b"commit `" in tar.extractfile(record[0]).read()
    status = {r["provider"]: r["status"] for r in data["records"]}
    assert status["vqkern-triton"] == "ok" and status["gemm"] == "ok" and status["vqkern-cuda"] == "skipped"
    assert status["flash-kmeans"] == "skipped" and status["vqpt-train-beta"] == "n/a"
    assert "--providers vqkern-cuda,vqkern-triton,gemm" in data["meta"]["command"]
    # A dry run writes nothing into the repository's results.
    after = {p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file() and p.stat().st_mtime >= started}
    assert after <= before


@needs_bash
def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = _session(tmp_path, "tests", "benchmark")
    assert done.returncode == 64 and "unknown step 'benchmark'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_quick_grid_crosses_backends_and_modes():
    backends = ["cuda", "triton", "torch"]
    pairs = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32")]
    shapes = [(1, 1, 1), (37, 7, 3), (300, 70001, 16)]
    cases = [{"backend": b, ("z_dtype", "cb_dtype"): p, ("n", "k", "d"): s}
             for b in backends for p in pairs for s in shapes]
    kept = [cases[i] for i in gpu_quick.covering_subset(cases)]
    # Every backend meets every dtype pair (kept whole) and every shape, in the fewest cases.
    assert len(kept) == len(backends) * max(len(pairs), len(shapes))
    for b in backends:
        assert {c[("z_dtype", "cb_dtype")] for c in kept if c["backend"] == b} == set(pairs)
        assert {c[("n", "k", "d")] for c in kept if c["backend"] == b} == set(shapes)
    # Boolean modes are crossed with every other value; a lone parameter keeps every case.
    cases = [{"deterministic": det, ("n", "k"): s} for det in (False, True) for s in shapes]
    assert gpu_quick.covering_subset(cases) == list(range(len(cases)))
    seeds = [{"seed": i} for i in range(7)]
    assert gpu_quick.covering_subset(seeds) == list(range(7))
    assert gpu_quick.covering_subset([{"flag": True}, {"flag": True}]) == [0]


# Lines of a real build log (nvcc 13.0, -Xptxas=-v, sm_90a), and a spilling kernel.
PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN6vqkern41_GLOBAL__N__dafc7d83_9_search_cu_449e9d1e17search_mma_kernelI13__nv_bfloat16EEvPKT_S5_lllPKfibPfPi' for 'sm_90a'
ptxas info    : Function properties for _ZN6vqkern41_GLOBAL__N__dafc7d83_9_search_cu_449e9d1e17search_mma_kernelI13__nv_bfloat16EEvPKT_S5_lllPKfibPfPi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 60 registers, used 1 barriers, 30720 bytes smem
ptxas info    : Compile time = 272.032 ms
ptxas info    : Compiling entry function '_ZN6vqkern41_GLOBAL__N__dafc7d83_9_search_cu_449e9d1e17search_fma_kernelEPKviS2_illlPKfiPfPi' for 'sm_90a'
ptxas info    : Function properties for _ZN6vqkern41_GLOBAL__N__dafc7d83_9_search_cu_449e9d1e17search_fma_kernelEPKviS2_illlPKfiPfPi
    168 bytes stack frame, 96 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8320 bytes smem
"""


def test_ptxas_table_flags_spills(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    assert tools.ptxas(str(log)) == 0
    out = capsys.readouterr().out.splitlines()
    mma = next(line for line in out if "search_mma_kernel" in line)
    fma = next(line for line in out if "search_fma_kernel" in line)
    assert "regs  60" in mma and "smem  30720" in mma and "spill    0" in mma and "SPILLS" not in mma
    assert "regs 255" in fma and "stack  168" in fma and "spill  168" in fma and fma.endswith("SPILLS")
    assert out[-1].strip() == "2 kernels x archs, 1 with spills"
    log.write_text("-- Configuring done\n")
    assert tools.ptxas(str(log)) == 1
