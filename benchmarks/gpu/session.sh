#!/usr/bin/env bash
# One GPU call's work, run in the repo root of the GPU machine (benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/session.sh                      call 1: build tests sanitize bench
#   BUDGET=170 bash benchmarks/gpu/session.sh next      call 2 (optional, right after)
#   DRY_RUN=1 bash benchmarks/gpu/session.sh            the same script on this CPU (or --dry-run)
#
# Steps, run in the order given, each under its own time limit and never past BUDGET:
#   build      setup.py build_ext --inplace (vqkern._cpu, vqkern._C) with the machine's own
#              nvcc, VQKERN_PTXAS_VERBOSE=1: the ptxas register/spill table
#   tests      the suite's GPU cases, VQKERN_GPU_QUICK=1 (tests/gpu_quick.py): four pytest
#              processes at once (CUDA backend, Triton kernels, fuzz, public API + opcheck)
#   sanitize   compute-sanitizer memcheck over benchmarks/gpu/sanitize.py (every kernel once)
#   bench      headline shapes (65536,16384,256) and (256,1048576,256), bf16, against the bare
#              GEMM, the floor (matmul rate and copy bandwidth measured in the same process)
#              and the peers that travel; one benchmarks.run process per shape
#   racecheck  compute-sanitizer racecheck over sanitize.py
#   next       the next shapes: (65536,262144,64) and (1048576,65536,8) bf16, (65536,16384,256) fp32
#   train      python -m vqkern.train vqvae --compare, plain and EMA, TRAIN_STEPS steps each
#   pytest     python -m pytest $TEST_ARGS (a re-run after a fix)
# A step that needs vqkern._C builds it first when this call has not (a warm machine keeps it).
#
# Everything lands in $OUT (./gpu-out when unset) while it runs, so a call cut short still
# returns what it had: summary.txt (one line per step, appended as it goes; printed last),
# ptxas.txt (the build's register table) and logs.tar.gz (every log, and the result files at
# their paths in the repo; packed again after every step).
#
# Environment: BUDGET seconds for the whole command (540; the call's timeout_s a little more),
# PYTHON (python3), QUICK (1: VQKERN_GPU_QUICK for the tests), FUZZ_CASES (40: VQKERN_FUZZ_CASES for
# tests/test_fuzz.py; empty: its own default), TRAIN_STEPS (1000),
# TEST_ARGS, LIMIT_<STEP> (override a step's limit, e.g. LIMIT_TESTS=300), BENCH_SHAPES
# ("N,K,D;N,K,D" for the bench step), BENCH_DTYPES (bf16), BENCH_PASSES, BENCH_PROVIDERS,
# VQKERN_CUDA_ARCHS (90a), WORK (build/gpu-session), SITE (/tmp/site: the carried wheels).
# Dry run (DRY_RUN=1 or --dry-run): no GPU and no nvcc build; the same steps on CPU with tiny
# shapes, the Triton interpreter and a few cheap tests, sanitize.py without compute-sanitizer.
# Exit status: 0 every step passed, 1 a step failed, timed out or was skipped for time,
# 2 no CUDA device (not in a dry run), 64 bad arguments.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
START=$SECONDS

DRY=${DRY_RUN:-0}
STEPS=()
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    build|tests|sanitize|bench|racecheck|next|train|pytest) STEPS+=("$a") ;;
    *) echo "session.sh: unknown step '$a' (build tests sanitize bench racecheck next train pytest)" >&2; exit 64 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests sanitize bench)

PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-out}
WORK=${WORK:-$ROOT/build/gpu-session}
BUDGET=${BUDGET:-540}
RESERVE=${RESERVE:-20}          # seconds kept for the closing record and packing
SITE=${SITE:-/tmp/site}
FUZZ_CASES=${FUZZ_CASES-40}    # set empty: the fuzz test's own default count
TRAIN_STEPS=${TRAIN_STEPS:-1000}
LOG=$WORK/logs
SUMMARY=$OUT/summary.txt
if [ "$DRY" = 1 ]; then
  RESULTS_ROOT=$WORK/dry      # results of a dry run never land in the repo's benchmarks/results
  export TRITON_INTERPRET=1
else
  RESULTS_ROOT=$ROOT
