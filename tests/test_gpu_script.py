"""The GPU session's script (benchmarks/gpu/) on this CPU, so no GPU minute goes to a script error.

The dry run (DRY_RUN=1) is the same session.sh end to end: call 1's order (build, the
vqkern.check step, the parallel test groups with the quick grid, bench item 1, the
kernel launcher script of the sanitizer step with one search config pinned, bench item
2), the time budget (a step that does not fit is skipped and left for call 2), the
state file that call 2 (`next`) reads, the benchmark runner on a tiny shape with every
provider's codes checked, the summary and the results packed into $OUT. Without a GPU
it skips only the nvcc build and runs sanitize.py without compute-sanitizer. Call 1
takes 2 to 4 minutes on two busy cores, most of it the Triton interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
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
GRID_SIZE = 9  # benchmarks/gpu_grid.py; checked below
HAS_CHECK = (ROOT / "vqkern" / "check.py").exists() or (ROOT / "vqkern" / "check" / "__main__.py").exists()


def _session(tmp_path, *steps, out="out", work="work", dry=True, **env):
    e = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / out), WORK=str(tmp_path / work), BUDGET="1500")
    if dry:
        e["DRY_RUN"] = "1"
    e.pop("VQKERN_GPU_QUICK", None)
    e.update(env)
    return subprocess.run(["bash", str(GPU / "session.sh"), *steps], env=e, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)


def _lines(out: Path) -> list[str]:
    return (out / "summary.txt").read_text().splitlines() if (out / "summary.txt").exists() else []


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    """Call 1's default steps, dry; bench item 2 made not to fit (left for call 2)."""
    tmp = tmp_path_factory.mktemp("gpu-session")
    before = {p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file()}
    started = time.time()
    done = _session(tmp, NEED_BENCH_2="100000")
    after = {p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file() and p.stat().st_mtime >= started}
    return tmp, done, after - before


@needs_bash
def test_first_call_runs_in_order_and_leaves_the_rest_for_the_second(first_call):
    tmp, done, written = first_call
    out = tmp / "out"
    lines = _lines(out)
    summary = "\n".join(lines)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert lines[0].startswith("# vqkern GPU session (DRY RUN on CPU): steps build check tests bench:1 sanitize "
                               "bench:2;")
    order = ["SKIP build: dry run", "PASS check" if HAS_CHECK else "MISSING check", "PASS tests-cuda",
             "PASS tests-triton", "PASS tests-configs", "PASS tests-api", "PASS bench:1", "PASS sanitize",
             "SKIP bench:2: needs about 100000s"]
    at = [next((i for i, line in enumerate(lines) if line.startswith(want)), None) for want in order]
    assert None not in at and at == sorted(at), f"steps missing or out of order: {dict(zip(order, at))}\n{summary}"
    assert "sanitize.py: 50 of 50 cases ok, 0 failed" in summary
    assert "VQKERN_GPU_QUICK=1:" in summary  # the quick grid reached the test groups
    assert any(line.split()[:2] == ["forward", "bfloat16"] and "64x64x16" in line and "triton" in line
               for line in lines), summary
    assert lines[-2].startswith("# done:") and lines[-2].endswith("NOT ALL PASSED")
    assert lines[-1] == "# next call would run: " + " ".join(f"bench:{n}" for n in range(2, GRID_SIZE + 1))
    assert done.stdout.rstrip().splitlines()[-1].endswith("summary.txt")  # the listing of $OUT closes the output
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs.tar.gz", "state.txt", "summary.txt"]
                                                           + (["check.json"] if HAS_CHECK else []))
    state = (out / "state.txt").read_text().splitlines()
    assert state[0] == "plan build check tests bench:1 sanitize bench:2"
    assert {"PASS tests", "PASS bench:1", "PASS sanitize", "SKIP bench:2"} <= set(state)
    assert not written  # a dry run writes nothing into the repository's results

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        logs = "build/gpu-session/logs/"
        for log in ("tests-cuda.log", "tests-triton.log", "tests-configs.log", "tests-api.log", "sanitize.log",
                    "bench-1.log", "machine.txt"):
            assert logs + log in names, sorted(names)
        jsons = [n for n in names if n.startswith("benchmarks/results/cpu/") and
                 n.endswith("-gpu-fwd-65536x16384x256-bf16.json")]
        assert len(jsons) == 1, sorted(names)
        data = json.load(tar.extractfile(jsons[0]))
        record = [n for n in names if "-gpu-session-" in n and n.endswith(".md")]
        assert len(record) == 1 and b"commit `" in tar.extractfile(record[0]).read()
        sanitize_log = tar.extractfile(logs + "sanitize.log").read().decode()
    assert "search kernel: one config, VQKERN_TRITON_SEARCH_CONFIG=0" in sanitize_log  # no autotuning sweep
    assert data["meta"]["complete"] and data["meta"]["item"] == "fwd-65536x16384x256-bf16"
    assert "--item fwd-65536x16384x256-bf16" in data["meta"]["command"] and "--budget" in data["meta"]["command"]
    status = {(r["provider"], r["pass"]): r for r in data["records"]}
    for key in [("vqkern-triton", "forward"), ("vqkern-triton", "train"), ("vqkern-triton-det", "backward")]:
        assert status[key]["status"] == "ok" and status[key]["check"]["ok"], status[key]
    assert status[("vqkern-cuda", "forward")]["status"] == "skipped"
    assert status[("flash-kmeans", "forward")]["status"] == "skipped"
    assert status[("gemm", "forward")]["status"] == "ok" and "check" not in status[("gemm", "forward")]
    assert status[("vqpt-train-beta", "forward")]["status"] == "n/a"


