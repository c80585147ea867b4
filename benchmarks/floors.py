"""The machine's floors, measured every way; committed tables recomputed against true floors.

    python -m benchmarks.floors measure --name amd-epyc-floors
    python -m benchmarks.floors recompute FILE.json... [--extra KIND:DTYPE:GFLOPS:SOURCE]

``measure`` times every way of ``measure.matmul_rate`` (``a @ b``, ``torch.mm(a, b,
out=c)`` and, for bf16 on CPU, the widened fp32 product) at several square sizes, on
all threads with the wall clock (the sweep's floor) and on one thread in CPU time
(``cpu_rates``' floor), ROUNDS times interleaved (the machine's load moves between
rounds), and the copy bandwidth; every try is kept. The floor is the fastest.

``recompute`` takes result files of ONE machine and rewrites their "% of floor" from
their own timings against the fastest rates that any of them recorded (per dtype; the
copy bandwidth likewise), plus the rates given with ``--extra``: sweeps
(``benchmarks.run``: ``floor_ms``, ``floor_fraction``) with KIND ``sweep``, per-core
tables (``benchmarks.cpu_rates``: ``fraction_of_floor``) with KIND ``1thread``. What
each run measured itself stays in the file (``floor_rates_in_run``, ``*_in_run``),
and ``meta.floor_correction`` says which rates replaced it, from where, and why.
Running it again gives the same result (the maxima are taken over the in-run values).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import cpu_rates, measure, report

ROUNDS = 3
WHY = ("the run's floor timed one way of multiplying (torch.mm(a, b, out=c)) at the load of that moment; "
       "a floor is the fastest rate the machine reaches: here the fastest that any run on this machine "
       "recorded, per dtype (matmul) and for the copy")


def _merge_tries(rounds: list[dict]) -> dict:
    """The fastest of each (method, size) over the rounds, and the best of them."""
    best: dict = {}
    for rate in rounds:
        for t in rate["matmul_tries"]:
            key = (t["method"], t["shape"][0])
            if t["flops_per_s"] is not None and (key not in best or best[key]["flops_per_s"] is None
                                                 or t["flops_per_s"] > best[key]["flops_per_s"]):
                best[key] = dict(t)
            best.setdefault(key, dict(t))
    tries = sorted(best.values(), key=lambda t: (t["method"], t["shape"][0]))
    top = max((t for t in tries if t["flops_per_s"] is not None), key=lambda t: t["flops_per_s"])
    return {"matmul_flops": top["flops_per_s"], "matmul_method": top["method"], "matmul_shape": top["shape"],
            "matmul_tries": tries, "rounds": len(rounds)}


def measure_machine(argv) -> dict:
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    out = {"meta": {**measure.provenance(cpu, None), "command": "python -m benchmarks.floors " + shlex.join(argv),
                    "cpu_flags": _cpu_flags(), "rounds": ROUNDS}, "floors": {}}
    for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for label, n_threads, clock, sizes in ((f"{threads} threads, wall clock", threads, time.perf_counter, None),
                                               ("1 thread, CPU time", 1, time.thread_time, (1024, 2048))):
            torch.set_num_threads(n_threads)
            rounds = [measure.matmul_rate(cpu, dtype, sizes, clock=clock) for _ in range(ROUNDS)]
            out["floors"][f"{dt}, {label}"] = _merge_tries(rounds)
            print(f"{dt}, {label}: " + ", ".join(
                f"{t['method']} {t['shape'][0]}^3 " + ("-" if t["flops_per_s"] is None else
                                                       f"{t['flops_per_s'] / 1e9:.1f}")
                for t in out["floors"][f"{dt}, {label}"]["matmul_tries"]), flush=True)
    torch.set_num_threads(threads)
    copy = max(measure.measure_floor_rates(cpu, torch.float32, sizes=(256,))["bandwidth_bytes"]
               for _ in range(ROUNDS))
    out["floors"]["copy"] = {"bandwidth_bytes": copy, "threads": threads}
    out["meta"]["load_average_end"] = list(os.getloadavg())
    return out


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
        return " ".join(x for x in flags if x.startswith(("avx", "amx", "fma", "sse4")))
    except (OSError, StopIteration):
        return "unknown"


def floors_markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# Matmul and copy floors: {m['cpu_model']}", "",
             f"- date {m['date']}, commit `{m['git_commit']}`, torch {m['torch']}, load average "
             f"{m['load_average']} at start, {m['load_average_end']} at the end; {m['rounds']} rounds, interleaved",
             f"- command: `{m['command']}`", f"- CPU flags: {m['cpu_flags']}",
             "- each cell: the fastest call of any round (GFLOP/s); the floor of a row group is its bold cell", "",
             "| dtype, threads | way | size | GFLOP/s |", "|---|---|---:|---:|"]
    for key, f in data["floors"].items():
        if key == "copy":
            continue
        for t in f["matmul_tries"]:
            top = t["flops_per_s"] == f["matmul_flops"]
            if t["flops_per_s"] is not None:
                rate = f"**{t['flops_per_s'] / 1e9:.1f}**" if top else f"{t['flops_per_s'] / 1e9:.1f}"
            elif t.get("probe_flops_per_s") is not None:
                rate = f"{t['probe_flops_per_s'] / 1e9:.1f} (the probe: too small to count)"
            else:
                rate = t.get("note", "not timed")
            lines.append(f"| {key} | {t['method']} | {t['shape'][0]}^3 | {rate} |")
    lines += ["", f"Copy (read + write, {data['floors']['copy']['threads']} threads, fastest of "
              f"{m['rounds']} x 5): {data['floors']['copy']['bandwidth_bytes'] / 1e9:.1f} GB/s", ""]
    return "\n".join(lines)


# ---- recompute ------------------------------------------------------------------------------

def _model(meta: dict) -> str:
    # Early runs recorded the CPU only in the device name, "<model> (<n> threads)".
    return meta.get("cpu_model") or meta["device"].rsplit(" (", 1)[0]


def _in_run(meta: dict) -> dict:
    return meta.get("floor_rates_in_run", meta.get("floor_rates", {}))


def _best(files: dict, extra: list[str]) -> dict:
    """{(kind, dtype or 'copy'): {value, source, method, shape}}: the fastest rate any file
    (or --extra) recorded."""
    best: dict = {}

    def offer(key, value, source, method=None, size=None):
        if value and (key not in best or value > best[key]["value"]):
            best[key] = {"value": value, "source": source, "method": method, "shape": [size] * 3 if size else None}
    for name, data in files.items():
        meta = data["meta"]
        for dt, r in _in_run(meta).items():
            method = r.get("matmul_method", "torch.mm(a, b, out=c)")  # the only way before 2026-12-03
            offer(("sweep", dt), r["matmul_flops"], f"{name} ({method}, {r['matmul_shape'][0]}^3)", method,
                  r["matmul_shape"][0])
            offer(("sweep", "copy"), r["bandwidth_bytes"], f"{name} (the {dt} rates' copy)")
        square = meta.get("square_mm_gflops_1thread_in_run", meta.get("square_mm_gflops_1thread", {}))
        for dt, gflops in square.items():
            offer(("1thread", dt), gflops * 1e9, f"{name} (torch.mm(a, b, out=c), 2048^3, 1 thread, CPU time)",
                  "torch.mm(a, b, out=c)", 2048)
    for item in extra:
        kind, dt, gflops, source = item.split(":", 3)
        offer((kind, dt), float(gflops) * 1e9, source)
    return best


def _recompute_sweep(data: dict, best: dict, note: dict) -> None:
    meta = data["meta"]
    meta.setdefault("floor_rates_in_run", meta["floor_rates"])
    copy = best[("sweep", "copy")]
    corrected = {}
    for dt, r in meta["floor_rates_in_run"].items():
        mm = best[("sweep", dt)]
        corrected[dt] = {"matmul_flops": mm["value"], "matmul_method": mm["method"] or "see source",
                         "matmul_shape": mm["shape"] or r["matmul_shape"], "bandwidth_bytes": copy["value"],
                         "copy_bytes": r.get("copy_bytes"),
                         "source": f"the fastest recorded on this machine: matmul {mm['source']}, "
                                   f"copy {copy['source']}"}
    meta["floor_rates"] = corrected
    for rec in data["records"]:
        if rec.get("floor_ms") is None or "flops" not in rec:
            continue
        for key in ("floor_ms", "floor_fraction", "matmul_flops", "bandwidth_bytes"):
            if key in rec:
                rec.setdefault(f"{key}_in_run", rec[key])
        rates = corrected[{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[rec["dtype"]]]
        rec["matmul_flops"], rec["bandwidth_bytes"] = rates["matmul_flops"], rates["bandwidth_bytes"]
        rec["floor_ms"] = measure.floor_ms(rec["flops"], rec["bytes"], rates)
        if rec.get("median_ms"):
            rec["floor_fraction"] = rec["floor_ms"] / rec["median_ms"]
    meta["floor_correction"] = note


def _recompute_1thread(data: dict, best: dict, note: dict) -> None:
    meta = data["meta"]
    meta.setdefault("square_mm_gflops_1thread_in_run", meta["square_mm_gflops_1thread"])
    meta["square_mm_gflops_1thread"] = {dt: best[("1thread", dt)]["value"] / 1e9
                                        for dt in meta["square_mm_gflops_1thread_in_run"]}
    meta["floor_source"] = "the fastest recorded on this machine: " + "; ".join(
        f"{dt} {best[('1thread', dt)]['source']}" for dt in meta["square_mm_gflops_1thread"])
    meta["square_mm_1thread"] = {dt: {"matmul_method": best[("1thread", dt)]["method"] or "as its source records it",
                                      "matmul_shape": best[("1thread", dt)]["shape"]}
                                 for dt in meta["square_mm_gflops_1thread"]}
    for rec in data["records"]:
        if "fraction_of_floor" in rec:
            rec.setdefault("fraction_of_floor_in_run", rec["fraction_of_floor"])
            dt = rec["case"].rsplit("-", 1)[1]
            rec["fraction_of_floor"] = rec["gflops"] / meta["square_mm_gflops_1thread"][dt]
    meta["floor_correction"] = note


def recompute(paths: list[str], extra: list[str], argv) -> int:
    base = os.path.commonpath([str(Path(p).resolve().parent) for p in paths])
    files = {os.path.relpath(Path(p).resolve(), base): json.loads(Path(p).read_text()) for p in paths}
    models = {n: _model(d["meta"]) for n, d in files.items()}
    if len(set(models.values())) != 1:
        raise SystemExit(f"recompute takes the files of one machine: {models}")
    best = _best(files, extra)
    note = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.floors " + shlex.join(argv),
            "why": WHY, "rates": {f"{k[0]} {k[1]}": v for k, v in sorted(best.items())}}
    for path, data in zip(paths, files.values()):
        stem = Path(path).with_suffix("")
        if "square_mm_gflops_1thread" in data["meta"]:
            _recompute_1thread(data, best, note)
            Path(f"{stem}.md").write_text(cpu_rates.markdown(data["meta"], data["records"]))
        else:
            _recompute_sweep(data, best, note)
            Path(f"{stem}.md").write_text(report.markdown(data["meta"], data["records"]))
            if Path(f"{stem}-summary.md").exists():
                Path(f"{stem}-summary.md").write_text(report.summary(data["meta"], data["records"]))
            if Path(f"{stem}-floor.png").exists():
                report.plots(data["records"], str(stem))
        Path(path).write_text(json.dumps(data, indent=1))
        print(f"{path}: recomputed")
    for key, b in sorted(best.items()):
        unit = "B" if key[1] == "copy" else "FLOP"
        print(f"  {key[0]} {key[1]}: {b['value'] / 1e9:.1f} G{unit}/s from {b['source']}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--name", default="floors")
    m.add_argument("--out", default=str(Path(__file__).parent / "results"))
    r = sub.add_parser("recompute")
    r.add_argument("files", nargs="+")
    r.add_argument("--extra", action="append", default=[],
                   help="KIND:DTYPE:GFLOPS:SOURCE, a rate recorded elsewhere (KIND sweep or 1thread)")
    args = p.parse_args(argv)
    if args.cmd == "recompute":
        return recompute(args.files, args.extra, argv)
    data = measure_machine(argv)
    folder = Path(args.out) / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{data['meta']['date'][:10]}-{args.name}"
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1))
    Path(f"{stem}.md").write_text(floors_markdown(data))
    print(floors_markdown(data))
    print(f"results: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
