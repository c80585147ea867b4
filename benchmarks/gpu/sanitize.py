"""Launch every vqkern kernel once, on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \\
        python benchmarks/gpu/sanitize.py --device cuda --backends cuda,triton
    python benchmarks/gpu/sanitize.py --device cpu --backends torch,triton --small   # the dry run

Everything goes through the public API (``vqkern.nearest_code``, ``quantize`` and
its autograd backward, ``segment_sum``, ``VectorQuantizer`` with EMA), with the
backend named and deterministic mode on and off, so that the script reaches the
kernels whatever their launchers' signatures are. The shapes pick the paths:
D off every block size, tensor cores (both inputs fp16 or bf16) and the fp32
path (fp32 or mixed dtypes), D wider than one tensor-core chunk, few rows and
many codes (the split-K path and its reduction), and a collapsed codebook (every
row on one code: the deterministic segment sum's longest segment).

Each case prints ``ok NAME`` or ``FAIL NAME: error``; the script goes on after a
failure and exits 1 if any case failed. The checks are exact (indices in range,
quantized equal to the gathered codes, finite gradients), only there to show
that every output was written: accuracy is the test suite's job.

Under compute-sanitizer run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (session.sh
does): with torch's caching allocator a kernel that overruns a tensor lands in
the allocator's own block, which memcheck cannot tell from a valid access.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: the repo's vqkern first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (z dtype, codebook dtype): fp32 FMA path, both tensor-core dtypes, mixed dtypes.
PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32")]


def shapes(small: bool) -> dict:
    """(N, K, D) per case. ``small``: sizes for the Triton interpreter on CPU."""
    if small:
        return {"search": (70, 90, 13), "wide": (20, 30, 150), "split": (8, 600, 9),
                "backward": (90, 40, 13), "collapse": (300, 6, 5), "module": (64, 32, 12)}
    # split: 16 rows are one row block of 132 SMs' worth, so both backends split the
    # 40000 codes (the CUDA rule: 156 splits; the Triton rule: 40000 // 2048 = 19).
    return {"search": (300, 1000, 40), "wide": (100, 300, 300), "split": (16, 40000, 32),
            "backward": (513, 97, 67), "collapse": (5000, 50, 33), "module": (256, 128, 24)}


def _randn(shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def _check_search(z, cb, idx, q=None):
    k = cb.shape[0]
    if idx.dtype != torch.int64 or idx.shape != z.shape[:-1]:
        raise AssertionError(f"indices {idx.dtype} {tuple(idx.shape)}")
    if not bool(((idx >= 0) & (idx < k)).all()):
        raise AssertionError("an index out of [0, K)")
    if q is not None and not torch.equal(q, cb[idx].to(z.dtype)):
        raise AssertionError("quantized != codebook[indices]")


def _finite(name, t):
    if t is None or not bool(torch.isfinite(t).all()):
        raise AssertionError(f"{name} missing or not finite")


@contextlib.contextmanager
def deterministic(on: bool):
    # warn_only: torch's own non-deterministic ops must not stop the run; vqkern reads
    # the flag to choose its deterministic segment sum.
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def cases(backend: str, device: str, small: bool):
    """(name, fn) for every kernel path of one backend."""
    import vqkern

    s = shapes(small)
    gen = torch.Generator().manual_seed(0)

    def search(shape, zt, ct, metric="l2"):
        def run():
            n, k, d = shape
            z, cb = _randn((n, d), DTYPES[zt], device, gen), _randn((k, d), DTYPES[ct], device, gen)
            idx, dist = vqkern.nearest_code(z, cb, metric=metric, backend=backend)
            _check_search(z, cb, idx)
            _finite("distances", dist)
            out = vqkern.quantize(z, cb, metric=metric, backend=backend)
            _check_search(z, cb, out.indices, out.quantized if metric == "l2" else None)
        return run

    def backward(shape, zt, ct, det):
        def run():
            n, k, d = shape
            z = _randn((n, d), DTYPES[zt], device, gen).requires_grad_()
            cb = _randn((k, d), DTYPES[ct], device, gen).requires_grad_()
            g = _randn((n, d), DTYPES[zt], device, gen)
            with deterministic(det):
                out = vqkern.quantize(z, cb, backend=backend)
                torch.autograd.backward([out.quantized, out.loss], [g, torch.ones_like(out.loss)])
            _check_search(z, cb, out.indices, out.quantized)
            _finite("z.grad", z.grad)
            _finite("codebook.grad", cb.grad)
        return run

    def segment(shape, dtype, det, collapse=False):
        def run():
            n, k, d = shape
            values = _randn((n, d), DTYPES[dtype], device, gen)
            idx = (torch.full((n,), k // 2, dtype=torch.int64) if collapse
                   else torch.randint(k, (n,), generator=gen)).to(device)
            counts, sums = vqkern.segment_sum(idx, values, k, backend=backend, deterministic=det)
            want = torch.bincount(idx, minlength=k).to(counts.dtype)
            if not torch.equal(counts, want):
                raise AssertionError("counts != bincount(indices)")
            _finite("sums", sums)
        return run

    def module(shape, det):
        def run():
            n, k, d = shape
            layer = vqkern.VectorQuantizer(k, d, ema=True, dead_code_threshold=1.0, backend=backend).to(device)
            z = _randn((n, d), torch.float32, device, gen).requires_grad_()
            with deterministic(det):
                out = layer(z)
                out.loss.backward()
            _finite("z.grad", z.grad)
            _finite("codebook", layer.codebook)
        return run

    out = [(f"search {zt}/{ct} {s['search']}", search(s["search"], zt, ct)) for zt, ct in PAIRS]
    out += [(f"search wide-D {zt}/{ct} {s['wide']}", search(s["wide"], zt, ct)) for zt, ct in PAIRS[1:3]]
    out.append((f"search cosine bf16 {s['search']}", search(s["search"], "bf16", "bf16", "cosine")))
    split = [(f"split-K {zt}/{ct} {s['split']}", search(s["split"], zt, ct)) for zt, ct in PAIRS]
    if backend == "triton" and device == "cpu":
        # On CPU the Triton backend never chooses to split: force it, so the reduce
        # kernel's launch is exercised in the dry run too.
        split = [(name + " (VQKERN_TRITON_NUM_SPLITS=3)", _with_env(fn, "VQKERN_TRITON_NUM_SPLITS", "3"))
                 for name, fn in split]
    out += split
    for det in (False, True):
        tag = "deterministic" if det else "atomic"
        out += [(f"backward {tag} {zt}/{ct} {s['backward']}", backward(s["backward"], zt, ct, det))
                for zt, ct in (PAIRS[0], PAIRS[2], PAIRS[3])]
        out += [(f"segment_sum {tag} {dt} {s['backward']}", segment(s["backward"], dt, det)) for dt in ("fp32", "bf16")]
        out.append((f"segment_sum {tag} collapsed {s['collapse']}", segment(s["collapse"], "fp32", det, True)))
        out.append((f"VectorQuantizer ema {tag} {s['module']}", module(s["module"], det)))
    return out


def _with_env(fn, name, value):
    def run():
        with env(name, value):
            fn()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu/sanitize.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", default="cuda,triton", help="comma list (default: cuda,triton)")
    p.add_argument("--small", action="store_true", help="interpreter-sized shapes (the CPU dry run)")
    args = p.parse_args(argv)
    if args.device == "cpu" and "triton" in args.backends.split(","):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before vqkern imports triton
    from vqkern import backends

    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize.py: no CUDA device visible to torch", file=sys.stderr)
        return 2
    pin = os.environ.get("VQKERN_TRITON_SEARCH_CONFIG")
    print("search kernel: " + (f"one config, VQKERN_TRITON_SEARCH_CONFIG={pin}" if pin else
                               "autotuned (every config launched and timed on each new shape)"), flush=True)
    failed = ran = unavailable = 0
    for backend in [b for b in args.backends.split(",") if b]:
        ok, why = backends.availability(backend, args.device)
        if not ok:
            print(f"FAIL backend {backend} on {args.device}: unavailable: {why}", flush=True)
            unavailable += 1
            continue
        print(f"== backend {backend} on {args.device}: {why}", flush=True)
        for name, fn in cases(backend, args.device, args.small):
            t0 = time.perf_counter()
            ran += 1
            try:
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()  # a kernel's fault surfaces here, named by the case
                print(f"ok {backend}: {name} ({time.perf_counter() - t0:.2f}s)", flush=True)
            except Exception as exc:  # report every case; a broken context fails the rest, also reported
                failed += 1
                print(f"FAIL {backend}: {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                traceback.print_exc(limit=3)
    print(f"sanitize.py: {ran - failed} of {ran} cases ok, {failed} failed, {unavailable} backends unavailable",
          flush=True)
    return 1 if failed or unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
