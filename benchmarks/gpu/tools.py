"""Helpers of benchmarks/gpu/session.sh, also run by hand after a GPU session.

    python benchmarks/gpu/tools.py check-site [SITE]        # carried wheels: requirements met, peers import
    python benchmarks/gpu/tools.py machine [SITE]           # versions, device, backends, then check-site
    python benchmarks/gpu/tools.py commit                   # the commit under test (git, else the stamp)
    python benchmarks/gpu/tools.py fix-commit FILE.json...  # fill an 'unknown' git_commit from the stamp
    python benchmarks/gpu/tools.py ptxas BUILD.log          # registers, stack and spills per CUDA kernel
    python benchmarks/gpu/tools.py bench-summary FILE.json...
    python benchmarks/gpu/tools.py train-record RUN_DIR NAME COMMAND...
    python benchmarks/gpu/tools.py session-record SUMMARY.txt COMMAND...
    python benchmarks/gpu/tools.py merge --name full FILE.json...   # parts of one sweep -> one JSON, MD, PNGs

The GPU machine receives a copy of the working tree, possibly without .git: the
commit then comes from .gpudata/source.txt, written here by prepare.sh just
before the call (CONVENTIONS.md section 6: a result without its provenance is not
a result). Records go under benchmarks/results/<device>/, or under $RESULTS_DIR/<device>/
when that is set (session.sh's dry run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAMP = ROOT / ".gpudata" / "source.txt"
# The GPU benchmark's peers and what they import; faiss travels only with WITH_FAISS=1
# (faiss-cpu has no GPU index, so on the GPU machine it only reports itself skipped).
PEERS = ("vector_quantize_pytorch", "einx", "einops", "loguru", "torch_einops_utils", "flash_kmeans")
OPTIONAL_PEERS = ("faiss",)


def results_root() -> Path:
    return Path(os.environ["RESULTS_DIR"]) if os.environ.get("RESULTS_DIR") else ROOT / "benchmarks" / "results"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_site(site: str | None) -> int:
    """Every Requires-Dist (no extras) of the wheels installed in SITE is met on sys.path; the
    peers import (without SITE: only the imports, from this environment)."""
    import importlib.util
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for info in sorted(Path(site).glob("*.dist-info")) if site else []:
        dist = metadata.Distribution.at(info)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: found {have}")
    for line in problems:
        print(f"  UNMET {line}")
    dists = metadata.packages_distributions()
    for module in PEERS + OPTIONAL_PEERS:
        if module in OPTIONAL_PEERS and importlib.util.find_spec(module) is None:
            print(f"  absent {module}: not installed (optional)")
            continue
        try:
            mod = __import__(module)
            version = ", ".join(f"{d} {metadata.version(d)}" for d in sorted(set(dists.get(module, []))))
            print(f"  import {module}: {version or '?'} ({Path(mod.__file__).parent})")
        except Exception as exc:  # report every peer, then fail
            problems.append(module)
            print(f"  FAIL import {module}: {type(exc).__name__}: {exc}")
    if problems and not site:
        print("  (no SITE given: this environment lacks them; the benchmark records those peers as skipped)")
    return 1 if problems else 0


def machine(site: str | None, capability_file: str | None = None) -> int:
    """One line of versions and device, each backend's availability on it, then check_site:
    everything the session's set-up asks of Python, in one process (an import of torch costs
    seconds on a busy host). ``capability_file`` gets the GPU's compute capability ("9.0") or
    "none", alone in the file: session.sh decides from it whether it has a GPU (the log
    also holds whatever torch and the imports printed)."""
    import platform

    import torch

    sys.path.insert(0, str(ROOT))
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # reported, the rest still runs
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    capability = "none"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        capability = f"{p.major}.{p.minor}"
        where = (f"GPU {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                 f"capability {capability}")
    else:
        where = "CPU only, no CUDA device"
    if capability_file:
        Path(capability_file).write_text(capability + "\n")
    print(f"{where}; Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}")
    from vqkern import backends

    for name, (ok, why) in backends.report(device).items():
        print(f"  backend {name} on {device}: {'ok' if ok else 'UNAVAILABLE'} ({why})"[:240])
    return check_site(site)


def commit() -> str:
    """'<sha>' or '<sha>-dirty' from git when the tree has .git, else from the stamp, else 'unknown'."""
    if (ROOT / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    if STAMP.exists():
        fields = dict(line.split(" ", 1) for line in STAMP.read_text().splitlines() if " " in line)
        return fields.get("commit", "unknown") + ("-dirty" if fields.get("dirty", "0") != "0" else "")
    return "unknown (no .git and no .gpudata/source.txt: run benchmarks/gpu/prepare.sh before the call)"


def fix_commit(files: list[str]) -> int:
    sha = commit()
    for name in files:
        data = json.loads(Path(name).read_text())
        changed = 0
        for rec in [data.get("meta", {}), *data.get("records", [])]:
            if str(rec.get("git_commit", "")).startswith("unknown"):
                rec["git_commit"] = sha
                changed += 1
        if changed:
            Path(name).write_text(json.dumps(data, indent=1))
            md = Path(name).with_suffix(".md")
            if md.exists():
                md.write_text(re.sub(r"commit `unknown[^`]*`", f"commit `{sha}`", md.read_text()))
        print(f"{name}: git_commit {'set to ' + sha if changed else 'already known'}")
    return 0


def ptxas(log: str) -> int:
    """One line per (kernel, arch) from a build log made with -Xptxas=-v; spills flagged."""
    rows, cur, props = [], None, None
    for line in Path(log).read_text(errors="replace").splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
        if m:
            cur = {"fn": m.group(1), "arch": m.group(2), "stack": 0, "spill": 0, "regs": 0, "smem": 0}
            rows.append(cur)
        elif "Function properties for" in line:
            props = line.rsplit(" ", 1)[-1]  # the entry function, or a non-inlined callee
        elif cur is not None and "bytes stack frame" in line and props == cur["fn"]:
            nums = [int(x) for x in re.findall(r"(\d+) bytes", line)]
            cur["stack"], cur["spill"] = nums[0], sum(nums[1:3])
        elif cur is not None and "Used" in line and "registers" in line:
            cur["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(smem.group(1)) if smem else 0
    if not rows:
        print(f"  no ptxas report in {log} (built without VQKERN_PTXAS_VERBOSE=1, or the build failed)")
        return 1
    names = _demangle([r["fn"] for r in rows])
    for r, name in zip(rows, names):
        flag = "  SPILLS" if r["spill"] else "  STACK" if r["stack"] else ""
        print(f"  {r['arch']:<7} regs {r['regs']:>3}  smem {r['smem']:>6}  stack {r['stack']:>4}  "
              f"spill {r['spill']:>4}  {name.split('(')[0][:70]}{flag}")
    spilling = sum(1 for r in rows if r["spill"])
    print(f"  {len(rows)} kernels x archs, {spilling} with spills")
    return 0


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        short = out.stdout.splitlines()
        if len(short) == len(names):
            return [re.sub(r"\(anonymous namespace\)::|vqkern::", "", s) for s in short]
    except (OSError, subprocess.CalledProcessError):
        pass
    return names


def _load(files):
    metas, records = [], []
    for name in files:
        data = json.loads(Path(name).read_text())
        metas.append(data["meta"])
        records += data["records"]
    return metas, records


def bench_summary(files: list[str]) -> int:
    """One line per (pass, dtype, shape): vqkern's backends, the fastest peer; then every
    provider whose codes were wrong, every error, OOM and case not run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import floor_method

    metas, records = _load(files)
    for m in metas:
        rates = ", ".join(f"{dt} mm {r['matmul_flops'] / 1e12:.1f} TFLOP/s ({floor_method(r)}) copy "
                          f"{r['bandwidth_bytes'] / 1e12:.2f} TB/s" for dt, r in m["floor_rates"].items())
        done = "" if m.get("complete", True) else " | INCOMPLETE (cut off)"
        print(f"  {m['device']} | {m['git_commit'][:12]} | shapes {m['shapes']} | {rates}{done}")
    groups: dict = {}
    for r in records:
        groups.setdefault((r["pass"], r["dtype"], r["n"], r["k"], r["d"], r.get("data", "randn")), []).append(r)
    failed = []
    for (pass_, dtype, n, k, d, data), group in groups.items():
        ok = {r["provider"]: r for r in group if r["status"] == "ok"}
        ours = [p for p in ok if p.startswith("vqkern")]
        cells = [f"{p[7:]} {ok[p]['median_ms']:.3f} ms {100 * ok[p]['floor_fraction']:.0f}%" for p in ours]
        best_ours = min((ok[p]["median_ms"] for p in ours), default=None)
        peers = [r for p, r in ok.items() if not p.startswith("vqkern")]
        if peers:
            best = min(peers, key=lambda r: r["median_ms"])
            ratio = f" = {best['median_ms'] / best_ours:.2f}x ours" if best_ours else ""
            cells.append(f"best peer {best['provider']} {best['median_ms']:.3f} ms{ratio}")
        shape = f"{n}x{k}x{d}" + ("" if data == "randn" else f" {data}")
        print(f"  {pass_:<8} {dtype:<8} {shape:<17} " + (" | ".join(cells) or "nothing timed"))
        # Peers' OOMs are expected at large shapes; vqkern's are not.
        failed += [f"{r['status'].upper()} {r['provider']} {pass_} {dtype} {shape}: {r['reason'][:160]}"
                   for r in group if r["status"] in ("error", "wrong", "not-run") or
                   (r["status"] == "oom" and r["provider"].startswith("vqkern"))]
    for line in failed:
        print(f"  {line}")
    # A vqkern provider that returned wrong codes, failed or ran out of memory fails the step.
    return 1 if any(line.split()[1].startswith("vqkern") and not line.startswith("NOT-RUN") for line in failed) else 0