fi
RESULTS=$RESULTS_ROOT/benchmarks/results
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Per step: seconds it must have left to start (NEED), at most (LIMIT), and the expected
# time (EXPECT) that the README's plan adds up. Estimates written before the first GPU run:
# replace them with the times the summary prints.
declare -A NEED=([build]=30 [tests]=60 [sanitize]=30 [racecheck]=30 [train]=60 [pytest]=20)
declare -A LIMIT=([build]=150 [tests]=200 [sanitize]=100 [racecheck]=100 [train]=150 [pytest]=540)
declare -A EXPECT=([build]=45 [tests]=120 [sanitize]=45 [racecheck]=45 [train]=90 [pytest]=60)
# Benchmark shapes: "N,K,D dtype passes" -> seconds expected (one process: floor rates, every
# provider warmed up, memory, 3 timed rounds; the Triton backend autotunes each new shape).
declare -A BENCH_EST=(
  ["65536,16384,256 bf16 forward,backward,train"]=110 ["256,1048576,256 bf16 forward,backward,train"]=80
  ["65536,262144,64 bf16 forward"]=60 ["1048576,65536,8 bf16 forward"]=60 ["65536,16384,256 fp32 forward"]=50)
HEADLINE="65536,16384,256;256,1048576,256"
NEXT=("65536,262144,64 bf16 forward" "1048576,65536,8 bf16 forward" "65536,16384,256 fp32 forward")
PROVIDERS=${BENCH_PROVIDERS:-vqkern-cuda,vqkern-triton,gemm,expansion,vqpt-eval,vqpt-train-beta,flash-kmeans}

mkdir -p "$OUT" "$LOG" "$RESULTS" || exit 1
rm -rf "${LOG:?}"/* "$OUT/summary.txt" "$OUT/ptxas.txt" "$OUT/logs.tar.gz"
touch "$LOG/.start"
FAILED=0

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
upper() { echo "$1" | tr '[:lower:]-' '[:upper:]_'; }

limit_of() {  # limit_of STEP: LIMIT_<STEP> from the environment, else the table
  local var
  var="LIMIT_$(upper "$1")"
  echo "${!var:-${LIMIT[$1]:-${2:-300}}}"
}

pack() {  # logs.tar.gz: every log and the result files written in this call, at repo paths
  local -a results=()
  if [ -d "$RESULTS" ]; then
    while IFS= read -r f; do results+=("${f#"$RESULTS_ROOT"/}"); done \
      < <(find "$RESULTS" -type f -newer "$LOG/.start" | sort)
  fi
  find "$LOG" -name '*.log' -size +4M -exec sh -c 'tail -c 4000000 "$1" >"$1.t" && mv "$1.t" "$1"' _ {} \;
  [ ${#results[@]} -gt 0 ] && results=(-C "$RESULTS_ROOT" "${results[@]}")
  tar -czf "$OUT/logs.tar.gz.part" --transform 's,^logs,build/gpu-session/logs,' -C "$WORK" logs \
    "${results[@]}" 2>>"$LOG/pack.err" && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

run_limited() {  # run_limited NAME LIMIT COMMAND...: one process under timeout, log in $LOG/NAME.log
  local name=$1 lim=$2
  shift 2
  echo "== $name (limit ${lim}s): $*" >"$LOG/$name.log"
  timeout -k 5 "$lim" "$@" >>"$LOG/$name.log" 2>&1
}

verdict() {  # verdict NAME RC SECONDS LIMIT: one summary line; sets FAILED
  local name=$1 rc=$2 took=$3 lim=$4 expect=${5:-}
  local tail=" (${took}s; limit ${lim}s${expect:+, expected ${expect}s})"
  case $rc in
    0) note "PASS $name$tail" ;;
    124|137) note "TIMEOUT $name$tail: killed at its limit ($LOG/$name.log)"; FAILED=1 ;;
    *) note "FAIL $name (exit $rc)$tail"; FAILED=1
       [ -f "$LOG/$name.log" ] && tail -n 4 "$LOG/$name.log" | cut -c1-200 | sed 's/^/    | /' | tee -a "$SUMMARY" ;;
  esac
}

GRANT=0
budget_for() {  # budget_for NAME NEED LIMIT: GRANT = the seconds to give a step; 1 (SKIP noted) if too few
  local name=$1 need=$2 lim=$3 have var
  var="NEED_$(upper "$name")"
  need=${!var:-$need}
  have=$(left)
  if [ "$have" -lt "$need" ]; then
    note "SKIP $name: needs about ${need}s, ${have}s left of BUDGET=${BUDGET}s"
    FAILED=1
    return 1
  fi
  [ "$have" -lt "$lim" ] && lim=$have
  GRANT=$lim
}

step() {  # step NAME COMMAND...: the table's need and limit, run, verdict, pack
  local name=$1 lim t0 rc
  shift
  budget_for "$name" "${NEED[$name]:-30}" "$(limit_of "$name")" || { pack; return 3; }
  lim=$GRANT
  t0=$SECONDS
  run_limited "$name" "$lim" "$@"
  rc=$?
  verdict "$name" "$rc" $((SECONDS - t0)) "$lim" "${EXPECT[$name]:-}"
  pack
  return $rc
}

pytest_line() {  # the closing count line of a pytest log
  grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected|xfailed|collected|tests? collected)" "$1" 2>/dev/null \
    | tail -n 1 | sed 's/^=* *//; s/ *=*$//'
}

