"""Timing, peak memory, hardware floor and provenance for the benchmark suite.

Timing: CPU with the wall clock (``time.perf_counter``) around a synchronous
call; CUDA with device events through ``triton.testing.do_bench`` (it also
flushes L2 between calls), never host clocks around asynchronous launches.

Peak extra memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated before the call (torch's caching allocator only:
  FAISS-GPU's own allocations are not seen).
- CPU: torch's CPU allocator keeps no statistics and ``tracemalloc`` does not
  see it (nor FAISS), so the process resident set is used: free memory is
  returned to the OS (``gc.collect`` + glibc ``malloc_trim(0)``), the kernel's
  peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), the call runs,
  and the result is ``VmHWM - VmRSS(before)``. It counts every byte the call
  touched and did not hold before, whoever allocated it, at page granularity.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# The CPU's model and the CPU kernel path, as `python -m vqkern.check` records them.
from vqkern.check.env import cpu_kernel_path
from vqkern.check.env import cpu_model as cpu_name

CPU_MEM_METHOD = "rss-hwm-delta (clear_refs=5, malloc_trim, VmHWM - VmRSS before)"
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated delta"

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: RSS deltas may then under-count reused heap pages
    _LIBC = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_supported() -> tuple[bool, str]:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True, CPU_MEM_METHOD
    except OSError as exc:
        return False, f"cannot reset peak RSS: {exc}"


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Bytes allocated by one call of ``fn`` beyond what was held before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not cpu_memory_supported()[0]:
        return None
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def time_once_cpu(fn) -> float:
    """Wall-clock milliseconds of one synchronous call."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_cuda(fn, rep_ms: int = 100) -> list[float]:
    """All per-call times (ms) from triton's do_bench (device events, L2 flushed)."""
    from triton.testing import do_bench

    return list(do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))


def summarize(samples: list[float]) -> dict:
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "samples_ms": [round(s, 4) for s in samples],
    }


