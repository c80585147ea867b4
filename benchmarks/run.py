"""Sweep providers x shapes x dtypes x passes; write JSON, a Markdown table and PNG plots.

    python -m benchmarks.run --device cpu --quick
    python -m benchmarks.run --device cpu                       # the full CPU sweep
    python -m benchmarks.run --device cuda --providers vqkern-triton,faiss --passes forward
    python -m benchmarks.run --device cuda --item 1 --budget 150  # one item of the GPU grid

Per (shape, dtype, pass) every provider is set up and its codes are checked against
the fp32 expansion (benchmarks/codes.py: a provider with wrong codes is recorded as
``wrong``, with the mismatch, and never timed); then each is warmed up, measured once
for peak extra memory, and timed in interleaved rounds (provider A, B, C, A, B, C,
...) so that drift of the machine hits all of them alike. On CPU a sample is the mean
of a burst of back-to-back calls lasting about 25 ms (``calls_per_sample`` in each
record), one call for anything slower. Inputs rotate among several sets. See
benchmarks/measure.py for the timing, memory and floor methods.

The JSON and Markdown files are rewritten after every (shape, dtype, pass), so a
process killed at its time limit keeps what it measured (``meta.complete`` is false
until the end). With ``--budget`` a case starts only when its estimate (the GPU grid's,
benchmarks/gpu_grid.py, scaled by how long the cases before it took, or else the
longest case of that pass so far) times MARGIN fits in what is left; the cases that do
not are recorded as ``not-run`` with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # --budget counts from here: importing torch takes seconds too

import torch  # noqa: E402

from . import codes, measure, report  # noqa: E402
from .gpu_grid import GPU_GRID, find  # noqa: E402
from .providers import PROVIDERS, Case  # noqa: E402

GPU_SHAPES = list(dict.fromkeys(item.shape for item in GPU_GRID))
CPU_SHAPES = [(4096, 1024, 64), (16384, 8192, 64), (16384, 16384, 256), (16384, 2048, 64)]
QUICK_SHAPES = {"cpu": [(4096, 1024, 64), (4096, 2048, 64)], "cuda": [(16384, 1024, 64), (16384, 4096, 64)]}
PASSES = ("forward", "backward", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROTATE_BYTES = 64 * 2**20  # rotate up to 3 input sets while they total less than this
CPU_SAMPLE_MS = 25.0  # a CPU sample is a burst of back-to-back calls lasting about this long
CPU_MAX_BURST = 20
MARGIN = 1.25  # a case starts only when its estimate times this fits in what is left of --budget


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(";"):
        parts = item.replace("x", ",").split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"--shapes wants 'N,K,D;N,K,D', got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--passes", default=None,
                   help="comma list of forward,backward,train (default: all; quick: forward,train)")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="'N,K,D;N,K,D' (default: the device's set)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16)")
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes, forward+train, fewer repeats")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider on CPU (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="CPU: record OOM without running when a provider must allocate more "
                        "(default: 4 GiB or half the available RAM, whichever is less)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results root folder")
    p.add_argument("--name", default=None, help="the <what> of <date>-<what>.json (default: quick/full/custom)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--item", default=None,
                   help="an item of the GPU grid (its number or name, python -m benchmarks.gpu_grid): its shape, "
                        "dtype, passes, providers, data and time estimates; --passes/--providers/--shapes "
                        "replace the item's")
    p.add_argument("--data", default=None, choices=("randn", "one-code"),
                   help="randn (default) or one-code: every row's nearest code is code 0")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds this process may take: a case starts only when its estimate fits")
    p.add_argument("--floor-sizes", default=None,
                   help="square sizes the matmul floor tries, e.g. 1024,2048,4096 (default: the device's)")
    args = p.parse_args(argv)
    args.estimates = {}
    if args.item is not None:
        try:
            item = find(args.item)
        except KeyError as exc:
            p.error(f"--item: {exc.args[0]}")
        if args.dtypes is not None:
            p.error("--item sets the dtype: leave out --dtypes")
        # --shapes replaces the item's shape (the GPU script's dry run on CPU takes a tiny one).
        args.shapes, args.dtypes = args.shapes or [item.shape], item.dtype
        args.passes = args.passes or ",".join(item.passes)
        args.providers = args.providers or ",".join(item.providers)
        args.data = args.data or item.data
        args.name = args.name or f"gpu-{item.name}"
        args.estimates = dict(item.est)
    args.data = args.data or "randn"
    args.floor_sizes = [int(x) for x in args.floor_sizes.split(",")] if args.floor_sizes else None
    custom = any(v is not None for v in (args.passes, args.shapes, args.dtypes, args.providers))
    if args.passes is None:
        args.passes = "forward,train" if args.quick else ",".join(PASSES)
    args.passes = [x for x in args.passes.split(",") if x]
    bad = set(args.passes) - set(PASSES)
    if bad:
        p.error(f"--passes: unknown {sorted(bad)}; choose from {PASSES}")
    dtypes = args.dtypes or "fp32,bf16"
    if any(d not in DTYPES for d in dtypes.split(",")):
        p.error(f"--dtypes: choose from {list(DTYPES)}")
    args.dtypes = dtypes.split(",")
    names = args.providers.split(",") if args.providers else list(PROVIDERS)
    if any(n not in PROVIDERS for n in names):
        p.error(f"--providers: unknown {[n for n in names if n not in PROVIDERS]}; choose from {list(PROVIDERS)}")
    args.providers = names
    if args.shapes is None:
        args.shapes = QUICK_SHAPES[args.device] if args.quick else (CPU_SHAPES if args.device == "cpu" else GPU_SHAPES)
    args.reps = max(1, args.reps or 5)
    args.name = args.name or ("custom" if custom else "quick" if args.quick else "full")
    return args


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def make_data(case: Case, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = max(1, min(3, ROTATE_BYTES // max(1, case.n * case.d * case.itemsize)))
    zs = [torch.randn(case.n, case.d, generator=g).to(case.device, case.dtype) for _ in range(sets)]
    codebook = torch.randn(case.k, case.d, generator=g)
    if case.data == "one-code":
        # |z - e_0|^2 ~ 2 D against ~100 D for every other code (z.e_k would have to exceed
        # 49 D, 14 standard deviations at D = 8): every row picks code 0.
        codebook[1:] += 10.0
    return {
        "zs": zs,
        "codebook": codebook.to(case.device, case.dtype),
        "grad": torch.randn(case.n, case.d, generator=g).to(case.device, case.dtype),
    }


class Budget:
    """What is left of --budget, and whether a case's estimate (x MARGIN) fits in it.

    A case's estimate is the grid item's for its pass, scaled by how the cases before it
    compared with their estimates; without one, the longest case of that pass so far
    (the first case of a pass without an estimate always starts)."""

    def __init__(self, seconds, estimates: dict, started: float | None = None):
        self.deadline = None if seconds is None else (time.monotonic() if started is None else started) + seconds
        self.est = {k: v for k, v in estimates.items() if k != "start"}
        self.ratios: list[float] = []
        self.longest: dict[str, float] = {}

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def need(self, pass_: str) -> float:
        if pass_ in self.est:
            scale = sum(self.ratios) / len(self.ratios) if self.ratios else 1.0
            return self.est[pass_] * scale * MARGIN
        return self.longest.get(pass_, 0.0) * MARGIN

    def refusal(self, pass_: str) -> str | None:
        """None when the case may start, else the reason it does not."""
        need, left = self.need(pass_), self.left()
        if need <= left:
            return None
        return f"not started: needs about {need:.0f} s (estimate x {MARGIN}), {max(left, 0):.0f} s left of --budget"

    def done(self, pass_: str, seconds: float) -> None:
        self.longest[pass_] = max(seconds, self.longest.get(pass_, 0.0))
        if pass_ in self.est:
            self.ratios.append(seconds / self.est[pass_])


def case_cost(case: Case, pass_: str) -> tuple[float, float]:
    """(flops, bytes) that any implementation must spend: the floor's inputs."""
    s, n, k, d = case.itemsize, case.n, case.k, case.d
    fwd_flops, fwd_bytes = 2.0 * n * k * d, s * (2 * n * d + k * d) + 12 * n
    bwd_bytes = s * (3 * n * d + 2 * k * d) + 8 * n
    if pass_ == "forward":
        return fwd_flops, fwd_bytes
    if pass_ == "backward":
        return 3.0 * n * d, bwd_bytes
    return fwd_flops, fwd_bytes + bwd_bytes


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text \
        or "not enough memory" in text


