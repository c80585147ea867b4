"""What a check result was produced on: versions, devices, the CPU kernel path, the commit."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

# The source tree of an editable install or a checkout (no .git: an installed wheel).
ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo, else lscpu, else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def cpu_kernel_path() -> str:
    """The torch backend's CPU search path as it runs now (vqkern._cpu's ISA path, or the
    tiled PyTorch fallback and why), as ``vqkern.backends.torch_.cpu_kernel`` says."""
    try:
        from ..backends import torch_
        return torch_.cpu_kernel()[1]
    except Exception as exc:  # a bad VQKERN_CPU_ISA is a result too
        return f"error: {type(exc).__name__}: {exc}"


def git_commit() -> str | None:
    """'<sha>' or '<sha>-dirty' when vqkern runs from a git checkout; else the stamp that
    benchmarks/gpu/prepare.sh leaves in a copied tree (.gpudata/source.txt); else None."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    stamp = ROOT / ".gpudata" / "source.txt"
    if stamp.exists():
        fields = dict(line.split(" ", 1) for line in stamp.read_text().splitlines() if " " in line)
        return fields.get("commit", "unknown") + ("-dirty" if fields.get("dirty", "0") != "0" else "")
    return None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(\S+)", text)
    return found.group(1) if found else None


def provenance() -> dict:
    """Versions and machine of a check run, for a bug report."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # the CPU backends run without triton
        triton_version = f"unavailable ({type(exc).__name__})"
    from .. import __version__
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "vqkern": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "driver": _driver_version() if gpus else None,
        "gpus": gpus,
        "cpu_model": cpu_model(),
        "cpu_kernel": cpu_kernel_path(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
