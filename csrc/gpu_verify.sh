#!/usr/bin/env bash
# Full GPU verification of the CUDA and Triton backends, for a lease longer than the
# 15-minute one that benchmarks/gpu/README.md plans for: the session script's build, check, tests,
# sanitize and racecheck steps with the full test grids (QUICK=0, the slow cases included
# for the CUDA backend), no benchmark, and limits sized for the full grids.
#
#   csrc/gpu_verify.sh [PYTHON] [OUT]     (defaults: python3, build/gpu-verify)
#
# Everything else (time budget, per-step limits, summary.txt, ptxas.txt and logs.tar.gz in
# OUT, exit status) is benchmarks/gpu/session.sh's; BUDGET (default 1800 s) and LIMIT_<STEP>
# override as there. DRY_RUN=1 runs it on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHON=${1:-${PYTHON:-python3}}
export OUT=${2:-${OUT:-$PWD/build/gpu-verify}}
export QUICK=0 BUDGET=${BUDGET:-1800} FUZZ_CASES=${FUZZ_CASES-}   # empty: the fuzz test's own count
export LIMIT_TESTS=${LIMIT_TESTS:-1200} LIMIT_SANITIZE=${LIMIT_SANITIZE:-300} LIMIT_RACECHECK=${LIMIT_RACECHECK:-300}
exec bash benchmarks/gpu/session.sh build check tests sanitize racecheck