# ---- set-up: machine, commit, carried wheels, GPU ------------------------------------------
COMMIT=$("$PY" benchmarks/gpu/tools.py commit 2>/dev/null || echo unknown)
note "# vqkern GPU session$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU)'): steps ${STEPS[*]}; BUDGET ${BUDGET}s;" \
     "commit $COMMIT; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  date -u; uname -a; nproc; free -g 2>/dev/null | head -n 2
  nvidia-smi 2>&1 | head -n 20
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
} >"$LOG/machine.txt" 2>&1

site_arg=()
if [ "$DRY" = 1 ]; then
  note "SKIP wheels: dry run, this machine's packages serve"
elif ls .whl/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  run_limited wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  verdict wheels $? $((SECONDS - t0)) 60
  export PYTHONPATH=$PYTHONPATH:$SITE   # after the repo and the image: the image's torch stays
  site_arg=("$SITE")
else
  note "FAIL wheels: no .whl/*.whl here: run benchmarks/gpu/prepare.sh before the call and carry .whl"
  FAILED=1
fi
# Versions, device, the backends' availability and the peers' imports: one Python process.
timeout 120 "$PY" benchmarks/gpu/tools.py machine "${site_arg[@]}" >"$LOG/machine-py.log" 2>&1
peers_rc=$?
head -n 1 "$LOG/machine-py.log" | cut -c1-240 | tee -a "$SUMMARY"
grep -E "^  backend " "$LOG/machine-py.log" | tee -a "$SUMMARY"
grep -E "UNMET|FAIL" "$LOG/machine-py.log" | cut -c1-200 | sed 's/^ */  /' | tee -a "$SUMMARY"
note "  peers: $(grep -E '^  (import|absent) ' "$LOG/machine-py.log" | sed 's/^  //; s/ (.*//; s/^import //' | paste -sd',' - | sed 's/,/, /g')"
if [ "$DRY" != 1 ] && [ "$peers_rc" != 0 ]; then FAILED=1; fi

HAVE_GPU=0
DEV=cpu
if [ "$DRY" != 1 ] && grep -q "capability" <(head -n 1 "$LOG/machine-py.log"); then
  HAVE_GPU=1
  DEV=cuda
  note "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader 2>&1 | head -n 1); kernel $(uname -r)"
elif [ "$DRY" != 1 ]; then
  note "NO GPU: torch sees no CUDA device here ($LOG/machine-py.log); the GPU steps are skipped"
fi
note "  set-up $((SECONDS - START))s"
pack

backends() {  # each backend's availability on this device after the build, with the reason
  timeout 90 "$PY" -c "import vqkern.backends as b
for name, (ok, why) in b.report('$DEV').items(): print(f'  backend {name} on $DEV: {\"ok\" if ok else \"UNAVAILABLE\"} ({why})')" \
    2>&1 | tail -n 5 | cut -c1-240 | tee -a "$SUMMARY"
}

