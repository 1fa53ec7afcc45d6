#!/usr/bin/env bash
# scripts/gpu_check.sh: the whole GPU check of issue 15 in one command, for a machine with an
# NVIDIA GPU (a lease of minutes: every step is capped, all steps run, one summary table last).
#
#   bash scripts/gpu_check.sh [--quick] [--full-bench] [--budget SECONDS] [--results DIR]
#
# Steps, in groups (a group's steps run side by side; the groups one after the other):
#   env        nvidia-smi, versions, the device's name and compute capability
#   build      build_ext --inplace --force for this device only (TORCH_CUDA_ARCH_LIST = its
#              capability, e.g. 9.0; plus 9.0 on other GPUs, which the static report reads),
#              FORCE_CUDA=1, MAX_JOBS = all cores; fails unless the CUDA kernels load
#   static     python -m regkernels.bench.gpu_static --json (registers, spills, occupancy, mma
#              counts against each kernel's declared budget; compile only)
#   select     (beside static) collects the sanitizers' test selection, node ids only
#   bench      alone on the machine: python -m regkernels.bench --device cuda --quick --json
#              benchmarks/results/cuda-<gpu>-quick.json; --full-bench: every case, -all.json.
#              It runs before the tests because its JSON is what a GPU run is for: a run cut
#              short still brings it back
#   suite      the full test suite (CUDA cases included), pytest-xdist over the cores less two
#              when installed (--quick: the tests whose id or marks say cuda, and the host budget)
#   memcheck   (beside the suite) compute-sanitizer --tool memcheck over the selection (step_select
#              says what it takes: every CUDA and Triton kernel, a few inputs each);
#              PYTORCH_NO_CUDA_MEMORY_CACHING=1 so an access past a tensor leaves its allocation
#   racecheck  (beside the suite) compute-sanitizer --tool racecheck (shared-memory hazards) over
#              the float32 part of that selection
# Every step is capped (CAP_<STEP> in the environment) and cut to what is left of --budget
# (default 570 s; 480 s with --quick, 900 s with --full-bench); a step with under 10 s left is skipped and fails the run.
# Results: every log and JSON under the results dir (default benchmarks/results/gpu_check-<time>,
# or a scratch dir when $OUT is set); with $OUT set (the device tool brings back only $OUT, at
# most 8 files) $OUT gets summary.txt, the two JSONs and logs.tar.gz, refreshed after each group.
# Exit status: 0 when every step passed, else 1. The summary table is printed last.
#
# ---------------------------------------------------------------- time estimate for an H100 host
# (16 cores). Measured 2026-12-02 on the 2-core EPYC VM without a GPU, in CPU seconds (user +
# sys: the VM ran at a load average of 8-9 from other sessions, so wall times there were 3-5x the
# CPU time and mean nothing), taken as wall seconds per core there:
#   build   CPU part, REGKERNELS_CPU_ONLY=1 build_ext: 6 C++ units + link = 382 CPU s (64 s per
#           unit on average). nvcc -gencode sm_90 (nvcc_check.sh, the build's flags):
#           beta_lasso_cuda.cu 110 CPU s, svd_cuda.cu 108 CPU s (each mostly the host pass over
#           torch's headers). MAX_JOBS=16 compiles all 8 units at once, so wall = the slowest
#           unit (~110 s) + link (~5 s) + setup.py start (~10 s)                        ≈ 125 s
#   static  python -m regkernels.bench.gpu_static (main at d4086e7): 75 Triton variants compiled
#           for sm_90 through a stub driver + cuobjdump of the build, 109 CPU s in one process
#           (so ~100 s wall on an idle core); beside it select = two --collect-only runs,
#           47 CPU s                                                                     ≈ 100 s
#   bench   --quick: 19 cases x 3 providers. On this CPU a quick run spends ~9 s in first calls
#           (warm inductor cache) and ~18 s timing (cpu-epyc-2core-issue14-quick.json); the full
#           run (57 cases) 53 s and 567 s (cpu-epyc-2core-all.json). On the GPU the timing
#           shrinks to ~1 s a case (30 rounds x 3 calls of us-ms each + sync and L2 flush) and the
#           first calls grow: a cold torch.compile of each reference's forward and backward for
#           CUDA (~5 s a case) and ~40 Triton JIT compiles of our kernels (~1 s each):
#           19 x (5 + 1) + 40 + ceilings 5                                             ≈ 160 s
#           (--full-bench: 57 x (5 + 2) + 60 + 5 ≈ 465 s: it does not fit beside the rest)
#   suite   7152 tests collected, ~2100 of them CUDA cases; 7.5-9 min on 2 cores (README), i.e.
#           ~17 CPU min, an upper bound for the CPU tests since on a GPU machine the
#           interpreted-Triton cases are skipped: 17 min / 14 workers ≈ 75 s; the CUDA cases
#           are small calls plus Triton compiles (~300 specializations x ~1 s / 14 workers, some
#           compiled twice by two workers ≈ 30 s) + xdist start (~15 s)              ≈ 120-180 s
#           (--quick: the 2105 tests whose id or marks say cuda                        ≈ 60-90 s)
#   memcheck 221 tests (--quick 65): process start under the sanitizer (~20-30 s) + ~0.4 s a
#           test (kernels run 10-100x slower, but on tiny inputs; kernels are already compiled
#           by the suite's workers or compile here)                                     ≈ 115 s
#   racecheck 65 tests: ~25 s + ~0.5 s a test                                           ≈  60 s
#           (the three run side by side: the group takes the longest, the suite's)
#   total   env 10 + build 125 + static 100 + bench 160 + max(suite 150, memcheck 115)
#                                                                          ≈ 545 s ≈ 9.1 min
#           --quick: 10 + 125 + 100 + 160 + max(75, memcheck 50)           ≈ 470 s ≈ 7.8 min
#           So --quick is the 8-minute check; the default (full suite, half dtypes in memcheck)
#           is ~9 min, inside one 10-minute device call (--budget 570 by default).
#   The GPU-side numbers (compiles, sanitizer start, per-test cost) are estimates, not
#   measurements: take +-50 %. The caps and --budget bound the run whatever they turn out to be.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SELF="$ROOT/scripts/gpu_check.sh"