@needs_bash
def test_second_call_runs_what_the_first_skipped(first_call, tmp_path):
    # A fresh machine: call 1's state.txt carried. bench:2 first, killed at a 1 s limit
    # (a timeout is a verdict: not run again); the grid's later items do not fit.
    tmp, _, _ = first_call
    need = {f"NEED_BENCH_{n}": "100000" for n in range(3, GRID_SIZE + 1)}
    done = _session(tmp_path, "next", CARRIED_STATE=str(tmp / "out" / "state.txt"), LIMIT_BENCH_2="1", **need)
    lines = _lines(tmp_path / "out")
    summary = "\n".join(lines)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    todo = " ".join(f"bench:{n}" for n in range(2, GRID_SIZE + 1))
    assert lines[0].startswith(f"# vqkern GPU session (DRY RUN on CPU): steps {todo};"), summary
    assert lines[1] == f"next: from {tmp / 'out' / 'state.txt'}: {todo}"
    assert any(line.startswith("TIMEOUT bench:2") for line in lines), summary
    assert any(line.startswith("SKIP bench:3: needs about 100000s") for line in lines), summary
    assert lines[-1] == "# next call would run: " + " ".join(f"bench:{n}" for n in range(3, GRID_SIZE + 1))


@needs_bash
def test_no_gpu_is_read_from_the_capability_not_from_a_log_line(tmp_path):
    # A Python that prints a warning naming a capability before anything else: the first line
    # of the machine log says "capability 9.0", yet this machine has no GPU.
    noisy = tmp_path / "python"
    noisy.write_text(f'#!/bin/sh\necho "UserWarning: device capability 9.0 expected" >&2\nexec {sys.executable} "$@"\n')
    noisy.chmod(noisy.stat().st_mode | stat.S_IEXEC)
    done = _session(tmp_path, "tests", dry=False, PYTHON=str(noisy))
    lines = _lines(tmp_path / "out")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(line.startswith("NO GPU: torch sees no CUDA device here (capability 'none'") for line in lines), lines
    assert "SKIP tests: no CUDA device visible to torch" in lines
    assert (tmp_path / "work" / "capability").read_text().strip() == "none"


@needs_bash
@pytest.mark.parametrize("steps,message", [(["tests", "benchmark"], "unknown step 'benchmark'"),
                                           (["bench:42"], "no GPU grid item '42'")])
def test_bad_steps_are_refused_before_anything_runs(tmp_path, steps, message):
    done = _session(tmp_path, *steps)
    assert done.returncode == 64 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_grid_size_matches_the_grid():
    from benchmarks import gpu_grid

    assert len(gpu_grid.GPU_GRID) == GRID_SIZE


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
"""  # noqa: E501 (verbatim lines of the log, mangled kernel names and all)


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


def test_bench_summary_fails_on_wrong_vqkern_codes(tmp_path, capsys):
    rates = {"matmul_flops": 7e14, "matmul_method": "a @ b", "matmul_shape": [8192] * 3, "bandwidth_bytes": 4e12}
    meta = {"device": "NVIDIA H200", "git_commit": "abc", "shapes": [[4, 5, 6]], "floor_rates": {"bf16": rates},
            "complete": True}

    def rec(provider, status, **kw):
        return {"pass": "forward", "dtype": "bfloat16", "n": 4, "k": 5, "d": 6, "provider": provider,
                "status": status, "reason": kw.pop("reason", ""), **kw}
    ok = rec("vqkern-triton", "ok", median_ms=1.0, floor_fraction=0.5)
    peer_wrong = rec("expansion", "wrong", reason="WRONG CODES: 2 of 4 rows")
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"meta": meta, "records": [ok, peer_wrong]}))
    assert tools.bench_summary([str(path)]) == 0
    assert "WRONG expansion forward bfloat16 4x5x6: WRONG CODES: 2 of 4 rows" in capsys.readouterr().out
    path.write_text(json.dumps({"meta": meta, "records": [ok, rec("vqkern-cuda", "wrong", reason="WRONG CODES")]}))
    assert tools.bench_summary([str(path)]) == 1
    assert "WRONG vqkern-cuda forward" in capsys.readouterr().out
