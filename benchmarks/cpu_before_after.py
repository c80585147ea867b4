"""Two builds of vqkern._cpu timed against each other, interleaved call by call.

    python -m benchmarks.cpu_before_after --before <path of the other build's _cpu*.so>
        --before-label <its commit> [--passes forward,backward] [--shapes "N,K,D;..."]
        [--dtypes fp32,bf16] [--reps 7] --out benchmarks/results/cpu/<date>-<what>

"after" is the vqkern._cpu this checkout imports. For each (pass, shape, dtype) both
builds get a warm-up call, then ``reps`` rounds of one timed call each, in the order
before, after (alternating which goes first from round to round), so that the load of a
shared machine falls on both alike; the result is the median, min and max per build and
the ratio of the medians. The kernels are called through their data pointers, as the
torch backend calls them:

- forward: ``search_l2`` (indices, distances and quantized rows, fp32), on ``threads``
  threads. bf16 inputs go through the bf16 entry on machines with AVX512-BF16 or AMX;
  elsewhere they are widened to fp32 first, as the torch backend does, and the widening
  is timed with the search.
- backward: ``backward_l2`` / ``backward_l2_bf16`` (grad_z and the per-code residual
  sums, the sums zero-filled inside the timed call, as the op does), indices drawn at
  random (N / K rows per code on average).

On a shared VM the threads of a parallel region may wait for the scheduler's tick to
wake (times then come in steps of 4 ms): ``--threads 1`` times the kernels' own work.

Writes <out>.json (every sample, the floor rates measured in the run, the provenance)
and <out>.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

from benchmarks import measure
from vqkern.backends import torch_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_build(path: str):
    """The vqkern._cpu module at ``path`` (a second copy beside the one vqkern imports)."""
    spec = importlib.util.spec_from_file_location("_vqkern_before._cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forward(ext, z, cb, threads):
    n, d = z.shape
    bf16_entry = z.dtype == torch.bfloat16 and not torch_.cpu_isa_missing("avx512bf16")
    idx = torch.empty(n, dtype=torch.int64)
    dist = torch.empty(n)
    quantized = torch.empty(n, d, dtype=z.dtype if bf16_entry else torch.float32)

    def call():
        zs, cs = (z, cb) if bf16_entry or z.dtype == torch.float32 else (z.float(), cb.float())
        search = ext.search_l2_bf16 if bf16_entry else ext.search_l2
        search(zs.data_ptr(), n, zs.stride(0), cs.data_ptr(), cs.shape[0], cs.stride(0), d, idx.data_ptr(),
               dist.data_ptr(), quantized.data_ptr(), quantized.stride(0), threads, "auto")
    return call, idx


def _backward(ext, z, cb, idx, threads):
    n, d = z.shape
    gq = torch.randn(n, d).to(z.dtype)
    grad_z = torch.empty_like(z)
    sums = torch.empty(cb.shape[0], d)
    entry = ext.backward_l2 if z.dtype == torch.float32 else ext.backward_l2_bf16

    def call():
        sums.zero_()
        entry(gq.data_ptr(), z.data_ptr(), cb.data_ptr(), idx.data_ptr(), n, d, cb.shape[0], 0.5,
              grad_z.data_ptr(), sums.data_ptr(), False, threads)
    return call, sums


def _bytes(pass_, n, k, d, dtype):
    e = torch.finfo(dtype).bits // 8
    if pass_ == "forward":  # z and the codebook read, the code rows written, indices and distances
        return (n * d + k * d + n * d) * e + n * 12
    return 3 * n * d * e + n * d * e + k * d * 4 * 2 + n * 8  # gq, z, grad_z, e rows; sums zeroed + written


def run(args) -> dict:
    before, after = load_build(args.before), torch_._load_cpu_ext()[0]
    if after is None:
        raise SystemExit(f"vqkern._cpu is not available: {torch_._load_cpu_ext()[1]}")
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    bf16_native = not torch_.cpu_isa_missing("avx512bf16")
    records, rates = [], {}
    for pass_ in args.passes.split(","):
        for shape in args.shapes.split(";"):
            n, k, d = (int(x) for x in shape.split(","))
            for name in args.dtypes.split(","):
                dtype = DTYPES[name]
                # Where bf16 is widened to fp32 (no AVX512-BF16), the work is fp32's: so is the
                # floor (torch.mm in bf16 runs at a few GFLOP/s without native bf16 there).
                rate_dtype = dtype if bf16_native or dtype == torch.float32 else torch.float32
                rate_key = str(rate_dtype).replace("torch.", "")
                if rate_key not in rates:
                    rates[rate_key] = measure.measure_floor_rates(device, rate_dtype)
                g = torch.Generator().manual_seed(0)
                z = torch.randn(n, d, generator=g).to(dtype)
                cb = torch.randn(k, d, generator=g).to(dtype)
                idx = torch.randint(0, k, (n,), generator=g)
                calls, outs = {}, {}
                for label, ext in (("before", before), ("after", after)):
                    calls[label], outs[label] = (_forward(ext, z, cb, threads) if pass_ == "forward"
                                                 else _backward(ext, z, cb, idx, threads))
                    calls[label]()  # warm-up (and the packed-codebook buffer)
                samples = {"before": [], "after": []}
                for rep in range(args.reps):
                    for label in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                        samples[label].append(measure.time_once_cpu(calls[label]))
                flops = 2 * n * k * d if pass_ == "forward" else 0
                floor = measure.floor_ms(flops, _bytes(pass_, n, k, d, dtype), rates[rate_key])
                for label in ("before", "after"):
                    stats = measure.summarize(samples[label])
                    records.append(dict(pass_=pass_, shape=[n, k, d], dtype=name, provider=label,
                                        build=args.before_label if label == "before" else "this checkout",
                                        floor_ms=floor, floor_fraction=floor / stats["median_ms"], **stats))
                ratio = (measure.summarize(samples["after"])["median_ms"]
                         / measure.summarize(samples["before"])["median_ms"])
                records[-1]["after_over_before"] = ratio
                print(f"{pass_:8s} {n}x{k}x{d} {name}: before {records[-2]['median_ms']:.2f} ms, "
                      f"after {records[-1]['median_ms']:.2f} ms, after/before {ratio:.3f}", flush=True)
    meta = measure.provenance(device, ["-m", "benchmarks.cpu_before_after"] + (args.argv or []))
    meta["command"] = "python -m benchmarks.cpu_before_after " + " ".join(args.argv or [])
    meta["before_build"] = {"path": args.before, "label": args.before_label}
    return {"meta": meta, "floor_rates": rates, "records": records}


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    meta = result["meta"]
    lines = [f"# vqkern._cpu before ({meta['before_build']['label']}) and after ({meta['git_commit']})", "",
             f"`{meta['command']}`; {meta['device']}, kernel path: {meta['cpu_isa']}; torch {meta['torch']}; "
             f"{meta['date']}; load average at the end {', '.join(f'{x:.2f}' for x in meta['load_average'])}. "
             "Calls interleaved (before, after, alternating), median of the samples; floor = "
             "max(2NKD / matmul rate, bytes / copy bandwidth), rates measured in this run: "
             + "; ".join(f"{k}: {v['matmul_flops'] / 1e9:.0f} GFLOP/s, {v['bandwidth_bytes'] / 1e9:.1f} GB/s"
                         for k, v in result["floor_rates"].items()) + ".", "",
             "| pass | N x K x D | dtype | before ms (min-max) | after ms (min-max) | after / before | "
             "after, % of floor |", "|---|---|---|---:|---:|---:|---:|"]
    recs = result["records"]
    for b, a in zip(recs[0::2], recs[1::2]):
        lines.append(f"| {a['pass_']} | {' x '.join(map(str, a['shape']))} | {a['dtype']} | "
                     f"{b['median_ms']:.2f} ({b['min_ms']:.2f}-{b['max_ms']:.2f}) | "
                     f"{a['median_ms']:.2f} ({a['min_ms']:.2f}-{a['max_ms']:.2f}) | {a['after_over_before']:.3f} | "
                     f"{100 * a['floor_fraction']:.0f}% |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="path of the other build's vqkern._cpu shared object")
    parser.add_argument("--before-label", required=True, help="what that build is (its commit)")
    parser.add_argument("--passes", default="forward,backward")
    parser.add_argument("--shapes", default="16384,16384,256;65536,1024,16")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: as is)")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    write(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