# ================================================================ the steps (each runs as
# `timeout CAP bash gpu_check.sh --step NAME`, its settings in exported variables, so a cap kills
# the step's whole process group and nothing else)
step_env() {
  nvidia-smi || true
  "$PY" - <<'PYEOF'
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
  local rc=$?
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
  return $rc
}

step_build() {
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  # this device's code, and sm_90's too where the device is another: the static report reads sm_90
  local archs="$ARCH"
  [ "$ARCH" = 9.0 ] || archs="$ARCH;9.0"
  # --force: a _C.so already in the tree (a CPU-only build) is newer than the .cu files and would
  # be kept
  TORCH_CUDA_ARCH_LIST="$archs" FORCE_CUDA=1 MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace --force || return 1
  "$PY" -c "
from regkernels import _ext
ok = _ext.HAS_C and _ext.has_cuda_kernels()
print('CUDA kernels built:', ok, 'for sm_$ARCH')
raise SystemExit(0 if ok else 1)"
}

step_static() {
  "$PY" -m regkernels.bench.gpu_static --json "$RESULTS/gpu_static.json"
}

step_bench() {
  local args=()
  [ "$BENCH_SEL" = quick ] && args=(--quick)
  "$PY" -m regkernels.bench --device cuda "${args[@]}" --json "$BENCH_JSON" && cp -f "$BENCH_JSON" "$RESULTS/"
}

step_suite() {
  local xdist=() sel=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$WORKERS")
  [ "$QUICK" = 1 ] && sel=(-k "cuda or host_budget")
  "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rfE --durations=20 "${sel[@]}" tests/
}

# the sanitizers' selection, as node ids (collected without running anything) from the CUDA cases
# of tests/test_generated.py with backend cuda or triton: memcheck takes every float32 test_values
# sample (strided, transposed, expanded, empty and padded inputs are where an access goes out of
# bounds), the first sample of each half dtype and the first test_gradients sample per op and
# dtype (--quick: racecheck's float32 selection); racecheck (shared memory) the first 3 float32
# value samples and the first float32 gradient sample per op. Both add the first 3 float32 cases of each cuda-marked test of the two
# CUDA C++ kernels' files (β-LASSO, batched SVD).
step_select() {
  "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_generated.py > "$RESULTS/collected.txt" 2>&1
  "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda tests/test_beta_lasso.py tests/test_svd_kernel.py \
    > "$RESULTS/collected_cuda.txt" 2>&1
  local tool
  for tool in memcheck racecheck; do
    "$PY" - "$tool" "$MC_DTYPES" "$RESULTS/collected.txt" "$RESULTS/collected_cuda.txt" > "$RESULTS/${tool}_tests.txt" <<'PYEOF'
import collections, re, sys
tool, half, generated, cuda_marked = sys.argv[1:]
taken = collections.Counter()
for line in open(generated):
    m = re.match(r"(tests/test_generated\.py::(test_values|test_gradients)\[([a-z_0-9]+)-(cuda|triton)-cuda-([a-z0-9]+)-.*\])$",
                 line.strip())
    if not m:
        continue
    node, test, op, backend, dtype = m.groups()
    key = (test, op, backend, dtype)
    if dtype == "fp32":
        limit = {"test_values": 10 ** 6 if tool == "memcheck" and half != "none" else 3, "test_gradients": 1}[test]
    else:
        limit = 1 if tool == "memcheck" and re.fullmatch(half, dtype) and test == "test_values" else 0
    if taken[key] < limit:
        taken[key] += 1
        print(node)
for line in open(cuda_marked):
    node = line.strip()
    if "::" in node and not re.search(r"float16|bfloat16|float64", node):
        fn = node.split("[")[0]
        if taken[fn] < 3:
            taken[fn] += 1
            print(node)
PYEOF
    echo "$tool: $(wc -l < "$RESULTS/${tool}_tests.txt") tests"
  done
  [ -s "$RESULTS/memcheck_tests.txt" ] && [ -s "$RESULTS/racecheck_tests.txt" ]
}

