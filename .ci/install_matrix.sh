#!/usr/bin/env bash
# Every install command of docs/getting-started.md's Install section, each from a fresh clone of this
# checkout's HEAD into a fresh venv that already has torch, with and without build isolation,
# with nvcc (vqkern._C built) and without (VQKERN_SKIP_CUDA_BUILD=1: _C absent, reported).
# After each: torch untouched (same version, same file), import from outside the clone,
# __version__, the extensions present or absent as expected, backends.report.
# Not part of CI (about 20 minutes on 2 cores: a torch install per venv); run by hand:
#   bash .ci/install_matrix.sh [WORKDIR]      (VQKERN_MATRIX_CASES="A C" runs a subset)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/vqkern-matrix.XXXXXX)}
python=${PYTHON:-python3}
torch_spec=${VQKERN_SMOKE_TORCH:-torch==2.13.0}
cases=${VQKERN_MATRIX_CASES:-A B C D E F}
mkdir -p "$work"
results="$work/results.txt"
: > "$results"
start=$SECONDS

log() { printf '\n== matrix (%ss): %s\n' "$((SECONDS - start))" "$*"; }

fresh_venv() {  # fresh_venv NAME [extra packages...]: a new venv with torch (and build tools)
  local venv="$work/$1"; shift
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$torch_spec" "$@"
  "$venv/bin/python" -m pip freeze | grep -i '^torch==' > "$venv/.torch-before"
  "$venv/bin/python" -c 'import os, torch; print(os.stat(torch.__file__).st_ino)' >> "$venv/.torch-before"
}

fresh_clone() {  # fresh_clone NAME: a clone of HEAD, as a user gets it
  rm -rf "$work/$1"
  git clone -q "$src" "$work/$1"
}

check() {  # check LABEL VENV EXPECT_C(0/1) WHERE(site|tree)
  local label=$1 venv="$work/$2" want_c=$3 where=$4
  local now
  now=$("$venv/bin/python" -m pip freeze | grep -i '^torch==')
  now+=$'\n'$("$venv/bin/python" -c 'import os, torch; print(os.stat(torch.__file__).st_ino)')
  if [ "$now" != "$(cat "$venv/.torch-before")" ]; then
    echo "FAIL $label: torch changed: $(tr '\n' ' ' < "$venv/.torch-before") -> $now" | tee -a "$results"
    return 1
  fi
  if (cd "$work" && "$venv/bin/python" - "$venv" "$want_c" "$where" <<'PY'
import importlib.util, pathlib, sys
import vqkern
venv, want_c, where = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
loc = pathlib.Path(vqkern.__file__).resolve()
assert (venv in loc.parents) == (where == "site"), f"vqkern imported from {loc}"
cpu, cuda = importlib.util.find_spec("vqkern._cpu"), importlib.util.find_spec("vqkern._C")
assert cpu is not None, "vqkern._cpu missing"
assert (cuda is not None) == want_c, f"vqkern._C present: {cuda is not None}, expected {want_c}"
report = vqkern.backends.report("cuda")
reason = report["cuda"][1]
assert ("not built" in reason) == (not want_c), reason
print(f"vqkern {vqkern.__version__} from {loc.parent}; _cpu yes; _C {'yes' if want_c else 'no'}; "
      f"report('cuda')['cuda']: {reason}")
PY
  ); then
    echo "PASS $label" | tee -a "$results"
  else
    echo "FAIL $label" | tee -a "$results"
    return 1
  fi
}

attempt() {  # attempt LABEL COMMAND...: run, log, record a failure without stopping the matrix
  local label=$1; shift
  log "$label: $*"
  if ! "$@"; then
    echo "FAIL $label (command failed)" | tee -a "$results"
    return 1
  fi
}

nocuda=(env VQKERN_SKIP_CUDA_BUILD=1)
tools=(pybind11 cmake ninja "setuptools>=64")