def _median_time(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return statistics.median(time_cuda(fn))
    fn()
    return statistics.median(time_once_cpu(fn) for _ in range(reps))


def _matmul_methods(device: torch.device, dtype: torch.dtype) -> dict:
    """The ways of multiplying two matrices the floor tries; the fastest sets the rate.

    ``torch.mm(a, b, out=c)`` reached about 1,000 GFLOP/s in bf16 on a Xeon with AMX
    where ``a @ b`` reached about 1,800 (4096^3, 2 threads, side by side), so a floor
    taken from one way alone can sit far under what the machine does: the committed
    "197% of the floor" was such an artefact."""
    methods = {"a @ b": lambda a, b, out: a @ b,
               "torch.mm(a, b, out=c)": lambda a, b, out: torch.mm(a, b, out=out)}
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # A CPU without bf16 instructions multiplies bf16 at 0.3-0.4 GFLOP/s in torch
        # (AMD EPYC, AVX2 only, 2026-12-03) against ~100 in fp32: there the fastest
        # bf16 product is the fp32 one on widened copies (the widening included).
        methods["a.float() @ b.float()"] = lambda a, b, out: a.float() @ b.float()
    return methods


# Square sizes the matmul floor tries, smallest first. Every way is first timed at PROBE_SIZE;
# a way 10x slower there than the fastest, whose call at the smallest size would take longer
# than MAX_CALL_S, is not timed further (bf16 on a CPU without bf16 instructions: 500x slower,
# one 4096^3 call would take minutes; on a loaded host a small probe alone can read 10x low).
# The others are timed at the smallest size always, and at each larger one unless a call
# would take longer than MAX_CALL_S at the rate of the size before (a loaded host: the larger
# sizes are skipped, never the floor).
FLOOR_SIZES = {"cpu": (1024, 2048, 4096), "cuda": (4096, 8192, 16384)}
PROBE_SIZE = 256
MAX_CALL_S = {"cpu": 2.0, "cuda": 1.0}


def _time_matmul(fn, n, device, dtype, reps, clock) -> float:
    """Seconds of one n^3 product: do_bench's median on CUDA, the fastest of ``reps`` calls after
    a warm-up on CPU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        return statistics.median(time_cuda(lambda: fn(a, b, out))) * 1e-3
    fn(a, b, out)
    seconds = []
    for _ in range(reps):
        start = clock()
        fn(a, b, out)
        seconds.append(clock() - start)
    return max(min(seconds), 1e-9)


def matmul_rate(device: torch.device, dtype: torch.dtype, sizes=None, reps: int = 5,
                clock=time.perf_counter) -> dict:
    """The fastest matmul rate (FLOP/s) the machine reaches in ``dtype``: every way of
    ``_matmul_methods`` at the square sizes ``sizes``, random inputs. CPU: the fastest of
    ``reps`` calls after a warm-up, timed with ``clock`` (``time.thread_time`` for one
    thread's CPU time); CUDA: do_bench's median. Returns matmul_flops, matmul_method,
    matmul_shape and every try (matmul_tries, with the probe's and the reason a size was
    not timed)."""
    sizes = sorted(sizes or FLOOR_SIZES[device.type])
    methods = _matmul_methods(device, dtype)
    probe_n = min(PROBE_SIZE, sizes[0])
    probe = {name: 2.0 * probe_n**3 / _time_matmul(fn, probe_n, device, dtype, reps, clock)
             for name, fn in methods.items()}
    fastest_probe = max(probe.values())
    tries = []
    for name, fn in methods.items():
        rate, prev = probe[name], probe_n
        if probe_n not in sizes:
            tries.append({"method": name, "shape": [probe_n] * 3, "flops_per_s": None,
                          "probe_flops_per_s": rate, "note": "the probe (too small to count as the floor)"})
        for n in sizes:
            flops = 2.0 * n**3
            if rate * 10 < fastest_probe and flops / rate > MAX_CALL_S[device.type]:
                note = (f"not timed: {fastest_probe / rate:.0f}x slower than the fastest way at {probe_n}^3 "
                        f"({flops / rate:.0f} s a call)")
            elif n != sizes[0] and flops / rate > MAX_CALL_S[device.type]:
                note = f"not timed: {flops / rate:.1f} s a call at the rate reached at {prev}^3"
            else:
                note = None
            if note:
                tries.append({"method": name, "shape": [n] * 3, "flops_per_s": None, "note": note})
                continue
            if n != probe_n:
                rate, prev = flops / _time_matmul(fn, n, device, dtype, reps, clock), n
            tries.append({"method": name, "shape": [n] * 3, "flops_per_s": rate})
    best = max((t for t in tries if t["flops_per_s"] is not None), key=lambda t: t["flops_per_s"])
    return {"matmul_flops": best["flops_per_s"], "matmul_method": best["method"], "matmul_shape": best["shape"],
            "matmul_tries": tries}


def measure_floor_rates(device: torch.device, dtype: torch.dtype, sizes=None) -> dict:
    """Matmul rate (FLOP/s, the fastest of ``matmul_rate``'s tries in ``dtype``) and copy
    bandwidth (bytes/s, read + write of a large device-to-device copy), measured now."""
    rates = matmul_rate(device, dtype, sizes)
    numel = (2**28 if device.type == "cuda" else 2**26)  # 1 GiB / 256 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        copy_ms = _median_time(lambda: dst.copy_(src), device, reps=5)
    else:
        # The fastest of the calls, as for the matmul: the rate the machine reaches.
        dst.copy_(src)
        copy_ms = min(time_once_cpu(lambda: dst.copy_(src)) for _ in range(5))
    return {**rates, "bandwidth_bytes": 2 * numel * 4 / (copy_ms * 1e-3), "copy_bytes": numel * 4}


def floor_ms(flops: float, nbytes: float, rates: dict) -> float:
    """max(flops / matmul_rate, bytes / bandwidth) in milliseconds."""
    return 1e3 * max(flops / rates["matmul_flops"], nbytes / rates["bandwidth_bytes"])


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name under benchmarks/results/: 'cpu' or the GPU's name, lower-case."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def provenance(device: torch.device, argv: list[str] | None = None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # the suite still runs without triton on CPU
        triton_version = f"unavailable ({type(exc).__name__})"
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run"] + list(sys.argv[1:] if argv is None else argv)),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Compare CPU figures only within one machine and one kernel path.
        "cpu_model": cpu_name(),
        "cpu_isa": cpu_kernel_path() if device.type == "cpu" else None,
    }
