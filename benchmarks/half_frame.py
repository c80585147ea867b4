"""Accuracy of the ranking frames for fp16/bf16 inputs on tensor cores or AMX, emulated on CPU.

    python -m benchmarks.half_frame [--offsets 0,10,30,50,100,200,500] [--out PATH]

Those units multiply 16-bit inputs exactly and sum in fp32. Three ways to rank, emulated
with fp32 matmuls of 16-bit values (exact products, fp32 sums; the order of the sums is
MKL's, not the GPU's):

- origin: ``|e|^2 - 2 z.e`` of the inputs as they are (what the 16-bit paths do);
- rounded centring: ``z - c`` and ``e - c`` rounded back to the 16-bit dtype, then the same;
- exact centring: a 16-bit centre ``c``, ``z - c`` exact in fp32 split into 16-bit
  ``hi + lo``, the dot as ``hi.hi + hi.lo + lo.hi`` (three products).

z (N = 2000) and the codebook (K = 1024), D = 128, standard normal plus ``offset``
standard deviations on every coordinate, rounded to the dtype; the exact distances are
those of the rounded values. Reported per (dtype, offset, frame): rows whose chosen code
is farther than the nearest, and the worst excess in units of the spread
(``|z - c|^2 + max|e - c|^2``, c the codebook mean) and of the origin's scale
(``|z|^2 + max|e|^2``). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks import measure

N, K, D = 2000, 1024, 128


def _scores(z16, e16, frame, dtype):
    z, e = z16.float(), e16.float()
    if frame == "origin":
        return (e * e).sum(1)[None, :] - 2 * z @ e.T
    if frame == "rounded centring":
        c = e.mean(0)
        zc, ec = (z - c).to(dtype).float(), (e - c).to(dtype).float()
        return (ec * ec).sum(1)[None, :] - 2 * zc @ ec.T
    c = e.mean(0).to(dtype).float()
    zc, ec = z - c, e - c  # exact: differences of 16-bit values near each other

    def split(x):
        hi = x.to(dtype).float()
        return hi, (x - hi).to(dtype).float()
    (zh, zl), (eh, el) = split(zc), split(ec)
    dot = zh @ eh.T + zh @ el.T + zl @ eh.T
    return (ec * ec).sum(1)[None, :] - 2 * dot


def run(offsets) -> list[dict]:
    records = []
    for dtype in (torch.bfloat16, torch.float16):
        for offset in offsets:
            g = torch.Generator().manual_seed(0)
            e16 = (torch.randn(K, D, generator=g) + offset).to(dtype)
            z16 = (torch.randn(N, D, generator=g) + offset).to(dtype)
            z64, e64 = z16.double(), e16.double()
            exact = torch.cdist(z64, e64) ** 2
            best = exact.min(1).values
            c = e64.mean(0)
            spread = ((z64 - c) ** 2).sum(1) + ((e64 - c) ** 2).sum(1).max()
            origin = (z64 ** 2).sum(1) + (e64 ** 2).sum(1).max()
            for frame in ("origin", "rounded centring", "exact centring"):
                idx = _scores(z16, e16, frame, dtype).argmin(1)
                excess = exact.gather(1, idx[:, None])[:, 0] - best
                records.append(dict(dtype=str(dtype).replace("torch.", ""), offset=offset, frame=frame,
                                    wrong_rows=int((excess > 0).sum()),
                                    worst_over_spread=(excess / spread).max().item(),
                                    worst_over_origin_scale=(excess / origin).max().item()))
                r = records[-1]
                print(f"{r['dtype']} offset {offset:5g} {frame:17s} wrong {r['wrong_rows']:4d} "
                      f"worst/spread {r['worst_over_spread']:.2e}", flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", default="0,10,30,50,100,200,500")
    parser.add_argument("--out", default="benchmarks/results/cpu/2026-12-03-half-frame")
    args = parser.parse_args(argv)
    records = run([float(x) for x in args.offsets.split(",")])
    meta = measure.provenance(torch.device("cpu"))
    meta["command"] = "python -m benchmarks.half_frame " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "shape": [N, K, D], "records": records}, f, indent=1)
    lines = ["# Ranking frames for fp16/bf16 inputs multiplied exactly (emulated on CPU)", "",
             f"`{meta['command']}`, commit {meta['git_commit']}, {meta['date']}, {meta['cpu_model']}, "
             f"torch {meta['torch']}. N x K x D = {N} x {K} x {D}; see the module docstring of "
             "`benchmarks/half_frame.py` for the emulation. Worst excess of the chosen code over the "
             "nearest, in units of the spread |z - c|^2 + max|e - c|^2; rows with a farther code.", "",
             "| dtype | offset (std) | origin: rows, worst | rounded centring: rows, worst | "
             "exact centring (3 products): rows, worst |", "|---|---:|---|---|---|"]
    for i in range(0, len(records), 3):
        o, r, x = records[i:i + 3]
        lines.append(f"| {o['dtype']} | {o['offset']:g} | " + " | ".join(
            f"{t['wrong_rows']}, {t['worst_over_spread']:.1e}" for t in (o, r, x)) + " |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
