#!/usr/bin/env bash
# The one script for a lent GPU machine (no network), ordered by value and time-boxed so that a
# cold H100/H200 returns its headline numbers first:
#   1. the benchmarks of benchmarks/gpu_plan.txt, most valuable first (B/16 training: eager
#      baseline, the official code, the graphed step; B/16 sampling at batch 1 and 128 beside the
#      official sampler; the fast samplers; L/16; the kernels; then the rest while time is left);
#   2. the profile of a B/16 training step and a sampling run (python -m jitfast.bench profile),
#      each part printed and saved as soon as it is done;
#   3. a smoke subset of the GPU tests with the time that is left (graph capture of the training
#      step and the sampler, the noise kernel, the graphed CLI's resume, the kernels in bf16).
# Every step is stopped by SIGINT at its deadline (then SIGKILL 20 s later), so pytest still ends
# its session and writes its JSON; besides, each benchmark's result is appended to bench.jsonl
# the moment it is measured, and the profile rewrites profile.json after each part: a time-out
# or a crash loses at most the number being measured.
# Writes to $OUT (default runs/device-check): bench.log, bench.json (pytest-benchmark's JSON, for
# benchmarks/results/), bench.jsonl, table.md, profile.md, profile.json, profile.log,
# gpu_tests.log; prints the table and the profile last. Without CUDA the same steps run on the
# CPU paths (small presets, the whole benchmark suite), which is how the script is checked off
# the GPU.
#
#   benchmarks/device_check.sh                  # 6 minutes in all
#   BUDGET_S=200 OUT=/tmp/check benchmarks/device_check.sh
#   BUDGET_S=$((60 + RANDOM % 40)) TAIL_S=0 benchmarks/device_check.sh   # rehearse a time-out
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/device-check}"
BUDGET_S="${BUDGET_S:-360}"          # the whole script, seconds
PROFILE_S="${PROFILE_S:-60}"         # kept for the profile
TESTS_S="${TESTS_S:-45}"             # kept for the GPU smoke tests, at the end
TAIL_S="${TAIL_S:-30}"               # no benchmark starts in the last TAIL_S s of its time
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# autotuning results on disk: the profile and the tests reuse the benchmarks' choices
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
start=$(date +%s)
left() { echo $((start + BUDGET_S - $(date +%s))); }
# run SECONDS CMD...: CMD stopped by SIGINT after SECONDS (at least 1; 0 would mean no limit)
run() { local s=$1; shift; timeout -s INT -k 20 "$([ "$s" -ge 1 ] && echo "$s" || echo 1)" "$@"; }

# No install (the GPU machine has no network and its pip could not install jitfast): from this
# checkout, jitfast imports as it is, and jitfast/__init__.py maps jitfast.kernels to kernels/.
"$PYTHON" -c "import jitfast.kernels" \
  || { echo "error: jitfast.kernels does not import from this checkout (above)" >&2; exit 1; }

cuda=0
if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  cuda=1
  "$PYTHON" -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch',
                torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv \
    2>/dev/null | tee "$OUT/nvidia-smi.csv"
  export JITFAST_BENCH_PLAN="${JITFAST_BENCH_PLAN:-benchmarks/gpu_plan.txt}"
fi
[ -d .official ] || echo "note: no .official/ (benchmarks/official_code.sh): the official code's rows are skipped"

echo "== benchmarks ($(left) s left) =="
export JITFAST_BENCH_DEADLINE=$((start + BUDGET_S - PROFILE_S - TESTS_S - TAIL_S))
export JITFAST_BENCH_LOG="$OUT/bench.jsonl"
rm -f "$OUT/bench.json" "$OUT/bench.jsonl"
run $(($(left) - PROFILE_S - TESTS_S)) "$PYTHON" -m pytest benchmarks/ --benchmark-only -q -rs \
  --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== profile ($(left) s left) =="
run $(($(left) - TESTS_S)) "$PYTHON" -m jitfast.bench profile --json "$OUT/profile.json" \
  --out "$OUT/profile.md" >"$OUT/profile.log" 2>&1
profile_status=$?

status=0
if [ "$cuda" -eq 1 ]; then
  echo "== GPU smoke tests ($(left) s left) =="
  # those that would start after the deadline are skipped (tests/conftest.py)
  JITFAST_TEST_DEADLINE=$(($(date +%s) + $(left) - 15)) run $(($(left) - 5)) \
    "$PYTHON" -m pytest -m gpu -q -rs tests/test_attention.py tests/test_step.py \
    tests/test_gpu_sampling.py \
    tests/test_draws.py tests/test_train.py tests/test_kernels_model.py tests/test_kernels_ops.py \
    tests/test_optimizer.py tests/test_kernels_dual.py \
    tests/test_gpu_training.py::test_pmf_training_replays_its_step_from_one_cuda_graph 2>&1 \
    | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
else
  echo "no CUDA device: the GPU tests are skipped, the benchmarks measured the CPU paths" \
    | tee "$OUT/gpu_tests.log"
fi

echo "== results ($OUT, $(($(date +%s) - start)) s) =="
results="$OUT/bench.json"
[ -s "$results" ] || results="$OUT/bench.jsonl"  # pytest never reached its session's end
if [ -s "$results" ]; then
  "$PYTHON" -m jitfast.bench report "$results" | tee "$OUT/table.md"
else
  echo "error: no benchmark finished (see $OUT/bench.log)"
  bench_status=1
fi
if [ -s "$OUT/profile.md" ]; then
  cat "$OUT/profile.md"
fi
if [ "$profile_status" -ne 0 ]; then
  echo "error: the profile failed or ran past its time (exit $profile_status):"
  tail -n 5 "$OUT/profile.log"
fi
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$profile_status" -eq 0 ]