def train_record(run_dir: str, name: str, command: list[str]) -> int:
    """compare.json of `python -m vqkern.train vqvae --compare` with its provenance, and its PNG,
    into benchmarks/results/<device>/<date>-<name>.{json,png}."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import measure

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = measure.provenance(device, [])
    meta["command"] = " ".join(command)
    if meta["git_commit"].startswith("unknown"):
        meta["git_commit"] = commit()
    run = Path(run_dir)
    result = json.loads((run / "compare.json").read_text())
    folder = results_root() / measure.device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}-{name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "compare": result}, indent=1) + "\n")
    if (run / "compare.png").exists():
        shutil.copy(run / "compare.png", f"{stem}.png")
    for kind in ("reference", "vqkern"):
        m = result[kind]
        print(f"  {name} {kind:>9}: final loss {m['final_loss']:.5f}, held-out recon {m['test_recon']:.5f}, "
              f"perplexity {m['test_perplexity']:.1f}, {m['ms_per_step']:.2f} ms/step")
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in result["max_abs_diff"].items())
    print(f"  {name} speed-up {result['speedup']:.2f}x; largest |difference| per step: {diffs}")
    print(f"  -> {stem.relative_to(ROOT)}.json")
    return 0


def session_record(summary: str, command: list[str]) -> int:
    """A session's summary with its provenance -> <results>/<device>/<date>-gpu-session-<HHMM>.md."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import measure

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = measure.provenance(device, [])
    if meta["git_commit"].startswith("unknown"):
        meta["git_commit"] = commit()
    folder = results_root() / measure.device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{meta['date'][:10]}-gpu-session-{meta['date'][11:13]}{meta['date'][14:16]}.md"
    lines = [f"# GPU session: {meta['device']}", "",
             f"- date {meta['date']}, commit `{meta['git_commit']}`, torch {meta['torch']}, triton {meta['triton']}, "
             f"CUDA {meta['cuda']}, Python {meta['python']}",
             f"- command: `{' '.join(command)}` (benchmarks/gpu/README.md)", "",
             "```", Path(summary).read_text().rstrip(), "```", ""]
    path.write_text("\n".join(lines))
    print(f"  -> {path}")
    return 0