sanitize() {  # $1: tool
  local ids=()
  mapfile -t ids < "$RESULTS/$1_tests.txt"
  [ ${#ids[@]} -gt 0 ] || { echo "no CUDA kernel tests selected"; return 1; }
  echo "${#ids[@]} tests"
  # no caching allocator: an access past a tensor leaves its own cudaMalloc block, which memcheck
  # sees; torch's own probing API errors are not ours (--report-api-errors no)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 1 --target-processes all \
    --report-api-errors no --print-limit 50 "$PY" -m pytest -q -p no:cacheprovider -rfE "${ids[@]}"
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

if [ "${1:-}" = "--step" ]; then
  "step_$2"
  exit $?
fi

# ================================================================ the driver
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
QUICK=0
FULL_BENCH=0
RESULTS=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --full-bench) FULL_BENCH=1 ;;
    --results) RESULTS="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,/^# ------/p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (known: --quick, --full-bench, --results DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$RESULTS" ]; then
  if [ -n "${OUT:-}" ]; then RESULTS=$(mktemp -d /tmp/gpu_check.XXXXXX)
  else RESULTS="$ROOT/benchmarks/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)"; fi
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
NPROC=$(nproc)
# the suite runs beside the two sanitizer processes; its CUDA cases are small, one GPU takes a
# dozen processes' contexts easily
WORKERS=$(( NPROC > 4 ? NPROC - 2 : 1 ))
if [ $QUICK = 1 ]; then MC_DTYPES='none'; else MC_DTYPES='bf16|fp16'; fi
if [ $FULL_BENCH = 1 ] && [ $QUICK = 0 ]; then BENCH_SEL=all; else BENCH_SEL=quick; fi
# --full-bench does not fit one 10-minute device call beside the rest: it gets 900 s
[ -n "$BUDGET" ] || { [ $QUICK = 1 ] && BUDGET=480; } || { [ $BENCH_SEL = all ] && BUDGET=900; } || BUDGET=570
DEADLINE=$(( $(date +%s) + BUDGET ))
export PY QUICK RESULTS NPROC WORKERS MC_DTYPES BENCH_SEL PYTHONUNBUFFERED=1

# per-step caps in seconds (env overrides), each also cut to what is left of --budget: a hang
# costs its step, never the lease; a step with under 10 s left is not started (SKIP, a failure)
CAP_ENV=${CAP_ENV:-60}; CAP_BUILD=${CAP_BUILD:-240}; CAP_STATIC=${CAP_STATIC:-120}; CAP_BENCH=${CAP_BENCH:-$([ $BENCH_SEL = all ] && echo 540 || echo 240)}
CAP_SUITE=${CAP_SUITE:-300}; CAP_SELECT=${CAP_SELECT:-90}; CAP_MEMCHECK=${CAP_MEMCHECK:-180}
CAP_RACECHECK=${CAP_RACECHECK:-120}

SUMMARY="$RESULTS/summary.txt"
: > "$RESULTS/steps.tsv"
FAILED=0

summarize() {
  printf '%-10s %-6s %7s  %s\n' step status seconds detail
  while IFS=$'\t' read -r step status secs detail; do
    printf '%-10s %-6s %7s  %s\n' "$step" "$status" "$secs" "$detail"
  done < "$RESULTS/steps.tsv"
}