# ---- steps ---------------------------------------------------------------------------------
BUILT=0
do_build() {
  local rc
  BUILT=1
  if [ "$DRY" = 1 ]; then
    note "SKIP build: dry run, no nvcc build (the extensions already in vqkern/ serve)"
    return 0
  fi
  # sm_90a only: the H200's own code (HOPPER.md), half the compile of the default 80;90a.
  step build env VQKERN_PTXAS_VERBOSE=1 VQKERN_CUDA_ARCHS="${VQKERN_CUDA_ARCHS:-90a}" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
  rc=$?
  if [ -f "$LOG/build.log" ]; then
    "$PY" benchmarks/gpu/tools.py ptxas "$LOG/build.log" >"$OUT/ptxas.txt" 2>&1
    note "  ptxas (registers, shared memory, stack frame, spills per CUDA kernel; also $OUT/ptxas.txt):"
    cut -c1-200 "$OUT/ptxas.txt" | tee -a "$SUMMARY"
  fi
  backends
  return $rc
}

ensure_built() {  # the GPU steps need vqkern._C: build it once per call unless a warm machine has it
  [ "$BUILT" = 1 ] && return 0
  if [ "$DRY" != 1 ] && [ -z "$(ls vqkern/_C"$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" 2>/dev/null)" ]; then
    do_build
  else
    BUILT=1
  fi
}

gpu_ready() {  # a GPU step runs on a GPU, or on the CPU in a dry run
  [ "$DRY" = 1 ] || [ "$HAVE_GPU" = 1 ] && return 0
  note "SKIP $1: no CUDA device visible to torch"
  FAILED=1
  return 1
}

# -v: one line per case as it finishes, so a group killed at its limit still shows which
# cases passed and failed; faulthandler names a case that hangs.
PYTEST_OPTS=(-v -rfEs --tb=short -o faulthandler_timeout=60 --durations=5)
do_tests() {
  local lim t0 name rc line quick=${QUICK:-1}
  local -a names=() pids=() args
  gpu_ready tests || return
  ensure_built
  budget_for tests "${NEED[tests]}" "$(limit_of tests)" || { pack; return; }
  lim=$GRANT
  # The groups run at once: on the GPU machine most of their time is Triton compiling on
  # the CPU (16 cores), and each process keeps its own CUDA context, so a kernel fault in
  # one group cannot fail the cases of another.
  t0=$SECONDS
  for name in cuda triton fuzz api; do
    case $name in
      cuda) args=(tests/test_cuda_backend.py -m "slow or not slow")
            [ "$DRY" = 1 ] && args+=(-k "split_choice or availability_on_cpu") ;;
      triton) args=(tests/test_triton_kernels.py)
              [ "$DRY" = 1 ] && args+=(-k "split_k_chosen or availability_reason") ;;
      fuzz) [ -f tests/test_fuzz.py ] || { note "  tests-fuzz: no tests/test_fuzz.py in this tree"; continue; }
            args=(tests/test_fuzz.py)
            [ "$DRY" = 1 ] && args+=(--collect-only) ;;  # its cases collect; running them is the CPU suite's job
      api) args=(tests/test_functional.py tests/test_library.py tests/test_modules.py)
           if [ "$DRY" = 1 ]; then args+=(-k "(cuda or triton or torch) and (empty_input or k_equals_one)")
           else args+=(-k "cuda or triton or torch"); fi ;;
    esac
    run_limited "tests-$name" "$lim" env VQKERN_GPU_QUICK="$quick" ${FUZZ_CASES:+VQKERN_FUZZ_CASES="$FUZZ_CASES"} \
      "$PY" -m pytest "${args[@]}" "${PYTEST_OPTS[@]}" --junitxml="$LOG/tests-$name.xml" &
    pids+=($!)
    names+=("$name")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    name=tests-${names[$i]}
    line=$(pytest_line "$LOG/$name.log")
    verdict "$name" "$rc" $((SECONDS - t0)) "$lim" "${EXPECT[tests]}"
    if [ -n "$line" ]; then
      note "  $name: $line"
      grep -E "^(FAILED|ERROR) " "$LOG/$name.log" | head -n 12 | cut -c1-220 | sed 's/^/    /' | tee -a "$SUMMARY"
    else  # cut off before pytest's closing lines: count the per-case lines written so far
      note "  $name: cut off after $(grep -cE ' PASSED( |$)' "$LOG/$name.log") passed," \
           "$(grep -cE ' (FAILED|ERROR)( |$)' "$LOG/$name.log") failed"
      grep -E " (FAILED|ERROR)( |$)" "$LOG/$name.log" | head -n 12 | cut -c1-220 | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    grep -E "^SKIPPED" "$LOG/$name.log" | sed 's/^SKIPPED \[[0-9]*\] //' | cut -c1-160 | sort | uniq -c | sort -rn \
      | head -n 3 | sed 's/^ */    skipped x/' | tee -a "$SUMMARY"
    grep -E "VQKERN_GPU_QUICK=1:" "$LOG/$name.log" | head -n 1 | cut -c1-200 | sed 's/^/    /' | tee -a "$SUMMARY"
  done
  pack
}

