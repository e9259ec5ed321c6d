#!/usr/bin/env bash
# The GPU check of lovasz-kernels, for a machine with one CUDA GPU and no network
# (PyTorch, Triton, numba and pytest installed; no asv). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh                 # logs, results.json, gpu_check.tgz in ./gpu_out
#
# Environment: OUT (folder, default ./gpu_out), BUDGET (seconds for the whole run, default
# 450: under 8 minutes), PY (python), SKIP (names of steps not to run, e.g.
# SKIP="01_tests_triton 08_sort_strategies" when a short lend must go to measurements),
# MEMORY_BUDGET (seconds for step 04's workloads, default 100), DRY_RUN=1 (no GPU needed:
# each step prints what it would run, taking its minimum time on a simulated clock, so the
# budget's skip path can be tested on a CPU).
#
# Steps in priority order; a step that no longer fits in what is left of BUDGET is skipped and
# says so in summary.txt. Correctness first (the CUDA and triton tests, real sizes, the
# cross-check), then peak memory over the bench grid (tests/perf/gpu_memory.py), the goal
# timings with CUDA events (lovasz-kernels bench --device cuda: triton against one torch.sort
# of the keys it sorts, the torch backend and the per-class loop), each sort strategy of the
# triton backend, then NCCL with a world size of 1, and last the torch backend's CPU sorts on
# this machine's many cores (which rows it radix-sorts is measured per machine and thread
# count: step 10 shows the choice against each sort forced), and the numba backend there.
set -u
START=$SECONDS
BUDGET="${BUDGET:-450}"
OUT="${OUT:-$PWD/gpu_out}"
PY="${PY:-$(command -v python3 || command -v python)}"
DRY_RUN="${DRY_RUN:-0}"
SKIP=" ${SKIP:-} "
MEMORY_BUDGET="${MEMORY_BUDGET:-100}"
STEPS="00_environment 01_tests_gpu_real_sizes 01_tests_triton 02_tests_cuda 03_check_cuda
04_memory 04_long_rows 05_goal_2e20x21_fp32 06_goal_8x512sq_x21 07_fp16_2e20x21 08_sort_strategies
09_nccl_exact 09_nccl_histogram 10_cpu_sorts 10_cpu_sort_losses 10_cpu_short_rows
11_cpu_numba_trace 11_cpu_numba_omp_team 11_cpu_numba_threads 11_cpu_numba_scaling
11_cpu_numba_split"
# a misspelt step name would silently run the step: refuse it before any work
for name in $SKIP; do
  if [[ " $(echo $STEPS) " != *" $name "* ]]; then
    echo "error: SKIP names an unknown step: $name (steps: $(echo $STEPS))" >&2
    exit 2
  fi
done
if ! [[ "$MEMORY_BUDGET" =~ ^[0-9]+$ ]]; then
  echo "error: MEMORY_BUDGET must be a whole number of seconds; got '$MEMORY_BUDGET'" >&2
  exit 2
fi
mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HYPOTHESIS_PROFILE=ci
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU-only machines

