#!/usr/bin/env bash
# One GPU call's work, run in the repo root of the GPU machine (benchmarks/gpu/README.md):
#
#   BUDGET=450 bash benchmarks/gpu/session.sh           call 1: build check tests bench:1 sanitize bench:2
#   BUDGET=250 bash benchmarks/gpu/session.sh next      call 2: what call 1 skipped, then the grid's next items
#   DRY_RUN=1 bash benchmarks/gpu/session.sh            the same script on this CPU (or --dry-run)
#
# Steps, run in the order given, each under its own time limit, started only when its
# estimate x 1.25 fits in what is left of BUDGET (else SKIP, and `next` runs it):
#   build      setup.py build_ext --inplace with the machine's own nvcc: vqkern._C only
#              (VQKERN_SKIP_CPU_BUILD=1), VQKERN_PTXAS_VERBOSE=1: the ptxas register/spill table
#   check      python -m vqkern.check on the device, its JSON into $OUT/check.json
#   tests      the suite's GPU cases, VQKERN_GPU_QUICK=1 (tests/gpu_quick.py): five pytest
#              processes at once (CUDA backend, Triton kernels, every search config of the
#              Triton search launched on its own, fuzz, public API + opcheck)
#   sanitize   compute-sanitizer memcheck over benchmarks/gpu/sanitize.py (every kernel once,
#              one search config pinned: no autotuning sweep under the sanitizer)
#   bench:N    item N (number or name) of the GPU grid (python -m benchmarks.gpu_grid): one
#              benchmarks.run process, every provider's codes checked before it is timed, the
#              floor from the matmul rate and copy bandwidth measured in the same process
#   bench      every grid item in order, while time is left
#   next       what an earlier call of this machine skipped ($WORK/state.txt, or
#              .gpudata/state.txt carried from call 1's $OUT), then the grid items not run yet
#   racecheck  compute-sanitizer racecheck over sanitize.py
#   train      python -m vqkern.train vqvae --compare, plain and EMA, TRAIN_STEPS steps each
#   pytest     python -m pytest $TEST_ARGS (a re-run after a fix)
# A step that needs vqkern._C builds it first when this call has not (a warm machine keeps it).
#
# Everything lands in $OUT (./gpu-out when unset) while it runs, so a call cut short still
# returns what it had: summary.txt (one line per step, appended as it goes; printed last),
# state.txt (each step's verdict: what `next` reads), ptxas.txt (the build's register table),
# check.json (vqkern.check's report) and logs.tar.gz (every log, and the result files at
# their paths in the repo; packed again after every step). A benchmark's JSON is rewritten
# after every case, so a bench step killed at its limit keeps what it measured.
#
# Environment: BUDGET seconds for the whole command (450; the call's timeout_s 20 more),
# PYTHON (python3), QUICK (1: VQKERN_GPU_QUICK for the tests), FUZZ_CASES (40: VQKERN_FUZZ_CASES for
# tests/test_fuzz.py; empty: its own default), TRAIN_STEPS (1000), TEST_ARGS,
# LIMIT_<STEP> and NEED_<STEP> (override a step's limit and the time it needs to start, e.g.
# LIMIT_TESTS=300, NEED_BENCH_1=60), BENCH_PROVIDERS (narrow every bench item's providers),
# VQKERN_CUDA_ARCHS (90a), WORK (build/gpu-session), SITE (/tmp/site: the carried wheels),
# CARRIED_STATE (.gpudata/state.txt: call 1's state.txt when the machine of call 2 is not warm).
# Dry run (DRY_RUN=1 or --dry-run): no GPU and no nvcc build; the same steps on CPU with tiny
# shapes, the Triton interpreter and a few cheap tests, sanitize.py without compute-sanitizer.
# Exit status: 0 every step passed, 1 a step failed, timed out or was skipped for time,
# 2 no CUDA device (not in a dry run), 64 bad arguments.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
START=$SECONDS
PY=${PYTHON:-python3}

