"""Per-core rates of vqkern._cpu's kernel paths against torch.mm, timed in CPU time.

    python -m benchmarks.cpu_rates                       # the sweep's CPU shapes, 1 thread
    python -m benchmarks.cpu_rates --shapes 4096,1024,64 --reps 9

On a shared host the sweep's wall-clock floors move with the other processes (a
load of 19 on 2 cores cut torch.mm to 36 GFLOP/s in one run). Here every call
runs on one thread and is timed with that thread's CPU clock
(``time.thread_time``), interleaved: kernel paths and ``torch.mm`` at the same
(N, K, D) as ``(N, D) @ (D, K)`` in fp32 and in bf16, so each path's fraction of
the matmul rate of its dtype does not depend on how much of the core the OS
gave the process. It still sees what a co-runner does to the shared caches and
clock. The backward kernel is set against the bandwidth of a one-thread fp32
copy timed the same way, for the bytes it must move (3 N D + 2 K D floats and
the indices, the sweep's backward floor). Writes
``benchmarks/results/cpu/<date>-<name>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from . import measure
from .run import CPU_SHAPES, parse_shapes


def _cpu_ms(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        out.append((time.thread_time() - start) * 1e3)
    return out


def _search(ext, z, cb, isa):
    n, d = z.shape
    idx = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n)
    q = torch.empty_like(z)
    fn = ext.search_l2_bf16 if z.dtype == torch.bfloat16 else ext.search_l2
    args = (z.data_ptr(), n, d, cb.data_ptr(), cb.shape[0], d, d, idx.data_ptr(), dist.data_ptr(), q.data_ptr(), d, 1,
            isa)
    return lambda keep=(z, cb, idx, dist, q): fn(*args)


def markdown(common: dict, records: list[dict]) -> str:
    """The Markdown table of a cpu_rates run (its JSON's meta and records)."""
    floor = common["square_mm_gflops_1thread"]
    # Runs before the fastest-way floor timed torch.mm(a, b, out=c) at 2048^3 alone.
    how = {k: common.get("square_mm_1thread", {}).get(k, {"matmul_method": "torch.mm(a, b, out=c)",
                                                           "matmul_shape": [2048] * 3}) for k in floor}
    lines = [f"# vqkern._cpu per-core rates: {common['cpu_model']}", "",
             f"- date {common['date']}, commit `{common['git_commit']}`, torch {common['torch']}, "
             f"load average at start {common['load_average']}, search path in use: {common['cpu_isa']}",
             f"- command: `{common['command'].replace('benchmarks.run', 'benchmarks.cpu_rates')}`",
             f"- {common['timing']}; the fastest square matmul on 1 thread (the floor's rate"
             + (f", {common['floor_source']}" if common.get("floor_source") else "") + "): "
             + ", ".join(f"{k} {v:.0f} GFLOP/s ({how[k]['matmul_method']}"
                         + (f", {how[k]['matmul_shape'][0]}^3)" if how[k]["matmul_shape"] else ")")
                         for k, v in floor.items()),
             "- `% same-shape mm` = torch.mm of (N, D) @ (D, K) in the same dtype / this time (the bare GEMM peer); "
             "`% floor` = GFLOP/s / the square mm rate, or for the backward kernel "
             "(3ND + 2KD floats + 8N bytes) / copy bandwidth / this time", "",
             "| N x K x D | case | median ms | GFLOP/s | % same-shape mm | % floor |", "|---|---|---:|---:|---:|---:|"]
    for r in records:
        rate = f"{r['gflops']:.0f}" if "gflops" in r else "-"
        same = f"{100 * r['fraction_of_mm']:.0f}%" if "fraction_of_mm" in r else "-"
        frac = r.get("fraction_of_floor", r.get("fraction_of_copy"))
        lines.append(f"| {r['n']} x {r['k']} x {r['d']} | {r['case']} | {r['median_ms']:.2f} | {rate} | {same} | "
                     f"{100 * frac:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_rates", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=CPU_SHAPES)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="cpu-rates")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vqkern.backends import torch_

    ext = torch_._load_cpu_ext()[0]
    if ext is None:
        raise SystemExit(f"vqkern._cpu unavailable: {torch_._load_cpu_ext()[1]}")
    paths = [isa for isa in ("avx2", "avx512") if not ext.isa_missing(isa)]
    bf16_paths = [isa for isa in ("avx512bf16", "amx") if not ext.isa_missing(isa)]
    common = measure.provenance(torch.device("cpu"), argv)
    common["timing"] = "time.thread_time per call, 1 thread, interleaved, median"
    # The floor's matmul rate per dtype, as the sweep takes it (the fastest way of a square
    # product, measure.matmul_rate), on one thread and in CPU time.
    floor, how = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = measure.matmul_rate(torch.device("cpu"), dtype, sizes=(1024, 2048), reps=args.reps,
                                   clock=time.thread_time)
        floor[name], how[name] = rate["matmul_flops"] / 1e9, rate  # GFLOP/s
    common["square_mm_gflops_1thread"] = floor
    common["square_mm_1thread"] = how
    print("square matmul, 1 thread: " + ", ".join(
        f"{k} {v:.0f} GFLOP/s ({how[k]['matmul_method']}, {how[k]['matmul_shape'][0]}^3)" for k, v in floor.items()))
    records = []
    for n, k, d in args.shapes:
        g = torch.Generator().manual_seed(n * 31 + k * 7 + d)
        z, cb = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        zb, cbb = z.bfloat16(), cb.bfloat16()
        out32, out16 = torch.empty(n, k), torch.empty(n, k, dtype=torch.bfloat16)
        fns = {f"search-{isa}-fp32": _search(ext, z, cb, isa) for isa in paths}
        fns.update({f"search-{isa}-bf16": _search(ext, zb, cbb, isa) for isa in bf16_paths})
        fns["mm-fp32"] = lambda: torch.mm(z, cb.t(), out=out32)
        fns["mm-bf16"] = lambda: torch.mm(zb, cbb.t(), out=out16)
        gq, gz, sums = torch.randn(n, d, generator=g), torch.empty(n, d), torch.zeros(k, d)
        idx = torch.randint(0, k, (n,), generator=g)
        fns["backward-kernel-fp32"] = lambda: ext.backward_l2(gq.data_ptr(), z.data_ptr(), cb.data_ptr(),
                                                              idx.data_ptr(), n, d, k, 0.1, gz.data_ptr(),
                                                              sums.data_ptr(), True, 1)
        src = torch.randn(3 * n * d + 2 * k * d, generator=g)
        dst = torch.empty_like(src)
        fns["copy-fp32"] = lambda: dst.copy_(src)
        samples = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                samples[name] += _cpu_ms(fn, 1)
        med = {name: statistics.median(s) for name, s in samples.items()}
        flops = 2.0 * n * k * d
        for name, s in samples.items():
            rec = {**common, "n": n, "k": k, "d": d, "case": name, "median_ms": med[name], "samples_ms": s}
            if name.startswith(("search", "mm")):
                dtype = name.rsplit("-", 1)[1]
                rec["gflops"] = flops / med[name] / 1e6
                rec["fraction_of_mm"] = med[f"mm-{dtype}"] / med[name]
                rec["fraction_of_floor"] = rec["gflops"] / floor[dtype]
            else:  # the sweep's backward floor: (3 N D + 2 K D) floats + 8 N bytes at the copy's bandwidth
                bandwidth = 2 * src.numel() * 4 / med["copy-fp32"]  # bytes per ms, read + write
                need = src.numel() * 4 + 8 * n if name.startswith("backward") else 2 * src.numel() * 4
                rec["gbytes_per_s"] = need / med[name] / 1e6
                rec["fraction_of_copy"] = need / bandwidth / med[name]
            records.append(rec)
        print(f"{n}x{k}x{d}: " + ", ".join(
            f"{r['case']} {r['median_ms']:.2f} ms ({100 * r.get('fraction_of_mm', r.get('fraction_of_copy')):.0f}%)"
            for r in records if (r["n"], r["k"], r["d"]) == (n, k, d)))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    folder = Path(args.out) / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{stamp}-{args.name}"
    Path(f"{stem}.json").write_text(json.dumps({"meta": common, "records": records}, indent=1))
    Path(f"{stem}.md").write_text(markdown(common, records))
    print(f"results: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