def merge(files: list[str], name: str) -> int:
    """Parts of one sweep (one JSON per shape group) -> <date>-<name>.json, .md and plots beside them."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    metas, records = _load(files)
    first = metas[0]
    if len({m["device"] for m in metas}) != 1:
        raise SystemExit(f"parts come from different devices: {sorted({m['device'] for m in metas})}")
    meta = {**first,
            "command": " ; ".join(m["command"] for m in metas),
            "git_commit": ",".join(sorted({m["git_commit"] for m in metas})),
            "shapes": [s for m in metas for s in m["shapes"]],
            "providers": list(dict.fromkeys(p for m in metas for p in m["providers"])),
            "passes": list(dict.fromkeys(p for m in metas for p in m["passes"])),
            "dtypes": list(dict.fromkeys(p for m in metas for p in m["dtypes"])),
            "load_average": [m["load_average"] for m in metas],
            # each part measured its own floor rates; each record keeps the rates it was judged by
            "floor_rates": {f"{dt}, part {i + 1}": r for i, m in enumerate(metas)
                            for dt, r in m["floor_rates"].items()},
            "parts": [{"file": Path(f).name, **{k: m[k] for k in ("date", "command", "shapes", "git_commit")}}
                      for f, m in zip(files, metas)]}
    stem = Path(files[0]).parent / f"{first['date'][:10]}-{name}"
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    Path(f"{stem}.md").write_text(report.markdown(meta, records))
    Path(f"{stem}-summary.md").write_text(report.summary(meta, records))
    paths = report.plots(records, str(stem))
    print("\n".join([f"{stem}.json", f"{stem}.md", f"{stem}-summary.md", *paths]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu/tools.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check-site").add_argument("site", nargs="?")
    mp = sub.add_parser("machine")
    mp.add_argument("site", nargs="?")
    mp.add_argument("--capability-file", default=None)
    sub.add_parser("commit")
    sub.add_parser("fix-commit").add_argument("files", nargs="+")
    sub.add_parser("ptxas").add_argument("log")
    sub.add_parser("bench-summary").add_argument("files", nargs="+")
    t = sub.add_parser("train-record")
    t.add_argument("run_dir")
    t.add_argument("name")
    t.add_argument("command", nargs=argparse.REMAINDER)
    v = sub.add_parser("session-record")
    v.add_argument("summary")
    v.add_argument("command", nargs=argparse.REMAINDER)
    m = sub.add_parser("merge")
    m.add_argument("--name", default="full")
    m.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "check-site":
        return check_site(a.site)
    if a.cmd == "machine":
        return machine(a.site, a.capability_file)
    if a.cmd == "commit":
        print(commit())
        return 0
    if a.cmd == "fix-commit":
        return fix_commit(a.files)
    if a.cmd == "ptxas":
        return ptxas(a.log)
    if a.cmd == "bench-summary":
        return bench_summary(a.files)
    if a.cmd == "train-record":
        return train_record(a.run_dir, a.name, a.command)
    if a.cmd == "session-record":
        return session_record(a.summary, a.command)
    return merge(a.files, a.name)


if __name__ == "__main__":
    sys.exit(main())