# The GPU grid (benchmarks/gpu_grid.py, no torch import): "number name seconds target...".
declare -A ITEM_NAME ITEM_EST
while read -r num name est _; do
  ITEM_NAME[$num]=$name
  ITEM_EST[$num]=$est
done < <("$PY" -m benchmarks.gpu_grid 2>/dev/null)
GRID_SIZE=${#ITEM_NAME[@]}

item_number() {  # item_number NUMBER|NAME: the grid item's number, or nothing
  local n
  for n in "${!ITEM_NAME[@]}"; do
    if [ "$1" = "$n" ] || [ "$1" = "${ITEM_NAME[$n]}" ]; then echo "$n"; return; fi
  done
}

DRY=${DRY_RUN:-0}
STEPS=()
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    build|check|tests|sanitize|racecheck|next|train|pytest) STEPS+=("$a") ;;
    bench) for n in $(seq 1 "$GRID_SIZE"); do STEPS+=("bench:$n"); done ;;
    bench:*) n=$(item_number "${a#bench:}")
             if [ -z "$n" ]; then
               echo "session.sh: no GPU grid item '${a#bench:}' (python -m benchmarks.gpu_grid lists them)" >&2; exit 64
             fi
             STEPS+=("bench:$n") ;;
    *) echo "session.sh: unknown step '$a' (build check tests sanitize bench bench:N next racecheck train pytest)" >&2
       exit 64 ;;
  esac
done
[ "$GRID_SIZE" -gt 0 ] || { echo "session.sh: python -m benchmarks.gpu_grid listed no items" >&2; exit 64; }
CALL1=(build check tests bench:1 sanitize bench:2)
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${CALL1[@]}")

OUT=${OUT:-$ROOT/gpu-out}
WORK=${WORK:-$ROOT/build/gpu-session}
BUDGET=${BUDGET:-450}
RESERVE=${RESERVE:-20}          # seconds kept for the closing record and packing
SITE=${SITE:-/tmp/site}
FUZZ_CASES=${FUZZ_CASES-40}    # set empty: the fuzz test's own default count
TRAIN_STEPS=${TRAIN_STEPS:-1000}
LOG=$WORK/logs
SUMMARY=$OUT/summary.txt
STATE=$WORK/state.txt
CARRIED_STATE=${CARRIED_STATE:-$ROOT/.gpudata/state.txt}  # call 1's state.txt, copied here before call 2
if [ "$DRY" = 1 ]; then
  RESULTS_ROOT=$WORK/dry      # results of a dry run never land in the repo's benchmarks/results
  export TRITON_INTERPRET=1
else
  RESULTS_ROOT=$ROOT
