#!/usr/bin/env bash
# Release check: the sdist and the wheel a release would upload, and their metadata.
#   1. python -m build (isolated: an sdist, then the wheel built from that sdist) into
#      dist-release/ (VQKERN_SKIP_CUDA_BUILD=1 skips vqkern/_C: the metadata is the same);
#   2. twine check --strict: the metadata and the README render as PyPI will take them;
#   3. one version everywhere: the files' version is vqkern.__version__, CHANGELOG.md has a
#      section for it, and both files carry LICENSE and the License field.
# Usage: make release-check   (PY=<python with build and twine>, default .venv-dev's)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$root/.venv-dev/bin/python}
out="$root/dist-release"
rm -rf "$out"
# One GPU target is enough to prove the build; a published wheel takes the default two.
VQKERN_CUDA_ARCHS=${VQKERN_CUDA_ARCHS:-80} "$py" -m build --outdir "$out" "$root"
"$py" -m twine check --strict "$out"/*
"$py" - "$root" "$out" <<'PY'
import pathlib, re, sys, tarfile, zipfile

root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
version = re.search(r'^__version__ = "([^"]+)"', (root / "vqkern/__init__.py").read_text(), re.M).group(1)
sdist, = out.glob("vqkern-*.tar.gz")
wheel, = out.glob("vqkern-*.whl")
for f in (sdist, wheel):
    assert f.name.startswith(f"vqkern-{version}"), f"{f.name} is not version {version}"
assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", (root / "CHANGELOG.md").read_text(), re.M), \
    f"CHANGELOG.md has no '## [{version}] - YYYY-MM-DD' section"
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), \
        "the wheel carries no LICENSE"
with tarfile.open(sdist) as t:
    members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"LICENSE", "CHANGELOG.md"} <= members, "the sdist lacks LICENSE or CHANGELOG.md"
assert re.search(r"^License: BSD-3-Clause$|^License-Expression: BSD-3-Clause$", meta, re.M), "no BSD-3-Clause license field"
print(f"release check passed: {sdist.name}, {wheel.name}, version {version} in CHANGELOG.md, BSD-3-Clause")
PY
