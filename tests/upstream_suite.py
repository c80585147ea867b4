"""Run vector-quantize-pytorch's own test files against vqkern's drop-in classes.

    python tests/upstream_suite.py PATH/TO/vector-quantize-pytorch/tests [-k EXPR]

PATH is the ``tests`` folder of a checkout of vector-quantize-pytorch at the release
installed here (its PyPI archives do not ship the tests). The files are copied into a
scratch folder with a conftest.py that replaces, in the installed ``vector_quantize_pytorch``
module, every class vqkern provides (VectorQuantize, ResidualVQ, GroupedResidualVQ, LFQ,
ResidualLFQ, GroupedResidualLFQ, FSQ, ResidualFSQ, GroupedResidualFSQ) with vqkern's, so
``from vector_quantize_pytorch import LFQ`` in a test gets vqkern's class. The suite runs
twice, once against vector-quantize-pytorch itself and once patched, and the outcome of
every test in each run is printed, with the summary lines. Exit status: 0 when every test
that passes against vector-quantize-pytorch also passes against vqkern.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PATCHED = ("VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "LFQ", "ResidualLFQ", "GroupedResidualLFQ",
           "FSQ", "ResidualFSQ", "GroupedResidualFSQ")

CONFTEST = f'''import os

if os.environ.get("VQKERN_UPSTREAM_PATCH") == "1":
    import vector_quantize_pytorch
    import vqkern

    for name in {PATCHED!r}:
        setattr(vector_quantize_pytorch, name, getattr(vqkern, name))
'''


def run_suite(scratch: Path, patched: bool, extra: list[str]) -> dict[str, str]:
    """{test id: PASSED/FAILED/ERROR/SKIPPED} of one pytest run in the scratch folder."""
    env = dict(__import__("os").environ, VQKERN_UPSTREAM_PATCH="1" if patched else "0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=", *extra, "."]
    out = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    results = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if m:
            results[m.group(2)] = m.group(1)
    summary = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|error).* in [0-9.]+s", line)]
    print(f"{'vqkern' if patched else 'vector-quantize-pytorch'}: {summary[-1] if summary else out.stdout[-2000:]}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", type=Path, help="vector-quantize-pytorch's tests folder")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    args = parser.parse_args()
    files = sorted(args.tests.glob("test_*.py"))
    if not files:
        parser.error(f"no test_*.py in {args.tests}")
    extra = ["-k", args.k] if args.k else []
    with tempfile.TemporaryDirectory(prefix="vqkern-upstream-") as tmp:
        scratch = Path(tmp)
        for f in files:
            shutil.copy(f, scratch / f.name)
        (scratch / "conftest.py").write_text(CONFTEST)
        theirs = run_suite(scratch, False, extra)
        ours = run_suite(scratch, True, extra)
    worse = [t for t, r in theirs.items() if r == "PASSED" and ours.get(t) != "PASSED"]
    for test in sorted(set(theirs) | set(ours)):
        print(f"{theirs.get(test, '-'):8} {ours.get(test, '-'):8} {test}")
    print(f"{sum(r == 'PASSED' for r in ours.values())} of {len(ours)} pass against vqkern, "
          f"{sum(r == 'PASSED' for r in theirs.values())} of {len(theirs)} against vector-quantize-pytorch; "
          f"{len(worse)} pass only against vector-quantize-pytorch: {worse}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
