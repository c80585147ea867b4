#!/usr/bin/env bash
# One GPU call's work, in the repo root of the GPU machine (see benchmarks/gpu/README.md):
#
#   benchmarks/gpu/session.sh PHASE...      (at most 4 phases; default: verify)
#
#   verify    build with the ptxas register/spill report and run csrc/gpu_verify.sh (CUDA tests,
#             core suite on the cuda and triton backends, compute-sanitizer memcheck + racecheck),
#             then the rest of the test suite on the GPU
#   sanitize  only gpu_verify.sh's two compute-sanitizer runs (when verify ran out of time first)
#   bench1    benchmark sweep, shapes (65536,16384,256) and (65536,262144,64)
#   bench2    benchmark sweep, the other five GPU shapes of benchmarks/run.py
#   bench     all seven shapes, or those of BENCH_SHAPES="N,K,D;N,K,D"
#   train     python -m vqkern.train vqvae --compare, plain and EMA, TRAIN_STEPS steps each
#   test      build, then python -m pytest $TEST_ARGS (a re-run after a fix, e.g.
#             TEST_ARGS="tests/test_cuda_backend.py -x -k split")
#   all       verify bench train (needs BUDGET of about an hour: not for one 10-minute call)
#
# Needs the carried folders made by benchmarks/gpu/prepare.sh: .whl (peers' wheels) and
# .gpudata (Fashion-MNIST subset, commit stamp). Everything lands under $OUT (./gpu-out when
# unset): per phase PHASE.tar.gz (logs, and results at their paths in the repo) and PHASE.txt
# (the summary, also printed last). Each benchmark shape is its own process writing
# benchmarks/results/<device>/<date>-full-NxKxD.{json,md}, so one shape that runs out of time
# loses only itself; tools.py merge joins the parts afterwards.
#
# Environment: BUDGET seconds for the whole command (default 540: the call's limit is 600, and
# the packing must happen before it), PYTHON (python3), TRAIN_STEPS (3000), BENCH_SHAPES,
# BENCH_ARGS (extra arguments for benchmarks.run, e.g. "--dtypes bf16"), TEST_ARGS.
# Exit status: 0 all passed, 1 a step failed or ran out of time, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
RESERVE=30                      # seconds kept back for the summary and the packing
TRAIN_STEPS=${TRAIN_STEPS:-3000}
WORK=build/gpu-session
START=$SECONDS
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Shape -> seconds it is expected to need (both dtypes, all passes, all providers, one process).
# Guesses written before any GPU run: replace them with the measured times that the summary
# prints ("PASS bench-... (Ns)"). A shape is not started when less than this is left.
declare -A BENCH_EST=(
  [65536,16384,256]=200 [65536,262144,64]=180 [1048576,65536,8]=150 [256,1048576,256]=180
  [16384,1024,64]=60 [65536,4096,64]=70 [65536,65536,64]=150)
BENCH1="65536,16384,256;65536,262144,64"
BENCH2="1048576,65536,8;256,1048576,256;65536,65536,64;65536,4096,64;16384,1024,64"

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(verify)
[ "${PHASES[*]}" = all ] && PHASES=(verify bench train)
if [ ${#PHASES[@]} -gt 4 ]; then  # two files per phase, and a call returns at most 8
  echo "session.sh: at most 4 phases per call, got ${#PHASES[*]}" >&2; exit 64
fi
for p in "${PHASES[@]}"; do
  case $p in verify|sanitize|bench|bench1|bench2|train|test) ;;
    *) echo "session.sh: unknown phase '$p' (verify sanitize bench bench1 bench2 train test all)" >&2; exit 64;; esac
done
mkdir -p "$OUT" "$WORK/logs"

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=0

step() {  # step NAME SECONDS_NEEDED COMMAND...: run in what is left of the budget, log, record
  local name=$1 need=$2 t0=$SECONDS rc log
  shift 2
  log=$LOG/$name.log
  if [ "$(left)" -lt "$need" ]; then
    note "SKIP $name: needs about ${need}s, $(left)s left of BUDGET=$BUDGET"
    return 3
  fi
  echo "== $name: $*" | tee "$log"
  timeout -k 10 "$(left)" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) note "PASS $name ($((SECONDS - t0))s)" ;;
    124|137) note "TIMEOUT $name after $((SECONDS - t0))s: the budget ran out ($log)"; FAILED=1 ;;
    *) note "FAIL $name (exit $rc, $((SECONDS - t0))s; tail of $log below)"; FAILED=1
       tail -n 5 "$log" | cut -c1-200 | sed 's/^/    | /' | tee -a "$SUMMARY" ;;
  esac
  return $rc
}