sanitizer() { command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null; }

do_sanitize() {  # do_sanitize memcheck|racecheck
  local tool=$1 name san
  name=$([ "$tool" = memcheck ] && echo sanitize || echo racecheck)
  gpu_ready "$name" || return
  ensure_built
  if [ "$DRY" = 1 ]; then
    # No sanitizer on CPU: the same launcher script on the CPU backends, interpreter shapes.
    step "$name" "$PY" benchmarks/gpu/sanitize.py --device cpu --backends torch,triton --small
  else
    san=$(sanitizer)
    if [ -z "$san" ]; then
      note "FAIL $name: compute-sanitizer not found (PATH, \$CUDA_HOME/bin): the kernels run once without it"
      FAILED=1
      step "$name-plain" "$PY" benchmarks/gpu/sanitize.py --device cuda --backends cuda,triton
      return
    fi
    step "$name" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 1 \
      --target-processes all --print-limit 50 "$PY" benchmarks/gpu/sanitize.py --device cuda --backends cuda,triton
  fi
  [ -f "$LOG/$name.log" ] || return
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|^sanitize.py:" "$LOG/$name.log" | sed 's/^/  /' | tee -a "$SUMMARY"
  grep -E "^FAIL " "$LOG/$name.log" | head -n 8 | cut -c1-220 | sed 's/^/    /' | tee -a "$SUMMARY"
}