fi
RESULTS=$RESULTS_ROOT/benchmarks/results
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Per step: the expected seconds (EXPECT; a step starts only when EXPECT x 1.25 is left,
# NEED_<STEP> overrides) and its limit (LIMIT). Estimates written before the first GPU run,
# from a local sm_90a build and the CPU dry run: replace them with the times the summary
# prints. The bench items' estimates are the grid's (benchmarks/gpu_grid.py), limit twice that.
declare -A LIMIT=([build]=120 [check]=100 [tests]=160 [sanitize]=90 [racecheck]=90 [train]=150 [pytest]=540)
declare -A EXPECT=([build]=45 [check]=60 [tests]=120 [sanitize]=45 [racecheck]=45 [train]=90 [pytest]=60)
if [ "$DRY" = 1 ]; then  # two busy CPU cores and the Triton interpreter
  LIMIT+=([check]=240 [tests]=400 [sanitize]=300 [racecheck]=300)
  EXPECT+=([check]=60 [tests]=120 [sanitize]=60 [racecheck]=60)
fi

mkdir -p "$OUT" "$LOG" "$RESULTS" || exit 1
rm -rf "${LOG:?}"/* "$OUT/summary.txt" "$OUT/ptxas.txt" "$OUT/logs.tar.gz" "$OUT/check.json" "$OUT/state.txt"
touch "$LOG/.start"
FAILED=0

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
upper() { echo "$1" | tr '[:lower:]:-' '[:upper:]__'; }
need_of() { local var; var="NEED_$(upper "$1")"; echo "${!var:-$(( (${2:-30} * 5 + 3) / 4 ))}"; }

limit_of() {  # limit_of STEP [DEFAULT]: LIMIT_<STEP> from the environment, else the table
  local var
  var="LIMIT_$(upper "$1")"
  echo "${!var:-${LIMIT[$1]:-${2:-300}}}"
}

record() {  # record VERDICT STEP: one line of $STATE (what `next` reads), copied into $OUT
  echo "$1 $2" >>"$STATE"
  cp "$STATE" "$OUT/state.txt"
}

pack() {  # logs.tar.gz: every log and the result files written in this call, at repo paths
  local -a results=()
  if [ -d "$RESULTS" ]; then
    while IFS= read -r f; do results+=("${f#"$RESULTS_ROOT"/}"); done \
      < <(find "$RESULTS" -type f -newer "$LOG/.start" ! -name '.*' | sort)
  fi
  find "$LOG" -name '*.log' -size +4M -exec sh -c 'tail -c 4000000 "$1" >"$1.t" && mv "$1.t" "$1"' _ {} \;
  [ ${#results[@]} -gt 0 ] && results=(-C "$RESULTS_ROOT" "${results[@]}")
  tar -czf "$OUT/logs.tar.gz.part" --transform 's,^logs,build/gpu-session/logs,' -C "$WORK" logs \
    "${results[@]}" 2>>"$LOG/pack.err" && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

run_limited() {  # run_limited NAME LIMIT COMMAND...: one process under timeout, log in $LOG/NAME.log
  local name=$1 lim=$2
  shift 2
  echo "== $name (limit ${lim}s): $*" >"$LOG/${name//:/-}.log"
  timeout -k 5 "$lim" "$@" >>"$LOG/${name//:/-}.log" 2>&1
}

verdict() {  # verdict NAME RC SECONDS LIMIT [EXPECT]: one summary line, one state line; sets FAILED
  local name=$1 rc=$2 took=$3 lim=$4 expect=${5:-}
  local tail=" (${took}s; limit ${lim}s${expect:+, expected ${expect}s})" log="$LOG/${1//:/-}.log"
  case $rc in
    0) note "PASS $name$tail"; record PASS "$name" ;;
    124|137) note "TIMEOUT $name$tail: killed at its limit ($log)"; FAILED=1; record TIMEOUT "$name" ;;
    *) note "FAIL $name (exit $rc)$tail"; FAILED=1; record FAIL "$name"
       [ -f "$log" ] && tail -n 4 "$log" | cut -c1-200 | sed 's/^/    | /' | tee -a "$SUMMARY" ;;
  esac
}

GRANT=0
budget_for() {  # budget_for NAME EXPECT LIMIT: GRANT = the seconds to give a step; 1 (SKIP noted) if too few
  local name=$1 need have lim=$3
  need=$(need_of "$name" "$2")
  have=$(left)
  if [ "$have" -lt "$need" ]; then
    note "SKIP $name: needs about ${need}s (expected ${2}s x 1.25), ${have}s left of BUDGET=${BUDGET}s"
    FAILED=1
    record SKIP "$name"
    return 1
  fi
  [ "$have" -lt "$lim" ] && lim=$have
  GRANT=$lim
}

step() {  # step NAME COMMAND...: the table's estimate and limit, run, verdict, pack
  local name=$1 lim t0 rc
  shift
  budget_for "$name" "${EXPECT[$name]:-30}" "$(limit_of "$name")" || { pack; return 3; }
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

# `next`: the steps of earlier calls' plans that never got a verdict other than SKIP (in their
# order), then the grid items that no call has run.
pending_steps() {
  local state=$1 s n
  local -a plan=()
  [ -f "$state" ] && read -ra plan < <(grep -E '^plan ' "$state" | tail -n 1 | cut -d' ' -f2-)
  for s in "${plan[@]}"; do
    grep -qE "^(PASS|FAIL|TIMEOUT) $s$" "$state" || echo "$s"
  done
  for n in $(seq 1 "$GRID_SIZE"); do
    grep -qE "^(plan (.* )?bench:$n( |$)|(PASS|FAIL|TIMEOUT) bench:$n$)" "$state" 2>/dev/null || echo "bench:$n"
  done
}

if [[ " ${STEPS[*]} " == *" next "* ]]; then
  from=$STATE
  [ -f "$from" ] || from=$CARRIED_STATE
  if [ -f "$from" ]; then
    [ "$from" != "$STATE" ] && cp "$from" "$STATE"
    mapfile -t todo < <(pending_steps "$STATE")
    next_note="next: from $from: ${todo[*]:-nothing left}"
  else
    # No record of call 1 (a fresh machine, and its state.txt not carried): its plan is assumed run.
    todo=()
    for n in $(seq 3 "$GRID_SIZE"); do todo+=("bench:$n"); done
    next_note="next: no state.txt (not in $WORK, not carried as $CARRIED_STATE): the grid from item 3"
  fi
  expanded=()
  for s in "${STEPS[@]}"; do
    if [ "$s" = next ]; then expanded+=("${todo[@]}"); else expanded+=("$s"); fi
  done
  STEPS=("${expanded[@]}")
else
  echo "plan ${STEPS[*]}" >"$STATE"
  cp "$STATE" "$OUT/state.txt"
fi

# ---- set-up: machine, commit, carried wheels, GPU ------------------------------------------
COMMIT=$("$PY" benchmarks/gpu/tools.py commit 2>/dev/null || echo unknown)
note "# vqkern GPU session$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU)'): steps ${STEPS[*]}; BUDGET ${BUDGET}s;" \
     "commit $COMMIT; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ -n "${next_note:-}" ] && note "$next_note"
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
# Versions, device, the backends' availability and the peers' imports: one Python process. The
# GPU's capability goes to a file of its own: the log also holds whatever torch printed first.
rm -f "$WORK/capability"
timeout 120 "$PY" benchmarks/gpu/tools.py machine "${site_arg[@]}" --capability-file "$WORK/capability" \
  >"$LOG/machine-py.log" 2>&1
peers_rc=$?
grep -E "^(GPU|CPU) " "$LOG/machine-py.log" | head -n 1 | cut -c1-240 | tee -a "$SUMMARY"
grep -E "^  backend " "$LOG/machine-py.log" | tee -a "$SUMMARY"
grep -E "UNMET|FAIL" "$LOG/machine-py.log" | cut -c1-200 | sed 's/^ */  /' | tee -a "$SUMMARY"
note "  peers: $(grep -E '^  (import|absent) ' "$LOG/machine-py.log" | sed 's/^  //; s/ (.*//; s/^import //' | paste -sd',' - | sed 's/,/, /g')"
if [ "$DRY" != 1 ] && [ "$peers_rc" != 0 ]; then FAILED=1; fi

HAVE_GPU=0
DEV=cpu
CAP=$(cat "$WORK/capability" 2>/dev/null)
if [ "$DRY" != 1 ] && [[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]]; then
  HAVE_GPU=1
  DEV=cuda
  note "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader 2>&1 | head -n 1); capability $CAP; kernel $(uname -r)"
elif [ "$DRY" != 1 ]; then
  note "NO GPU: torch sees no CUDA device here (capability '${CAP:-not written}', $LOG/machine-py.log); the GPU steps are skipped"
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
    record PASS build
    return 0
  fi
  # _C only: _cpu (the CPU kernels) serves no GPU step, and its build could only fail the call.
  # sm_90a only: the H200's own code (HOPPER.md), half the compile of the default 80;90a.
  step build env VQKERN_SKIP_CPU_BUILD=1 VQKERN_PTXAS_VERBOSE=1 VQKERN_CUDA_ARCHS="${VQKERN_CUDA_ARCHS:-90a}" \
    MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
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
  record SKIP "$1"
  return 1
}