gpu_step() {  # step, or a SKIP line when torch sees no CUDA device
  if [ "$HAVE_GPU" != 1 ]; then note "SKIP $1: no CUDA device visible to torch"; return 3; fi
  step "$@"
}

pytest_line() {  # the closing line of a pytest log, for the summary
  [ -f "$1" ] && grep -E "[0-9]+ (passed|failed|error|skipped|deselected)" "$1" | tail -n 1 | sed 's/^=* *//; s/ *=*$//'
}

# ---- set-up, once per call: environment, carried wheels, GPU ----------------------------------
begin() {  # begin NAME: a phase's log folder, summary and start marker
  PHASE=$1
  LOG=$WORK/logs/$PHASE
  SUMMARY=$LOG/summary.txt
  rm -rf "$LOG"
  mkdir -p "$LOG"
  touch "$LOG/.start"
  note "## $PHASE (commit $COMMIT; $(left)s of BUDGET=$BUDGET left)"
}

COMMIT=$("$PY" benchmarks/gpu/tools.py commit 2>/dev/null || echo unknown)
begin setup
{
  date -u
  "$PY" -c "import sys; print(sys.version)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer
} >"$LOG/machine.txt" 2>&1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  step peers 10 "$PY" benchmarks/gpu/tools.py check-site /tmp/site
  grep -sE "UNMET|FAIL" "$LOG/peers.log" | sed 's/^ */  /' | tee -a "$SUMMARY"
  note "  peers: $(grep -s "^  import" "$LOG/peers.log" | sed 's/^  import [^:]*: //; s/ (.*//' | paste -sd, -)"
else
  note "FAIL wheels: no .whl/*.whl here: run benchmarks/gpu/prepare.sh before the call and carry .whl"
  FAILED=1
fi
HAVE_GPU=0
if timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  HAVE_GPU=1
  note "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader 2>&1 | head -n 1); kernel $(uname -r)"
  note "$(timeout 60 "$PY" -c "import torch, triton; p = torch.cuda.get_device_properties(0)
print(f'{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}; '
      f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>&1 | tail -n 1)"
else
  note "NO GPU: torch sees no CUDA device here; the GPU steps below are skipped"
fi
backends() {  # each backend's availability on CUDA tensors, with the reason
  timeout 120 "$PY" -c "import vqkern.backends as b
for name, (ok, why) in b.report('cuda').items(): print(f'  backend {name}: {\"ok\" if ok else \"UNAVAILABLE\"} ({why})')" \
    2>&1 | tail -n 4 | tee -a "$SUMMARY"
}
BUILT=0
build() {  # the editable install (both extensions), once per call
  [ "$BUILT" = 1 ] && return 0
  gpu_step build 60 "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  BUILT=1
  backends
}
SETUP_SUMMARY=$SUMMARY

# ---- phases -----------------------------------------------------------------------------------
phase_verify() {
  local v=$LOG/gpu_verify s line
  # gpu_verify.sh builds (with VQKERN_PTXAS_VERBOSE=1), tests and runs the sanitizers, in that order.
  gpu_step gpu_verify 240 bash csrc/gpu_verify.sh "$PY" "$v"
  if [ -f "$v/summary.txt" ]; then
    grep -q "PASS build" "$v/summary.txt" && BUILT=1 && backends
    for s in build cuda_tests suite_cuda suite_triton sanitizer_memcheck sanitizer_racecheck; do
      line=$(grep -E "^(PASS|FAIL) $s( |$)" "$v/summary.txt" | cut -d' ' -f1)
      note "  gpu_verify $s: ${line:-NOT REACHED} $(pytest_line "$v/$s.log")"
    done
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$v"/sanitizer_*.log 2>/dev/null | sed 's/^/  /' | tee -a "$SUMMARY"
    note "  ptxas (registers, shared memory, stack frame, spills per CUDA kernel):"
    "$PY" benchmarks/gpu/tools.py ptxas "$v/build.log" 2>&1 | tee -a "$SUMMARY"
  fi
  # Tests outside the backend-parametrized selections (auto backend, modules, compat, training).
  gpu_step suite_other 120 "$PY" -m pytest tests -q -k "not cuda and not triton" -rs
  [ -f "$LOG/suite_other.log" ] && note "  suite_other: $(pytest_line "$LOG/suite_other.log")"
  cat "$SETUP_SUMMARY" "$SUMMARY" >"$LOG/record.txt"
  [ "$HAVE_GPU" = 1 ] && "$PY" benchmarks/gpu/tools.py verify-record "$LOG/record.txt" \
    benchmarks/gpu/session.sh verify 2>&1 | tee -a "$LOG/verify-record.log"
}

