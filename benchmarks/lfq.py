"""LFQ training step against vector-quantize-pytorch, codebook sizes 2^10 to 2^18, on CPU.

    python -m benchmarks.lfq [--tokens 16384] [--bits 10 12 14 16 18] [--mem-cap-gib 6] [--out PREFIX]

One step = forward of ``LFQ(codebook_size=2^d, dim=d)`` in training on x (tokens, d),
loss = the auxiliary (entropy) loss + mean(quantized^2), backward. Every case runs in a
fresh subprocess with its address space capped (``--mem-cap-gib``, RLIMIT_AS) and a time
limit, so a library that needs N x 2^d memory fails as "OOM (cap)" instead of taking the
shared machine down; vector-quantize-pytorch and vqkern alternate case by case.
Two inputs: ``confident`` (x ~ N(0, 1): with the default inverse temperature 100 most
bits are certain, the usual state of a trained encoder) and ``uniform`` (x ~ 1e-3 N(0, 1):
every code about equally likely, the most work for vqkern's kernel, which skips the half-table
entries that are exactly 0). Time: median of ``--reps`` steps after a warm-up step; memory:
the peak resident growth of one step (benchmarks.measure.peak_extra_bytes). The floor is
the dense work of the batch sum and its backward (3 x 2 N 2^d flops) at the matmul rate
measured in this run; vqkern's kernel skips zero entries, so on confident rows it can run under it.
Writes PREFIX.json and PREFIX.md (default benchmarks/results/cpu/<date>-lfq) with provenance.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from . import measure

CASE = r'''
import json, resource, sys, time, statistics
cap = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import torch
from benchmarks import measure
lib, bits, tokens, reps, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5]), sys.argv[6]
if lib == "vqkern":
    from vqkern import LFQ
else:
    from vector_quantize_pytorch import LFQ
torch.manual_seed(0)
q = LFQ(codebook_size=2 ** bits, dim=bits).train()
x = torch.randn(1, tokens, bits) * (1.0 if data == "confident" else 1e-3)
def step():
    xx = x.clone().requires_grad_()
    out, _, aux = q(xx)
    (aux + out.square().mean()).backward()
    return float(aux)
out = {}
try:
    out["aux_loss"] = step()
    out["peak_bytes"] = measure.peak_extra_bytes(step, torch.device("cpu"))
    out.update(measure.summarize([measure.time_once_cpu(step) for _ in range(reps)]))
    out["status"] = "ok"
except (RuntimeError, MemoryError) as exc:
    out["status"] = "OOM (cap)" if "memory" in str(exc).lower() or isinstance(exc, MemoryError) else "error"
    out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
print("RESULT " + json.dumps(out))
'''


def run_case(lib: str, bits: int, tokens: int, cap: int, reps: int, data: str, timeout: float) -> dict:
    cmd = [sys.executable, "-c", CASE, lib, str(bits), str(tokens), str(cap), str(reps), data]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"status": f"over time (> {timeout:.0f} s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout)[-400:]
        oom = "memory" in tail.lower() or done.returncode in (-9, 137)
        return {"status": "OOM (cap)" if oom else "error", "error": tail}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--bits", type=int, nargs="+", default=[10, 12, 14, 16, 18])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mem-cap-gib", type=float, default=6.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case (one process)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    date = datetime.date.today().isoformat()
    prefix = Path(args.out or f"benchmarks/results/cpu/{date}-lfq")
    prov = measure.provenance(device, argv=sys.argv[1:])
    prov["command"] = "python -m benchmarks.lfq " + " ".join(sys.argv[1:])
    rates = measure.measure_floor_rates(device, torch.float32)
    cap = int(args.mem_cap_gib * 2**30)
    records = []
    for bits in args.bits:
        for lib, data in (("vector_quantize_pytorch", "confident"), ("vqkern", "confident"), ("vqkern", "uniform")):
            res = run_case(lib, bits, args.tokens, cap, args.reps, data, args.timeout)
            flops = 3 * 2 * args.tokens * 2 ** bits
            rec = {"provider": lib, "codebook_size": 2 ** bits, "bits": bits, "tokens": args.tokens, "data": data,
                   "dtype": "float32", "pass": "train step (forward + backward)",
                   "shape": [args.tokens, bits], "floor_ms": measure.floor_ms(flops, 0, rates),
                   "mem_cap_bytes": cap, "dense_matrix_bytes": args.tokens * 2 ** bits * 4, **res}
            if res.get("status") == "ok":
                rec["floor_fraction"] = rec["floor_ms"] / res["median_ms"]
            records.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("provider", "bits", "data", "status", "median_ms", "peak_bytes",
                                                      "aux_loss")}), flush=True)
    prov["load_average_end"] = list(os.getloadavg())
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps({"provenance": prov, "rates": rates, "records": records}, indent=1))
    Path(f"{prefix}.md").write_text(report(prov, rates, records, args))
    print(f"wrote {prefix}.json and {prefix}.md")


def report(prov: dict, rates: dict, records: list[dict], args) -> str:
    lines = [f"# LFQ training step: vqkern against vector-quantize-pytorch ({prov['date']})", "",
             f"`{prov['command']}` at commit {prov['git_commit']}: {prov['cpu_model']}, {prov['threads']} threads, "
             f"kernel path {prov['cpu_isa']}; torch {prov['torch']}; load average {prov['load_average']} at the "
             f"start, {prov['load_average_end']} at the end (a shared machine: compare the two libraries within a "
             f"row, not across runs). Matmul rate {rates['matmul_flops'] / 1e9:.0f} GFLOP/s.", "",
             f"{args.tokens} tokens, `LFQ(codebook_size=2^d, dim=d)`, default inverse temperature 100; each case "
             f"in its own process capped at {args.mem_cap_gib:g} GiB of address space. Time: median of "
             f"{args.reps} steps; memory: peak resident growth of one step.", "",
             "| codebook | dense N x 2^d fp32 | provider | input | step (median ms) | peak memory (MiB) | "
             "dense floor (ms) | status |", "| ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for r in records:
        ok = r.get("status") == "ok"
        lines.append(f"| 2^{r['bits']} | {r['dense_matrix_bytes'] / 2**20:.0f} MiB | {r['provider']} | {r['data']} | "
                     f"{r['median_ms']:.1f} | {r['peak_bytes'] / 2**20:.0f} | {r['floor_ms']:.1f} | ok |" if ok else
                     f"| 2^{r['bits']} | {r['dense_matrix_bytes'] / 2**20:.0f} MiB | {r['provider']} | {r['data']} | "
                     f"- | - | {r['floor_ms']:.1f} | {r['status']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