publish() {  # refresh $OUT: summary, JSONs, every log in one archive (the device tool's 8-file limit)
  summarize > "$SUMMARY"
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  cp -f "$SUMMARY" "$OUT/"
  local j
  for j in "$RESULTS"/*.json; do [ -e "$j" ] && cp -f "$j" "$OUT/"; done
  tar -czf "$OUT/logs.tar.gz" -C "$RESULTS" . 2>/dev/null
}

# one line of a step's log for the summary's detail column
detail_of() {  # $1: step, $2: log
  case "$1" in
    env) grep -m1 '^gpu:' "$2" ;;
    build) grep -m1 'CUDA kernels built' "$2" ;;
    static) grep -iE 'budget|kernels' "$2" | tail -n 1 ;;
    bench) grep -m1 -E '^wrote' "$2"; grep -c ' error: ' "$2" | sed 's/$/ provider errors/' ;;
    select) grep -E '^(memcheck|racecheck):' "$2" ;;
    suite) grep -E '[0-9]+ (passed|failed|error)' "$2" | tail -n 1 ;;
    memcheck|racecheck) grep -h 'ERROR SUMMARY' "$2" | tail -n 1; grep -E '[0-9]+ (passed|failed)' "$2" | tail -n 1 ;;
  esac
}

# run_group NAME:CAP ...: the named steps at once (each `timeout CAP bash gpu_check.sh --step NAME`,
# its output in NAME.log), then one summary row per step; caps are cut to what is left of --budget
run_group() {
  local spec name cap left log rows=() t0
  for spec; do
    name=${spec%%:*}; cap=${spec#*:}; log="$RESULTS/$name.log"
    left=$(( DEADLINE - $(date +%s) ))
    if [ $left -lt 10 ]; then
      printf '%s\t%s\t%s\t%s\n' "$name" SKIP 0 "not started: the --budget of ${BUDGET}s is spent" >> "$RESULTS/steps.tsv"
      FAILED=1
      continue
    fi
    [ "$cap" -gt $left ] && cap=$left
    echo "=== $name (cap ${cap}s), started $(date -u +%T)" | tee "$log"
    (
      t0=$(date +%s)
      timeout --kill-after=15 "$cap" bash "$SELF" --step "$name" >> "$log" 2>&1
      echo "$? $(( $(date +%s) - t0 ))" > "$RESULTS/.$name.rc"
    ) &
    rows+=("$name")
  done
  wait
  local rc secs status detail
  for name in "${rows[@]}"; do
    read -r rc secs < "$RESULTS/.$name.rc" || { rc=1; secs=0; }
    rm -f "$RESULTS/.$name.rc"
    if [ "$rc" -eq 0 ]; then status=ok; elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIME; else status=FAIL; fi
    [ "$rc" -eq 0 ] || FAILED=1
    detail=$(detail_of "$name" "$RESULTS/$name.log" 2>/dev/null | tr '\t\n=' '   ' | tr -s ' ' | cut -c1-120)
    [ "$rc" -eq 0 ] || detail="rc=$rc $detail"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$detail" >> "$RESULTS/steps.tsv"
    echo "=== $name: $status in ${secs}s: $detail"
    tail -n 4 "$RESULTS/$name.log"
  done
  publish
}

run_group "env:$CAP_ENV"
GPU_INFO=$("$PY" -c "
import re, torch
p = torch.cuda.get_device_properties(0)
print(f'{p.major}.{p.minor}', re.sub('[^a-z0-9]+', '-', p.name.lower().replace('nvidia', '')).strip('-'))" 2>/dev/null)
if [ -z "$GPU_INFO" ]; then
  echo "gpu_check.sh: torch sees no CUDA device; the other steps need one" >&2
  publish; cat "$SUMMARY"; exit 1
fi
ARCH=${GPU_INFO%% *}
GPU=${GPU_INFO#* }
BENCH_JSON="benchmarks/results/cuda-$GPU-$BENCH_SEL.json"
export ARCH GPU BENCH_JSON

run_group "build:$CAP_BUILD"
# compile-only and collect-only: side by side, before anything is timed
run_group "static:$CAP_STATIC" "select:$CAP_SELECT"
# alone on the machine: its timings are the point of the run
run_group "bench:$CAP_BENCH"
# correctness only: the suite and both sanitizers share the GPU and the cores
run_group "suite:$CAP_SUITE" "memcheck:$CAP_MEMCHECK" "racecheck:$CAP_RACECHECK"

publish
echo
echo "gpu_check.sh on $GPU (sm_$ARCH)$([ $QUICK = 1 ] && echo ', --quick'): logs and JSON in $RESULTS$([ -n "${OUT:-}" ] && echo ' and $OUT')"
cat "$SUMMARY"
exit $FAILED