do_check() {  # python -m vqkern.check: every backend against plain PyTorch on this device
  gpu_ready check || return
  if [ ! -f vqkern/check.py ] && [ ! -f vqkern/check/__main__.py ]; then
    note "MISSING check: python -m vqkern.check is not in this tree (vqkern/check.py); the other steps go on"
    FAILED=1
    record FAIL check
    return
  fi
  ensure_built
  step check "$PY" -m vqkern.check --device "$DEV" --json "$OUT/check.json"
  [ -f "$LOG/check.log" ] && tail -n 24 "$LOG/check.log" | cut -c1-180 | sed 's/^/  | /' | tee -a "$SUMMARY"
}

# -v: one line per case as it finishes, so a group killed at its limit still shows which
# cases passed and failed; faulthandler names a case that hangs.
PYTEST_OPTS=(-v -rfEs --tb=short -o faulthandler_timeout=60 --durations=5)
do_tests() {
  local lim t0 name rc line quick=${QUICK:-1} group_failed=0
  local -a names=() pids=() args
  gpu_ready tests || return
  ensure_built
  budget_for tests "${EXPECT[tests]}" "$(limit_of tests)" || { pack; return; }
  lim=$GRANT
  # The groups run at once: on the GPU machine most of their time is Triton compiling on
  # the CPU (16 cores), and each process keeps its own CUDA context, so a kernel fault in
  # one group cannot fail the cases of another.
  t0=$SECONDS
  for name in cuda triton configs fuzz api; do
    case $name in
      cuda) args=(tests/test_cuda_backend.py -m "slow or not slow")
            [ "$DRY" = 1 ] && args+=(-k "split_choice or availability_on_cpu") ;;
      triton) args=(tests/test_triton_kernels.py)
              [ "$DRY" = 1 ] && args+=(-k "split_k_chosen or availability_reason") ;;
      # Every search config in every mode: about 60 compiles, a process of their own.
      configs) args=(tests/test_triton_configs.py)
               [ "$DRY" = 1 ] && args+=(-k "pin_refuses or exact_codes and fp32-ieee") ;;
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
    [ "$rc" = 0 ] || group_failed=1
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
  record "$([ "$group_failed" = 0 ] && echo PASS || echo FAIL)" tests
  pack
}

