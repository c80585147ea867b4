"""``python -m vqkern.check`` (also ``vqkern-check``): every backend of this machine against fp64.

For every device (the CPU and each CUDA GPU) and every backend that can run there, for each
dtype pair and metric, it runs the backend's self-check (``vqkern.check.selfcheck``) and
``--cases`` fuzz cases of the public API (``vqkern.check.fuzz``), prints a table and one
verdict line, and with ``--json PATH`` writes the rows, every failure (with the seed that
replays it) and the versions a bug report needs. Exit status 0 when every verdict passes,
1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings

import torch

from .. import backends
from . import env, selfcheck
from .fuzz import SHORT, describe, draw_case, run_case
from .oracle import Findings
from .policy import GRAD_FACTOR, RANK_RTOL

# The dtype pairs and metrics of the table: every (z, codebook) pair with l2, and cosine
# (whose backends see fp32 unit vectors) with z and codebook of one dtype.
_DT = (torch.float32, torch.float16, torch.bfloat16)
GRID = tuple((z, c, "l2") for z in _DT for c in _DT) + tuple((z, z, "cosine") for z in _DT)
DEFAULT_CASES = 2
BASE_SEED = 7_000_000


def _devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]


@contextlib.contextmanager
def _selfcheck_off():
    """The fuzz cases call the public API with an explicit backend: with the self-check on,
    a backend that failed it would raise on every case instead of being measured."""
    old = os.environ.get("VQKERN_SELFCHECK")
    os.environ["VQKERN_SELFCHECK"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["VQKERN_SELFCHECK"]
        else:
            os.environ["VQKERN_SELFCHECK"] = old


def check_row(name: str, device: str, z_dtype, cb_dtype, metric: str, cases: int, seed0: int,
              large: bool = False) -> dict:
    """The self-check verdict and ``cases`` fuzz cases of one (backend, device, dtypes, metric),
    drawn at the test suite's sizes (``large``) or at the smaller ones it gives the
    Triton interpreter (N <= 160, K <= 300)."""
    start = time.perf_counter()
    key, verdict = selfcheck.verdict(name, device, z_dtype, cb_dtype, metric)
    findings, failures, done = Findings(), [], 0
    with _selfcheck_off():
        for seed in range(seed0, seed0 + cases):
            case = dict(draw_case(seed, small=not large), z_dtype=z_dtype, cb_dtype=cb_dtype, metric=metric)
            try:
                fails = run_case(case, name, device, findings)
            except Exception as exc:  # a raising backend is a failed case, reported with its seed
                fails = [("raised", math.inf, f"{type(exc).__name__}: {exc}")]
            done += 1
            failures += [dict(seed=seed, check=check, figure=figure, message=message, case=describe(case),
                              replay=replay_command(seed, name, device, z_dtype, cb_dtype, metric, large))
                         for check, figure, message in fails]
    return dict(backend=name, device=device, path=key[5], z=SHORT[z_dtype], codebook=SHORT[cb_dtype], metric=metric,
                selfcheck="pass" if verdict.ok else "FAIL", selfcheck_failures=list(verdict.failures),
                selfcheck_ms=round(verdict.seconds * 1e3, 1), cases=done,
                failed_cases=len({f["seed"] for f in failures}), failures=failures,
                worst_rank_excess=findings.figures.get("rank"), worst_grad_ratio=findings.figures.get("grad"),
                seconds=round(time.perf_counter() - start, 3))


def replay_command(seed: int, name: str, device: str, z_dtype, cb_dtype, metric: str, large: bool) -> str:
    """A shell command that runs one fuzz case again and prints its failures."""
    case = (f"dict(draw_case({seed}, small={not large}), z_dtype=torch.{str(z_dtype).split('.')[-1]}, "
            f"cb_dtype=torch.{str(cb_dtype).split('.')[-1]}, metric={metric!r})")
    return (f"VQKERN_SELFCHECK=0 python -c \"import torch; from vqkern.check.fuzz import draw_case, run_case; "
            f"print(run_case({case}, {name!r}, {device!r}))\"")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, then the backends that cannot run and why."""
    head = ("backend", "device", "path", "z", "codebook", "metric", "self-check", "cases", "failed",
            f"rank excess (<= {RANK_RTOL:g})", f"grad ratio (<= {GRAD_FACTOR:g})", "time s")
    body = [(r["backend"], r["device"], r["path"] or "-", r["z"], r["codebook"], r["metric"], r["selfcheck"],
             str(r["cases"]), str(r["failed_cases"]), _fmt(r["worst_rank_excess"]), _fmt(r["worst_grad_ratio"]),
             f"{r['seconds']:.2f}")
            for r in rows if "unavailable" not in r]
    widths = [max(len(x) for x in column) for column in zip(head, *body)]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    out += [f"{r['backend']} on {r['device']}: unavailable ({r['unavailable']})" for r in rows if "unavailable" in r]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqkern.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES,
                        help=f"fuzz cases per backend, dtype pair and metric (default {DEFAULT_CASES})")
    parser.add_argument("--device", action="append", help="only this device (repeatable; default: cpu and every GPU)")
    parser.add_argument("--backend", action="append", choices=backends.BACKENDS,
                        help="only this backend (repeatable; default: all)")
    parser.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16"),
                        help="only rows whose z and codebook have these dtypes (repeatable; default: all)")
    parser.add_argument("--metric", action="append", choices=("l2", "cosine"), help="only this metric (repeatable)")
    parser.add_argument("--large", action="store_true",
                        help="draw the fuzz cases at the test suite's sizes (N <= 400, K <= 2000), "
                             "not N <= 160, K <= 300")
    parser.add_argument("--seed", type=int, default=BASE_SEED, help="first fuzz seed (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write the rows, failures and versions as JSON")
    args = parser.parse_args(argv)
    if args.cases < 0:
        parser.error("--cases must be >= 0")
    devices = args.device or _devices()
    names = args.backend or list(backends.BACKENDS)
    grid = [(i, z, c, m) for i, (z, c, m) in enumerate(GRID)
            if (not args.dtype or {SHORT[z], SHORT[c]} <= set(args.dtype)) and (not args.metric or m in args.metric)]
    info = env.provenance()
    print(f"vqkern {info['vqkern']} ({info['git_commit'] or 'not a git checkout'}), torch {info['torch']}, "
          f"triton {info['triton']}, CUDA {info['cuda']}, driver {info['driver']}; GPUs: {info['gpus'] or 'none'}; "
          f"CPU: {info['cpu_model']} ({info['threads']} threads), CPU kernel: {info['cpu_kernel']}", flush=True)
    rows = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The interpreter's numpy and NaN rows' "invalid value" warnings are not results.
        warnings.simplefilter("ignore")
        for device in devices:
            for name in names:
                ok, reason = backends.availability(name, device)
                if not ok:
                    rows.append(dict(backend=name, device=device, unavailable=reason))
                    continue
                for i, z_dtype, cb_dtype, metric in grid:
                    rows.append(check_row(name, device, z_dtype, cb_dtype, metric, args.cases, args.seed + 1000 * i,
                                          args.large))
    checked = [r for r in rows if "unavailable" not in r]
    failed = [r for r in checked if r["selfcheck"] != "pass" or r["failed_cases"]]
    print(table(rows))
    for r in failed:
        for line in r["selfcheck_failures"][:3]:
            print(f"  {r['backend']} {r['device']} {r['z']}/{r['codebook']} {r['metric']} self-check: {line}")
        for f in r["failures"][:3]:
            print(f"  {r['backend']} {r['device']} {r['z']}/{r['codebook']} {r['metric']} seed {f['seed']} "
                  f"[{f['check']}] {f['message']}\n      {f['case']}\n      replay: {f['replay']}")
    cases = sum(r["cases"] for r in checked)
    if not checked:
        verdict = "FAIL: no backend can run on the devices asked for"
    elif failed:
        where = ", ".join(sorted({r["backend"] + " on " + r["device"] for r in failed}))
        verdict = (f"FAIL: {len(failed)} of {len(checked)} rows failed ({where}); "
                   "please report it with this output and the --json file")
    else:
        verdict = f"PASS: {len(checked)} rows, {cases} fuzz cases and every self-check passed"
    seconds = time.perf_counter() - start
    print(f"vqkern.check: {verdict} ({seconds:.1f} s)")
    if args.json:
        record = dict(verdict="pass" if checked and not failed else "fail", summary=verdict, seconds=round(seconds, 2),
                      command=" ".join(["python -m vqkern.check"] + (sys.argv[1:] if argv is None else list(argv))),
                      versions=info, rows=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if checked and not failed else 1