SIMULATED=0  # seconds a dry run pretends its steps took
left() { echo $((BUDGET - (SECONDS - START) - SIMULATED)); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME MAX_SECONDS MIN_LEFT CMD...: run CMD with a timeout, log to logs/NAME.log, one
# summary line with the exit status and the seconds taken; skipped when under MIN_LEFT is left
step() {
  local name=$1 max=$2 need=$3
  shift 3
  local remaining
  remaining=$(left)
  if [[ "$SKIP" == *" $name "* ]]; then
    note "$(printf '%-28s SKIP (asked)' "$name")"
    return 0
  fi
  if ((remaining < need)); then
    note "$(printf '%-28s SKIP (%ss left, %ss needed)' "$name" "$remaining" "$need")"
    return 0
  fi
  ((max > remaining)) && max=$remaining
  local t0=$SECONDS rc
  if [ "$DRY_RUN" = 1 ]; then
    echo "would run (timeout ${max}s): $*" > "$OUT/logs/$name.log"
    SIMULATED=$((SIMULATED + need))
    rc=0
  else
    timeout -k 5 "$max" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
  fi
  note "$(printf '%-28s rc=%-3s %4ss%s' "$name" "$rc" $((SECONDS - t0)) \
    "$( ((rc == 124 || rc == 137)) && echo ' TIMEOUT')")"
  return 0
}

# ---------------------------------------------------------------------------- the machine
step 00_environment 60 0 "$PY" - <<'EOF'
import importlib, os, platform, shutil, sys, sysconfig
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "numpy", "numba", "pytest", "hypothesis"):
    try:
        print(f"{name:10s}", importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"{name:10s} MISSING ({exc})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"device {props.name}, capability {props.major}.{props.minor}, "
          f"{props.multi_processor_count} SMs, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    print("nccl available:", torch.distributed.is_nccl_available())
# Triton builds a C launcher per kernel signature at its first launch: a compiler and Python.h
compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
print("C compiler for Triton's launchers:", compiler or "NONE: every triton launch will fail")
include = sysconfig.get_paths()["include"]
print("Python.h:", os.path.exists(os.path.join(include, "Python.h")), include)
EOF
[ "$DRY_RUN" = 1 ] || nvidia-smi > "$OUT/logs/00_nvidia_smi.log" 2>&1
cat "$OUT/logs/00_environment.log" 2>/dev/null

# ----------------------------------------------------- correctness (compile-bound: in parallel)
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --durations=10)
# triton's tests compile a kernel per variant: spread them over the cores when xdist is there
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
A_MAX=$(($(left) < 210 ? $(left) : 210))
step 01_tests_gpu_real_sizes "$A_MAX" 60 "${PYTEST[@]}" tests/test_gpu.py &
step 01_tests_triton "$A_MAX" 60 "${PYTEST[@]}" "${XDIST[@]}" tests/test_triton.py &
step 02_tests_cuda "$A_MAX" 60 "${PYTEST[@]}" tests/test_training_loops.py \
  tests/test_metrics.py tests/test_nn.py tests/test_prox.py tests/test_registry.py \
  tests/test_validation.py tests/test_bench.py -k "cuda or gpu or device" &
step 03_check_cuda "$A_MAX" 60 "$PY" -m lovasz_kernels.cli check --device cuda &
wait
[ "$DRY_RUN" = 1 ] && SIMULATED=$((SIMULATED + 60))  # the parallel steps' clocks ran apart

# ------------------------------------------------ goal timings (alone on the GPU, CUDA events)
# peak memory and time of the triton backend in memory-bounded chunks against one chunk and
# the torch backend, over the bench grid (the GPU goals' sizes first)
step 04_memory $((MEMORY_BUDGET + 50)) 60 "$PY" tests/perf/gpu_memory.py --rounds 10 \
  --budget "$MEMORY_BUDGET" \
  --json "$OUT/gpu_memory.json"
# the torch backend on segments of 33.5M pixels (batch IoU over 8 x 2048²), past the GPU
# budget: sorted a range of values at a time against every row whole, memory and time
step 04_long_rows 90 40 "$PY" tests/perf/long_rows.py --device cuda --toggle --rounds 5 \
  --cases hinge:8:2048 softmax:8:2048:2
# 2^20 pixels x 21 classes, float32, batch IoU: triton vs one torch.sort of the keys it
# sorts, the torch backend and the per-class loop, peak memory, the float64 cross-check
BENCH=("$PY" -m lovasz_kernels.cli bench --device cuda --classes 21 --budget 30)
step 05_goal_2e20x21_fp32 120 45 "${BENCH[@]}" --pixels 1024 --batch 1 --dtype float32 \
  --backend triton,torch --repeat 20 --out "$OUT/bench_2e20x21_fp32"
# >= 20x the per-class loop at 8 x 512^2 x 21 (batch IoU)
step 06_goal_8x512sq_x21 120 45 "${BENCH[@]}" --pixels 512 --batch 8 --dtype float32 \
  --backend triton,torch --repeat 10 --out "$OUT/bench_8x512sq_x21"
# 16-bit scores under the automatic choice (the histogram from 2^16 pixels per segment)
step 07_fp16_2e20x21 90 40 "${BENCH[@]}" --pixels 1024 --batch 1 --dtype float16 \
  --backend triton,torch --repeat 10 --out "$OUT/bench_2e20x21_fp16"

# the sort strategies in one process: a torch.sort of the very keys a call sorts (rows, flat)
# and the fused forward + backward under each strategy, float32 and float16, 2^20 x 21
step 08_sort_strategies 90 40 "$PY" tests/perf/gpu_sort_strategies.py

# --------------------------------------------------------------------- NCCL, world size 1
for mode in exact histogram; do
  step "09_nccl_$mode" 90 40 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    examples/ddp_train.py --steps 3 --dist-mode "$mode"
done