def run_case(case, pass_, providers, args, rates, common, bar, refs=None) -> list[dict]:
    """Records of every provider at one (shape, dtype, pass). ``refs`` caches the fp32
    expansion's codes per data set across passes."""
    device = case.device
    data = make_data(case, seed=hash((case.n, case.k, case.d)) % 2**31)
    refs = {} if refs is None else refs
    ref_key = (case.n, case.k, case.d, str(case.dtype), case.data)

    def reference():
        if ref_key not in refs:
            refs[ref_key] = codes.reference(data["zs"][0], data["codebook"])
        return refs[ref_key]

    flops, nbytes = case_cost(case, pass_)
    floor = measure.floor_ms(flops, nbytes, rates)
    base = {**common, "n": case.n, "k": case.k, "d": case.d, "dtype": str(case.dtype).replace("torch.", ""),
            "pass": pass_, "data": case.data, "floor_ms": floor, "flops": flops, "bytes": nbytes,
            **{key: value for key, value in rates.items() if key != "matmul_tries"}}
    records, live = [], {}
    for prov in providers:
        rec = {**base, "provider": prov.name, "note": prov.note, "status": "ok", "reason": ""}
        records.append(rec)
        if pass_ not in prov.passes:
            rec.update(status="n/a", reason=f"{prov.name} has no {pass_} pass")
            continue
        ok, reason = prov.availability(device, case.dtype)
        if not ok:
            rec.update(status="skipped", reason=reason)
            continue
        need = prov.extra_bytes(case)
        if device.type == "cpu" and need > args.mem_limit:
            rec.update(status="oom", reason=f"needs >= {need / 2**30:.1f} GiB, limit {args.mem_limit / 2**30:.1f} GiB "
                                            "(not run: the host would run out of memory)")
            continue
        bar.set_postfix_str(f"{pass_} {case.n}x{case.k}x{case.d} {prov.name} warm-up")
        try:
            fn = prov.build(case, data, pass_)
            # compilation would dominate the memory of the first call
            first = fn(0) if prov.name.endswith("compile") else None
            # The warm-up call doubles as the memory measurement (a whole extra call per
            # provider would add a seventh of the sweep's time for the same number) and, on
            # input set 0, gives the codes to check.
            held = []
            rec["peak_mem_bytes"] = measure.peak_extra_bytes(lambda: held.append(fn(0 if first is None else 1)),
                                                             device)
            if prov.searches:
                out = held[0] if first is None else first
                verdict = codes.check(reference(), fn.indices if pass_ == "backward" else out[0])
                rec["check"] = verdict
                if not verdict["ok"]:
                    rec.update(status="wrong", reason=verdict["summary"])
                    continue
            # Free the warm-up outputs before the timing (emptied and rebound rather than
            # deleted: the warm-up lambda above reads both names).
            held.clear()
            first = None
            if device.type == "cpu":
                # Short calls are timed in bursts of back-to-back calls (per-call mean), so that
                # what the previous provider left behind (cache contents, thread pools winding
                # down) is not billed to one 4 ms call: a single-call median at 4096 x 1024 x 64
                # read 4.8 ms in one sweep and 8.1 ms in the next for the same code.
                once = measure.time_once_cpu(lambda: fn(1))
                rec["calls_per_sample"] = max(1, min(CPU_MAX_BURST, round(CPU_SAMPLE_MS / max(once, 1e-3))))
            live[prov.name] = (fn, rec, [])
        except Exception as exc:  # one provider's failure is a result, not the end of the sweep
            rec.update(status="oom" if _is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rounds = 3 if device.type == "cuda" else args.reps
    for r in range(rounds):
        bar.set_postfix_str(f"{pass_} {case.n}x{case.k}x{case.d} round {r + 1}/{rounds}")
        for name, (fn, rec, samples) in list(live.items()):
            calls = iter(range(10**9))
            try:
                if device.type == "cuda":
                    samples.extend(measure.time_cuda(lambda: fn(next(calls))))
                else:
                    burst = rec["calls_per_sample"]
                    samples.append(measure.time_once_cpu(lambda: [fn(r) for _ in range(burst)]) / burst)
            except Exception as exc:
                rec.update(status="oom" if _is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
                del live[name]
    for _fn, rec, samples in live.values():
        rec.update(measure.summarize(samples))
        rec["floor_fraction"] = floor / rec["median_ms"] if rec["median_ms"] > 0 else None
    for rec in records:
        bar.update(1)
        if rec["status"] in ("skipped", "oom", "error"):
            bar.write(f"  {rec['provider']:<18} {pass_:<8} {case.n}x{case.k}x{case.d} {rec['status']}: {rec['reason']}")
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if "faiss" in args.providers:
        # Only then: faiss brings an OpenMP runtime of its own, a second one in the process
        # beside PyTorch's (which vqkern._cpu's kernels share, csrc/cpu/parallel.h).
        try:
            import faiss
            faiss.omp_set_num_threads(torch.get_num_threads())
        except ImportError:
            pass
    # A shared host must not be pushed into swap by one naive provider: 4 GiB keeps the
    # plain broadcast in at (4096, 1024, 64) and out at every larger shape.
    args.mem_limit = (args.mem_limit_gb * 2**30) if args.mem_limit_gb else min(4 * 2**30, 0.5 * _available_ram())
    providers = [PROVIDERS[n] for n in args.providers]
    common = measure.provenance(device, argv)
    common["mem_method"] = measure.CUDA_MEM_METHOD if device.type == "cuda" else measure.cpu_memory_supported()[1]
    print(f"device: {common['device']} | torch {common['torch']} | triton {common['triton']} | "
          f"commit {common['git_commit']} | load {common['load_average']}")
    if device.type == "cpu":
        print(f"cpu: {common['cpu_model']} | search path: {common['cpu_isa']}")
    for prov in providers:
        for dt in args.dtypes:
            ok, reason = prov.availability(device, DTYPES[dt])
            if not ok:
                print(f"skip {prov.name} ({dt}): {reason}")
    records, rates_by_dtype, refs = [], {}, {}
    # Run as a script, the budget counts from the import of this module; called in-process, from now.
    budget = Budget(args.budget, args.estimates, STARTED if __name__ == "__main__" else None)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    folder = Path(args.out) / measure.device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{stamp}-{args.name}"
    meta = {**common, "floor_rates": rates_by_dtype, "shapes": args.shapes, "passes": args.passes,
            "providers": args.providers, "dtypes": args.dtypes, "data": args.data, "budget_s": args.budget,
            "item": args.item, "complete": False}
    total = len(args.shapes) * len(args.dtypes) * len(args.passes) * len(providers)
    with tqdm(total=total, desc="bench", unit="case", file=sys.stdout) as bar:
        for dt in args.dtypes:
            # The fastest matmul the machine reaches in the inputs' dtype (measure.matmul_rate).
            rates_by_dtype[dt] = rates = measure.measure_floor_rates(device, DTYPES[dt], args.floor_sizes)
            bar.write(f"floor ({dt}): matmul {rates['matmul_flops'] / 1e9:.1f} GFLOP/s "
                      f"({report.floor_method(rates)}), copy {rates['bandwidth_bytes'] / 1e9:.1f} GB/s")
            for n, k, d in args.shapes:
                for pass_ in args.passes:
                    case = Case(n, k, d, DTYPES[dt], device, args.data)
                    refused = budget.refusal(pass_)
                    if refused:
                        records += not_run(case, pass_, providers, common, refused)
                        bar.update(len(providers))
                        bar.write(f"  {pass_} {n}x{k}x{d} {dt}: {refused}")
                    else:
                        t0 = time.monotonic()
                        records += run_case(case, pass_, providers, args, rates, common, bar, refs)
                        budget.done(pass_, time.monotonic() - t0)
                    write_results(stem, meta, records)
    meta["complete"] = True
    table = write_results(stem, meta, records)
    (stem.parent / f"{stem.name}-summary.md").write_text(report.summary(meta, records))
    print(table)
    if not args.no_plots:
        for path in report.plots(records, str(stem)):
            print(f"plot: {path}")
    print(f"results: {stem}.json, {stem}.md, {stem}-summary.md")
    return 0


def not_run(case, pass_, providers, common, reason) -> list[dict]:
    """The records of a case that did not start (no floor: the rates are the run's)."""
    return [{**common, "n": case.n, "k": case.k, "d": case.d, "dtype": str(case.dtype).replace("torch.", ""),
             "pass": pass_, "data": case.data, "provider": prov.name, "note": prov.note,
             "status": "not-run" if pass_ in prov.passes else "n/a",
             "reason": reason if pass_ in prov.passes else f"{prov.name} has no {pass_} pass",
             "floor_ms": None} for prov in providers]


def write_results(stem: Path, meta: dict, records: list[dict]) -> str:
    """<stem>.json and .md with what is measured so far (each replaced whole, never half
    written: a process killed between two cases leaves the last complete pair)."""
    table = report.markdown(meta, records)
    for suffix, text in ((".json", json.dumps({"meta": meta, "records": records}, indent=1)), (".md", table)):
        tmp = stem.parent / f".{stem.name}{suffix}.part"
        tmp.write_text(text)
        os.replace(tmp, stem.parent / f"{stem.name}{suffix}")
    return table


if __name__ == "__main__":
    sys.exit(main())