for case in $cases; do
  case $case in
  A)  # isolated `pip install .`: without _C, then again in the same tree with _C, then `pip wheel .`
    fresh_venv vA; fresh_clone cA
    (cd "$work/cA" && attempt "A1 isolated pip install . (no CUDA)" "${nocuda[@]}" "$work/vA/bin/pip" install -q .) &&
      check "A1 isolated pip install . (no CUDA)" vA 0 site || true
    (cd "$work/cA" && attempt "A2 isolated pip install . again, same tree (nvcc)" "$work/vA/bin/pip" install -q .) &&
      check "A2 isolated pip install . again, same tree (nvcc)" vA 1 site || true
    (cd "$work/cA" && attempt "A3 isolated pip wheel . third build, same tree" \
      "${nocuda[@]}" "$work/vA/bin/pip" wheel -q --no-deps -w "$work/cA/wheels" .) &&
      if unzip -l "$work"/cA/wheels/vqkern-*.whl | grep -q 'vqkern/_cpu\.' &&
         ! unzip -l "$work"/cA/wheels/vqkern-*.whl | grep -q 'vqkern/_C\.'; then
        echo "PASS A3 isolated pip wheel . third build, same tree: $(ls "$work/cA/wheels"), _cpu, no _C"
      else
        echo "FAIL A3 isolated pip wheel . third build: the no-CUDA wheel lacks _cpu or holds A2's _C"
      fi | tee -a "$results" || true
    ;;
  B)  # isolated `pip install -e .`: without _C, then with _C in the same tree
    fresh_venv vB; fresh_clone cB
    (cd "$work/cB" && attempt "B1 isolated pip install -e . (no CUDA)" "${nocuda[@]}" "$work/vB/bin/pip" install -q -e .) &&
      check "B1 isolated pip install -e . (no CUDA)" vB 0 tree || true
    (cd "$work/cB" && attempt "B2 isolated pip install -e . again (nvcc)" "$work/vB/bin/pip" install -q -e .) &&
      check "B2 isolated pip install -e . again (nvcc)" vB 1 tree || true
    ;;
  C)  # isolated `pip install git+file://`
    fresh_venv vC; fresh_clone cC
    attempt "C1 isolated pip install git+file:// (no CUDA)" "${nocuda[@]}" "$work/vC/bin/pip" install -q "git+file://$work/cC" &&
      check "C1 isolated pip install git+file:// (no CUDA)" vC 0 site || true
    attempt "C2 isolated pip install git+file:// (nvcc)" "$work/vC/bin/pip" install -q --force-reinstall --no-deps "git+file://$work/cC" &&
      check "C2 isolated pip install git+file:// (nvcc)" vC 1 site || true
    ;;
  D)  # --no-build-isolation `pip install .`
    fresh_venv vD "${tools[@]}"; fresh_clone cD
    (cd "$work/cD" && attempt "D1 pip install --no-build-isolation . (nvcc)" \
      env PATH="$work/vD/bin:$PATH" "$work/vD/bin/pip" install -q --no-build-isolation .) &&
      check "D1 pip install --no-build-isolation . (nvcc)" vD 1 site || true
    (cd "$work/cD" && attempt "D2 pip install --no-build-isolation . again (no CUDA)" \
      env PATH="$work/vD/bin:$PATH" VQKERN_SKIP_CUDA_BUILD=1 "$work/vD/bin/pip" install -q --no-build-isolation .) &&
      check "D2 pip install --no-build-isolation . again (no CUDA)" vD 0 site || true
    ;;
  E)  # --no-build-isolation `pip install -e .`
    fresh_venv vE "${tools[@]}"; fresh_clone cE
    (cd "$work/cE" && attempt "E1 pip install --no-build-isolation -e . (no CUDA)" \
      env PATH="$work/vE/bin:$PATH" VQKERN_SKIP_CUDA_BUILD=1 "$work/vE/bin/pip" install -q --no-build-isolation -e .) &&
      check "E1 pip install --no-build-isolation -e . (no CUDA)" vE 0 tree || true
    (cd "$work/cE" && attempt "E2 pip install --no-build-isolation -e . again (nvcc)" \
      env PATH="$work/vE/bin:$PATH" "$work/vE/bin/pip" install -q --no-build-isolation -e .) &&
      check "E2 pip install --no-build-isolation -e . again (nvcc)" vE 1 tree || true
    ;;
  F)  # --no-build-isolation `pip install git+file://`
    fresh_venv vF "${tools[@]}"; fresh_clone cF
    attempt "F1 pip install --no-build-isolation git+file:// (nvcc)" \
      env PATH="$work/vF/bin:$PATH" "$work/vF/bin/pip" install -q --no-build-isolation "git+file://$work/cF" &&
      check "F1 pip install --no-build-isolation git+file:// (nvcc)" vF 1 site || true
    ;;
  *) echo "unknown case $case (A-F)" >&2; exit 2 ;;
  esac
done

log "done"
cat "$results"
passed=$(grep -c '^PASS' "$results" || true)
failed=$(grep -c '^FAIL' "$results" || true)
echo "install matrix: $passed passed, $failed failed in $((SECONDS - start)) s"
[ "$failed" -eq 0 ]