# ------------------------------------------------- CPU: the torch backend's sorts, many cores
# the sorts alone, then whole hinge losses as the backend chooses their sort on this machine
# against each choice forced (the padded radix and packed sorts' speedups are measured here
# first: on many cores, rows spread over threads should keep the 2-D sort)
step 10_cpu_sorts 60 30 "$PY" tests/perf/torch_sorts.py --rounds 20
step 10_cpu_sort_losses 60 30 "$PY" tests/perf/torch_sorts.py --losses --rounds 20
# the torch backend against the loop on the grid's small per-image inputs, new inputs every call
step 10_cpu_short_rows 60 30 "$PY" tests/perf/short_rows.py --rounds 15

# ------------------------------------------------------ CPU: the numba backend, many cores
# on a 16-core Intel Xeon, 512² x 21 took 4.3x the floor (1.4x at 1024² x 2). Where the time
# goes, thread by thread: the torch ops around the kernel, threads starting late (after a torch
# op, torch's OpenMP threads spin on every core), segments slowed beside each other, splits
step 11_cpu_numba_trace 60 30 "$PY" tests/perf/numba_trace.py --rounds 9
# ... how long torch's idle OpenMP threads spin after one op there (a count of pause
# instructions: how long it lasts depends on the processor), and what an op after idle costs
step 11_cpu_omp_spin 40 20 "$PY" tests/perf/omp_spin.py --rounds 15
# ... the same tasks on torch's own (spinning) OpenMP team instead of the pool: if late
# threads are the cause, this is where it shows
step 11_cpu_numba_omp_team 60 30 "$PY" tests/perf/omp_team_experiment.py --rounds 9 \
  --scratch-per-os-thread
# the kernel call alone against the loss after a torch op, default and passive OpenMP, next
# to the floor
step 11_cpu_numba_threads 150 90 "$PY" tests/perf/cpu_threads_interleaved.py --rounds 5 \
  --cases 512x21 1024x2 4x256x21-per-image
# ... and how it scales with its thread count, with the sort each process chose
step 11_cpu_numba_scaling 90 45 "$PY" tests/perf/cpu_threads_interleaved.py --rounds 5 \
  --cases 512x21 1024x2 --numba-threads 1 4 8 16
# ... and whether splitting segments across its threads pays there (measured on first use:
# split whenever possible, never, and as measured)
step 11_cpu_numba_split 90 45 "$PY" tests/perf/split_segments.py --rounds 10 \
  --cases softmax-512x21 softmax-1024x2 softmax-1024x3 hinge-512 hinge-1024

# ------------------------------------------------------------------------ results and logs
"$PY" - "$OUT" <<'EOF' || true
import glob, json, os, re, sys
out = sys.argv[1]
results = {"summary": open(os.path.join(out, "summary.txt")).read().splitlines(), "bench": {},
           "tests": {}}
env = os.path.join(out, "logs", "00_environment.log")
if os.path.exists(env):
    results["environment"] = open(env).read().splitlines()
memory = os.path.join(out, "gpu_memory.json")
if os.path.exists(memory):
    results["memory"] = json.load(open(memory))
for path in sorted(glob.glob(os.path.join(out, "bench_*", "lovasz-bench.json"))):
    results["bench"][os.path.basename(os.path.dirname(path))] = json.load(open(path))
for path in sorted(glob.glob(os.path.join(out, "logs", "0[1-3]_*.log"))):
    tail = [line for line in open(path) if re.search(r"\d+ (passed|failed)|passed|FAIL", line)]
    results["tests"][os.path.basename(path)[:-4]] = tail[-5:]
with open(os.path.join(out, "results.json"), "w") as handle:
    json.dump(results, handle, indent=1)
print("wrote", os.path.join(out, "results.json"))
EOF
tar czf "$OUT/gpu_check.tgz" -C "$OUT" logs $(cd "$OUT" && ls -d bench_* 2>/dev/null) 2>/dev/null
echo
echo "================ SUMMARY ($((SECONDS - START + SIMULATED))s of ${BUDGET}s)"
cat "$SUMMARY"
for log in "$OUT"/logs/0[1-3]_*.log; do
  [ -f "$log" ] && echo "$(basename "$log" .log): $(grep -E '[0-9]+ (passed|failed)' "$log" | tail -n 1)"
done
cat "$OUT"/logs/04_memory.log "$OUT"/logs/08_sort_strategies.log "$OUT"/logs/10_cpu_*.log \
  "$OUT"/logs/11_cpu_numba_*.log 2>/dev/null
grep -h -A12 "median of" "$OUT"/logs/0[5-7]_*.log 2>/dev/null | grep -E "^(triton|torch|loop|torch.sort|lovasz)" | head -n 40
