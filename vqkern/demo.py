"""`python -m vqkern.demo`: quantize one batch with every backend that can run here.

Prints, per backend, whether it agrees with the reference (tie-aware: the
chosen code's exact distance equals the true minimum within 1e-5 of
|z|^2 + |e|^2), the median time, and the peak memory the call added.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from . import backends, functional


def _peak_tracker(device: torch.device):
    """(reset, read) for the peak memory of the calls in between, in bytes."""
    if device.type == "cuda":
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def read(base):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return reset, read

    def vm_hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    def vm_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def reset():
        # Writing 5 to clear_refs resets the resident-set high-water mark (Linux).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm_rss()

    def read(base):
        return vm_hwm() - base
    return reset, read


def _time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(backends.BACKENDS),
                        help="comma-separated backends to run (default: all); e.g. torch,reference "
                             "checks the CPU backends without Triton's interpreter")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(backends.BACKENDS))
    if unknown or not selected:
        parser.error(f"--backends takes names from {', '.join(backends.BACKENDS)}, got {args.backends!r}")
    device = torch.device(args.device)
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    z = torch.randn(args.n, args.d, device=device)
    codebook = torch.randn(args.k, args.d, device=device)
    z64, e64 = z.double(), codebook.double()
    norms = (z64 * z64).sum(1) + (e64 * e64).sum(1).max()
    n_by_k_mb = args.n * args.k * 4 / 2**20

    print(f"vqkern demo: N={args.n} K={args.k} D={args.d} fp32 on {device} "
          f"(an N x K fp32 distance matrix would be {n_by_k_mb:.0f} MB)")
    print(f"{'backend':<10} {'agrees':<8} {'median ms':>10} {'peak MB':>9}  note")
    reset, read = _peak_tracker(device)
    failures = 0
    for name, (ok, reason) in backends.report(device).items():
        if name not in selected:
            print(f"{name:<10} {'-':<8} {'-':>10} {'-':>9}  not run: not in --backends ({reason})")
            continue
        if not ok:
            print(f"{name:<10} {'-':<8} {'-':>10} {'-':>9}  skipped: {reason}")
            continue
        base = reset()
        idx, dist = functional.nearest_code(z, codebook, backend=name)
        peak = read(base) / 2**20
        # The chosen code's exact distance against the true minimum, row by row in chunks.
        worst = 0.0
        for s in range(0, args.n, 1024):
            exact = torch.cdist(z64[s:s + 1024], e64).square()
            chosen = exact.gather(1, idx[s:s + 1024].view(-1, 1)).squeeze(1)
            worst = max(worst, ((chosen - exact.min(1).values) / norms[s:s + 1024]).max().item())
        agrees = worst <= 1e-5
        failures += not agrees
        # The reference materializes (rows, K, D) in fp64: one timed run is enough to make the point.
        slow = name == "reference" or (name == "triton" and interpreted)
        repeats = 1 if slow else args.repeats
        ms = 1e3 * _time(lambda: functional.nearest_code(z, codebook, backend=name), device, repeats)
        note = "; Triton interpreter on CPU: checks answers, not speed" if name == "triton" and interpreted else ""
        print(f"{name:<10} {'yes' if agrees else 'NO':<8} {ms:>10.2f} {peak:>9.1f}  "
              f"worst relative excess distance {worst:.1e}{note}")
    return 1 if failures else 0


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") is None:
        # No GPU: the Triton kernels still run, in Triton's interpreter, so their answers
        # are checked here too (their time there says nothing about GPU speed). The
        # variable must be set before triton is imported, which importing torch and
        # vqkern has done by now: start again with it set.
        os.execve(sys.executable, [sys.executable, "-m", "vqkern.demo", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    raise SystemExit(main())
