#!/usr/bin/env bash
# Packaging smoke test, as a new user installs vqkern:
#   1. a fresh venv beside .venv (.venv-smoke) with torch from $VQKERN_SMOKE_TORCH (torch==2.13.0,
#      the CPU wheel pip finds on this machine's local index);
#   2. `python -m build` of this checkout with build isolation: an sdist, then a wheel built from
#      that sdist (so a file missing from the sdist fails the build);
#   3. the sdist lists the CMake project and every csrc/ source; the wheel holds vqkern._cpu
#      (and vqkern._C when nvcc is found) and no test or benchmark code;
#   4. the wheel installed into the venv leaves its torch as it was;
#   5. from outside the checkout: import, __version__, the demo on the CPU backends, and
#      vqkern.backends.report.
# Usage: bash .ci/package_smoke.sh   (VQKERN_SKIP_CUDA_BUILD=1 builds the wheel without _C)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-smoke"
dist="$root/dist"
python=${PYTHON:-python3}
torch_spec=${VQKERN_SMOKE_TORCH:-torch==2.13.0}
start=$SECONDS

step() { printf '\n== package smoke (%ss): %s\n' "$((SECONDS - start))" "$*"; }
fail() { printf '\npackage smoke FAILED: %s\n' "$*" >&2; exit 1; }
trap 'fail "command on line $LINENO exited with status $?"' ERR

nvcc_found() {
  command -v nvcc >/dev/null 2>&1 && return 0
  local home
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && return 0
  done
  return 1
}

# The same rule as setup.py: nvcc found and VQKERN_SKIP_CUDA_BUILD not set to a true value.
cuda_expected() {
  case "$(printf '%s' "${VQKERN_SKIP_CUDA_BUILD:-}" | tr '[:upper:]' '[:lower:]')" in
    1|true|yes|on) return 1 ;;
  esac
  nvcc_found
}

step "fresh venv $venv with $torch_spec"
rm -rf "$venv" "$dist"
"$python" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install -q "$torch_spec" build
torch_before=$("$vpy" -m pip freeze | grep -i '^torch==') || fail "no torch in $venv after installing $torch_spec"
torch_file=$("$vpy" -c 'import torch; print(torch.__file__)')
torch_stamp=$(stat -c '%i %Y' "$torch_file")

step "python -m build (isolated: sdist, then the wheel from the sdist)"
# One GPU target is enough to prove _C builds and ships; a release wheel takes the default two.
VQKERN_CUDA_ARCHS=${VQKERN_CUDA_ARCHS:-80} "$vpy" -m build --outdir "$dist" "$root"
sdist=$(ls "$dist"/vqkern-*.tar.gz)
wheel=$(ls "$dist"/vqkern-*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel")"

step "sdist and wheel contents"
"$vpy" - "$root" "$sdist" "$wheel" "$(cuda_expected && echo 1 || echo 0)" <<'PY'
import pathlib, re, subprocess, sys, tarfile, zipfile

root, sdist, wheel, with_cuda = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
tracked = subprocess.run(["git", "-C", str(root), "ls-files", "csrc", "vqkern", "CMakeLists.txt",
                          "setup.py", "pyproject.toml", "README.md"],
                         capture_output=True, text=True, check=True).stdout.split()
with tarfile.open(sdist) as tar:
    names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
missing = sorted(set(tracked) - names)
assert not missing, f"the sdist lacks {missing}"
assert not [n for n in names if n.endswith(".so")], "the sdist carries compiled modules"
with zipfile.ZipFile(wheel) as whl:
    files = whl.namelist()
has = lambda pattern: any(re.fullmatch(pattern, f) for f in files)
assert has(r"vqkern/_cpu\..*\.so"), f"the wheel has no vqkern/_cpu*.so: {files}"
assert has(r"vqkern/_C\..*\.so") == with_cuda, f"vqkern/_C*.so in the wheel should be {with_cuda}"
assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "csrc/"))], "the wheel carries non-package files"
print(f"sdist: {len(names)} files, every tracked csrc/ and vqkern/ file; "
      f"wheel: {len(files)} files, _cpu yes, _C {'yes' if with_cuda else 'no'}")
PY

step "pip install the wheel; torch must stay as it was"
"$vpy" -m pip install "$wheel"
torch_after=$("$vpy" -m pip freeze | grep -i '^torch==')
[ "$torch_after" = "$torch_before" ] || fail "pip replaced $torch_before by $torch_after"
[ "$(stat -c '%i %Y' "$torch_file")" = "$torch_stamp" ] || fail "pip reinstalled $torch_before"
echo "torch kept: $torch_after"

step "import, version, demo on the CPU backends, backends.report (from outside the checkout)"
cd "$(mktemp -d)"
version=$(basename "$wheel" | cut -d- -f2)
"$vpy" - "$venv" "$version" <<'PY'
import importlib.util, pathlib, sys

import vqkern

venv, version = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2]
where = pathlib.Path(vqkern.__file__).resolve()
assert venv in where.parents, f"imported vqkern from {where}, not from the installed wheel in {venv}"
assert vqkern.__version__ == version, f"vqkern.__version__ {vqkern.__version__} != wheel version {version}"
cpu = importlib.util.find_spec("vqkern._cpu")
assert cpu is not None and venv in pathlib.Path(cpu.origin).resolve().parents, "vqkern._cpu not installed"
print(f"vqkern {vqkern.__version__} from {where.parent}")
for device in ("cpu", "cuda"):
    for name, (ok, reason) in vqkern.backends.report(device).items():
        print(f"  report({device!r}) {name:<9} {'available' if ok else 'unavailable'}: {reason}")
assert vqkern.backends.report("cpu")["torch"][0]
assert "vqkern._cpu" in vqkern.backends.report("cpu")["torch"][1], "the torch backend does not use vqkern._cpu"
PY
# torch and reference are the backends that run on CPU tensors without Triton's interpreter.
"$vpy" -m vqkern.demo --device cpu --backends torch,reference --n 1024 --k 512 --d 32 --repeats 3

step "passed in $((SECONDS - start)) s"
