#!/usr/bin/env bash
# GPU verification of the CUDA backend (issue 3): build with the machine's own torch,
# run the CUDA tests and the core suite on the cuda and triton backends, then
# compute-sanitizer memcheck and racecheck over the CUDA backend tests.
# Usage: csrc/gpu_verify.sh [PYTHON] [LOG_DIR]   (defaults: python, build/gpu-verify)
# Exit status is non-zero if any step fails; every step's log stays in LOG_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
LOG=${2:-build/gpu-verify}
mkdir -p "$LOG"
status=0
step() {  # step NAME COMMAND...: run, tee the log, record pass/fail
  local name=$1; shift
  echo "== $name: $*" | tee "$LOG/$name.log"
  if "$@" >>"$LOG/$name.log" 2>&1; then echo "PASS $name" | tee -a "$LOG/summary.txt"
  else echo "FAIL $name (see $LOG/$name.log)" | tee -a "$LOG/summary.txt"; status=1; fi
}
: >"$LOG/summary.txt"
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$LOG/device.txt"
nvidia-smi >>"$LOG/device.txt" 2>&1 || true
step build env VQKERN_PTXAS_VERBOSE=1 "$PY" -m pip install -v --no-build-isolation -e .
step cuda_tests "$PY" -m pytest tests/test_cuda_backend.py -q -m "slow or not slow" -rs
step suite_cuda "$PY" -m pytest tests -q -k "cuda" -rs
step suite_triton "$PY" -m pytest tests -q -k "triton" -rs
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
for tool in memcheck racecheck; do
  step "sanitizer_$tool" "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
    "$PY" -m pytest tests/test_cuda_backend.py -q -x -m "not slow"
done
cat "$LOG/summary.txt"
exit $status