sanitizer() { command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null; }

do_sanitize() {  # do_sanitize memcheck|racecheck
  local tool=$1 name san log
  name=$([ "$tool" = memcheck ] && echo sanitize || echo racecheck)
  log=$LOG/$name.log
  gpu_ready "$name" || return
  ensure_built
  # One search config, pinned: autotuning would launch six configs (and time them) under the
  # sanitizer; tests/test_triton_configs.py runs every config.
  export VQKERN_TRITON_SEARCH_CONFIG=0
  if [ "$DRY" = 1 ]; then
    # No sanitizer on CPU: the same launcher script on the CPU backends, interpreter shapes.
    step "$name" "$PY" benchmarks/gpu/sanitize.py --device cpu --backends torch,triton --small
  else
    san=$(sanitizer)
    if [ -z "$san" ]; then
      note "FAIL $name: compute-sanitizer not found (PATH, \$CUDA_HOME/bin): the kernels run once without it"
      FAILED=1
      step "$name-plain" "$PY" benchmarks/gpu/sanitize.py --device cuda --backends cuda,triton
      unset VQKERN_TRITON_SEARCH_CONFIG
      return
    fi
    # --report-api-errors no: the CUDA API errors torch and Triton expect (and handle) are not
    # reported, so they cannot crowd out a kernel's; --print-limit 0 prints every error (the
    # shapes are small); --destroy-on-device-error kernel: after a faulting kernel the context
    # lives on, so every later case is still checked and reported.
    step "$name" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 1 \
      --target-processes all --report-api-errors no --print-limit 0 --destroy-on-device-error kernel \
      "$PY" benchmarks/gpu/sanitize.py --device cuda --backends cuda,triton
  fi
  unset VQKERN_TRITON_SEARCH_CONFIG
  [ -f "$log" ] || return
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|^sanitize.py:" "$log" | sed 's/^/  /' | tee -a "$SUMMARY"
  grep -E "^FAIL " "$log" | head -n 8 | cut -c1-220 | sed 's/^/    /' | tee -a "$SUMMARY"
  # Every kernel named in an error report, however many errors it has.
  grep -oE "^=+ +at [^ (]+" "$log" | sed 's/.* at //' | sort | uniq -c | sort -rn | head -n 12 \
    | sed 's/^ */    errors x/' | tee -a "$SUMMARY"
}

