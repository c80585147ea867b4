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
from vqkern.check.env import cpu_kernel_path, cpu_model as cpu_name  # noqa: F401

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


def measure_floor_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """Matmul rate (FLOP/s, large square ``torch.mm`` in ``dtype``) and copy bandwidth
    (bytes/s, read + write of a large device-to-device copy), measured now."""
    if device.type == "cuda":
        size = 8192
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        mm_ms = _median_time(lambda: torch.mm(a, b, out=out), device, reps=5)
        mm_flops = 2 * size**3 / (mm_ms * 1e-3)
    else:
        # The best of two sizes, fastest of 5 calls each: the rate the machine's BLAS can
        # reach. A median at 2048^3 alone read 145 GFLOP/s where 4096^3 reached 175.
        mm_flops, size = 0.0, 0
        for n in (2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            torch.mm(a, b, out=out)
            best = 1e-3 * min(time_once_cpu(lambda: torch.mm(a, b, out=out)) for _ in range(5))
            if 2 * n**3 / best > mm_flops:
                mm_flops, size = 2 * n**3 / best, n
        del a, b, out
    numel = (2**28 if device.type == "cuda" else 2**26)  # 1 GiB / 256 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_time(lambda: dst.copy_(src), device, reps=5)
    return {
        "matmul_flops": mm_flops,
        "matmul_shape": [size, size, size],
        "bandwidth_bytes": 2 * numel * 4 / (copy_ms * 1e-3),
        "copy_bytes": numel * 4,
    }


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