bench_one() {  # bench_one "N,K,D" DTYPE PASSES: one benchmarks.run process
  local shape=$1 dtype=$2 passes=$3 tag est lim t0 rc dev_args=(--device cuda)
  tag=${shape//,/x}-$dtype
  est=${BENCH_EST["$shape $dtype $passes"]:-90}
  if [ "$DRY" = 1 ]; then
    dev_args=(--device cpu --reps 2)
    est=60   # most of it the runner's CPU floor measurement (4096^3 matmuls) on a busy host
  fi
  budget_for "bench-$tag" "$est" "$(limit_of bench $((est * 2)))" || return
  lim=$GRANT
  t0=$SECONDS
  TRITON_PRINT_AUTOTUNING=1 run_limited "bench-$tag" "$lim" "$PY" -m benchmarks.run "${dev_args[@]}" \
    --shapes "$shape" --dtypes "$dtype" --passes "$passes" --providers "$PROVIDERS" \
    --name "gpu-$tag" --no-plots --out "$RESULTS"
  rc=$?
  verdict "bench-$tag" "$rc" $((SECONDS - t0)) "$lim" "$est"
  pack
}

do_bench() {  # do_bench "N,K,D dtype passes"...
  local item files
  local -a parts
  gpu_ready bench || return
  ensure_built
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG/gpu-before.txt" 2>&1
  for item in "$@"; do
    read -ra parts <<<"$item"
    bench_one "${parts[0]}" "${parts[1]}" "${parts[2]}"
  done
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG/gpu-after.txt" 2>&1
  files=$(find "$RESULTS" -name '*.json' -newer "$LOG/.start" 2>/dev/null | sort)
  if [ -n "$files" ]; then
    # shellcheck disable=SC2086  # one argument per file; the paths have no spaces
    "$PY" benchmarks/gpu/tools.py fix-commit $files >>"$LOG/fix-commit.log" 2>&1
    # shellcheck disable=SC2086
    "$PY" benchmarks/gpu/tools.py bench-summary $files 2>&1 | cut -c1-220 | tee -a "$SUMMARY"
  fi
  pack
}

do_train() {
  local data=.gpudata/fashion-mnist kind
  local -a cmd
  gpu_ready train || return
  if [ ! -d "$data" ]; then
    note "FAIL train: no $data here: run WITH_TRAIN_DATA=1 benchmarks/gpu/prepare.sh and carry .gpudata"
    FAILED=1
    return
  fi
  ensure_built
  for kind in plain ema; do
    cmd=("$PY" -m vqkern.train vqvae --compare --device "$DEV" --data "$data" --steps "$TRAIN_STEPS"
         --no-progress --out "$WORK/train-$kind")
    [ "$kind" = ema ] && cmd+=(--ema --dead-code-threshold 1)
    NEED[train-$kind]=${NEED[train]}; LIMIT[train-$kind]=$(( $(limit_of train) / 2 )); EXPECT[train-$kind]=$((EXPECT[train] / 2))
    step "train-$kind" "${cmd[@]}" || continue
    RESULTS_DIR=$RESULTS "$PY" benchmarks/gpu/tools.py train-record "$WORK/train-$kind" "train-compare-$kind" \
      "python -m vqkern.train ${cmd[*]:3}" 2>&1 | tee -a "$SUMMARY"
    cp "$WORK/train-$kind/compare.jsonl" "$LOG/train-$kind-curves.jsonl" 2>/dev/null
  done
  pack
}

do_pytest() {
  gpu_ready pytest || return
  ensure_built
  # shellcheck disable=SC2086  # TEST_ARGS is a list of arguments
  VQKERN_GPU_QUICK=${QUICK:-0} step pytest "$PY" -m pytest "${PYTEST_OPTS[@]}" ${TEST_ARGS:-tests}
  [ -f "$LOG/pytest.log" ] && note "  pytest ${TEST_ARGS:-tests}: $(pytest_line "$LOG/pytest.log")"
}

headline() {  # the bench step's shapes: BENCH_SHAPES or the two headline shapes
  local s dtype=${BENCH_DTYPES:-bf16} passes=${BENCH_PASSES:-forward,backward,train} d
  local -a shapes
  if [ "$DRY" = 1 ]; then
    echo "300,70,8 fp32 forward"
    return
  fi
  IFS=';' read -ra shapes <<<"${BENCH_SHAPES:-$HEADLINE}"
  for s in "${shapes[@]}"; do
    for d in ${dtype//,/ }; do echo "$s $d $passes"; done
  done
}

for s in "${STEPS[@]}"; do
  case $s in
    build) do_build ;;
    tests) do_tests ;;
    sanitize) do_sanitize memcheck ;;
    racecheck) do_sanitize racecheck ;;
    bench) mapfile -t items < <(headline); do_bench "${items[@]}" ;;
    next) if [ "$DRY" = 1 ]; then do_bench "200,50,4 fp32 forward"; else do_bench "${NEXT[@]}"; fi ;;
    train) do_train ;;
    pytest) do_pytest ;;
  esac
done

note "# done: $((SECONDS - START))s of BUDGET ${BUDGET}s; $([ "$FAILED" = 0 ] && echo 'every step passed' || echo 'NOT ALL PASSED')"
# The summary with its provenance, among the results (and so in logs.tar.gz).
# 15 s on the GPU machine (inside RESERVE); a busy CPU host may take longer to import torch.
rec_limit=15
[ "$DRY" = 1 ] && rec_limit=90
[ "$DRY" = 1 ] || [ "$HAVE_GPU" = 1 ] && RESULTS_DIR=$RESULTS timeout "$rec_limit" "$PY" benchmarks/gpu/tools.py session-record "$SUMMARY" \
  "$([ "$DRY" = 1 ] && echo 'DRY_RUN=1 ')bash benchmarks/gpu/session.sh ${STEPS[*]}" >"$LOG/record.log" 2>&1
pack
echo
echo "================ summary ($OUT/summary.txt) ================"
cat "$SUMMARY"
for f in "$OUT"/*; do printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"; done
if [ "$DRY" != 1 ] && [ "$HAVE_GPU" != 1 ]; then exit 2; fi
exit $FAILED