phase_sanitize() {
  local san tool
  build || return
  san=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  for tool in memcheck racecheck; do  # the same runs as csrc/gpu_verify.sh's last two steps
    gpu_step "sanitizer_$tool" 120 "$san" --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest tests/test_cuda_backend.py -q -x -m "not slow"
    [ -f "$LOG/sanitizer_$tool.log" ] && note "  $tool: $(pytest_line "$LOG/sanitizer_$tool.log")" && \
      grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/sanitizer_$tool.log" | sed 's/^/  /' | tee -a "$SUMMARY"
  done
}

phase_bench() {  # phase_bench "N,K,D;N,K,D"
  local shapes=$1 shape tag files
  local -a list
  build || return
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG/gpu-before.txt" 2>&1
  IFS=';' read -ra list <<<"$shapes"
  for shape in "${list[@]}"; do
    tag=${shape//,/x}
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    gpu_step "bench-$tag" "${BENCH_EST[$shape]:-120}" "$PY" -m benchmarks.run --device cuda \
      --shapes "$shape" --name "full-$tag" --no-plots ${BENCH_ARGS:-}
  done
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG/gpu-after.txt" 2>&1
  files=$(find benchmarks/results -name '*.json' -newer "$LOG/.start" | sort)
  if [ -n "$files" ]; then
    # shellcheck disable=SC2086  # one argument per file; the paths have no spaces
    "$PY" benchmarks/gpu/tools.py fix-commit $files >>"$LOG/fix-commit.log" 2>&1
    # shellcheck disable=SC2086
    "$PY" benchmarks/gpu/tools.py bench-summary $files 2>&1 | tee -a "$SUMMARY"
  fi
}

phase_train() {
  local data=.gpudata/fashion-mnist kind cmd
  if [ ! -d "$data" ]; then
    note "FAIL train: no $data here: run benchmarks/gpu/prepare.sh before the call and carry .gpudata"
    FAILED=1
    return
  fi
  build || return
  for kind in plain ema; do
    cmd=("$PY" -m vqkern.train vqvae --compare --device cuda --data "$data" --steps "$TRAIN_STEPS"
         --no-progress --out "$WORK/train-$kind")
    [ "$kind" = ema ] && cmd+=(--ema --dead-code-threshold 1)
    gpu_step "train-$kind" 90 "${cmd[@]}" || continue
    "$PY" benchmarks/gpu/tools.py train-record "$WORK/train-$kind" "train-compare-$kind" \
      "python -m vqkern.train ${cmd[*]:3}" 2>&1 | tee -a "$SUMMARY"
    cp "$WORK/train-$kind/compare.jsonl" "$LOG/train-$kind-curves.jsonl" 2>/dev/null
  done
}

phase_test() {
  build || return
  # shellcheck disable=SC2086  # TEST_ARGS is a list of arguments
  gpu_step pytest 30 "$PY" -m pytest -q -rs ${TEST_ARGS:-tests}
  [ -f "$LOG/pytest.log" ] && note "  pytest ${TEST_ARGS:-tests}: $(pytest_line "$LOG/pytest.log")"
}

pack() {  # PHASE.tar.gz: set-up and phase logs plus the results written during the phase
  local results
  results=$(find benchmarks/results -type f -newer "$LOG/.start" 2>/dev/null | sort)
  find "$WORK/logs" -name '*.log' -size +8M -exec sh -c 'tail -n 20000 "$1" >"$1.tail" && mv "$1.tail" "$1"' _ {} \;
  # shellcheck disable=SC2086  # one argument per result file
  tar -czf "$OUT/$PHASE.tar.gz" "$WORK/logs/setup" "$LOG" $results
  cat "$SETUP_SUMMARY" "$SUMMARY" >"$OUT/$PHASE.txt"
}

# Set-up's own summary goes with every phase.
for p in "${PHASES[@]}"; do
  begin "$p"
  case $p in
    verify) phase_verify ;;
    sanitize) phase_sanitize ;;
    bench) phase_bench "${BENCH_SHAPES:-$BENCH1;$BENCH2}" ;;
    bench1) phase_bench "$BENCH1" ;;
    bench2) phase_bench "$BENCH2" ;;
    train) phase_train ;;
    test) phase_test ;;
  esac
  note "## $p done at $((SECONDS - START))s"
  pack
done

echo
echo "================ summary (also in $OUT/*.txt) ================"
cat "$SETUP_SUMMARY"
for p in "${PHASES[@]}"; do grep -v '^$' "$WORK/logs/$p/summary.txt"; done
for f in "$OUT"/*; do printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"; done
[ "$HAVE_GPU" = 1 ] || exit 2
exit $FAILED