do_bench_item() {  # do_bench_item N: one benchmarks.run process for grid item N
  local n=$1 name est lim t0 rc
  local -a dev_args=(--device cuda) providers=()
  name="bench:$n"
  gpu_ready "$name" || return
  ensure_built
  est=${ITEM_EST[$n]}
  lim=$((est * 2))
  if [ "$DRY" = 1 ]; then
    # A tiny shape on CPU: the item's providers, passes and dtype, the Triton interpreter.
    dev_args=(--device cpu --reps 1 --shapes 64,64,16 --floor-sizes 256,512)
    est=30
    lim=240
  fi
  [ -n "${BENCH_PROVIDERS:-}" ] && providers=(--providers "$BENCH_PROVIDERS")
  budget_for "$name" "$est" "$(limit_of "$name" "$lim")" || { pack; return; }
  lim=$GRANT
  t0=$SECONDS
  # --budget: the runner starts a case only when it fits, and records the rest as not-run.
  TRITON_PRINT_AUTOTUNING=1 run_limited "$name" "$lim" "$PY" -m benchmarks.run "${dev_args[@]}" \
    --item "${ITEM_NAME[$n]}" "${providers[@]}" --budget $((lim - 5)) --no-plots --out "$RESULTS"
  rc=$?
  verdict "$name" "$rc" $((SECONDS - t0)) "$lim" "$est"
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader \
    >>"$LOG/gpu-clocks.txt" 2>&1
  # shellcheck disable=SC2046  # one argument per file; the paths have no spaces
  set -- $(find "$RESULTS" -name "*-gpu-${ITEM_NAME[$n]}.json" -newer "$LOG/.start" 2>/dev/null | sort)
  if [ $# -gt 0 ]; then
    "$PY" benchmarks/gpu/tools.py fix-commit "$@" >>"$LOG/fix-commit.log" 2>&1
    "$PY" benchmarks/gpu/tools.py bench-summary "$@" 2>&1 | cut -c1-220 | tee -a "$SUMMARY"
    if [ "${PIPESTATUS[0]}" != 0 ]; then
      note "FAIL $name: a vqkern provider returned wrong codes, failed or ran out of memory (above)"
      FAILED=1
    fi
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
    record FAIL train
    return
  fi
  ensure_built
  for kind in plain ema; do
    cmd=("$PY" -m vqkern.train vqvae --compare --device "$DEV" --data "$data" --steps "$TRAIN_STEPS"
         --no-progress --out "$WORK/train-$kind")
    [ "$kind" = ema ] && cmd+=(--ema --dead-code-threshold 1)
    LIMIT[train-$kind]=$(( $(limit_of train) / 2 )); EXPECT[train-$kind]=$((EXPECT[train] / 2))
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

for s in "${STEPS[@]}"; do
  case $s in
    build) do_build ;;
    check) do_check ;;
    tests) do_tests ;;
    sanitize) do_sanitize memcheck ;;
    racecheck) do_sanitize racecheck ;;
    bench:*) do_bench_item "${s#bench:}" ;;
    train) do_train ;;
    pytest) do_pytest ;;
  esac
done

mapfile -t rest < <(pending_steps "$STATE")
note "# done: $((SECONDS - START))s of BUDGET ${BUDGET}s; $([ "$FAILED" = 0 ] && echo 'every step passed' || echo 'NOT ALL PASSED')"
note "# next call would run: ${rest[*]:-nothing}"
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
