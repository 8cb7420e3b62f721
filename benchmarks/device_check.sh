#!/usr/bin/env bash
# The one script for a lent GPU machine (no network), ordered by value and time-boxed so that a
# cold H100 returns its headline numbers within 6 minutes:
#   1. a smoke subset of the GPU tests (<= 90 s): graph capture of the training step and the
#      sampler, the noise kernel, the graphed CLI's resume, the kernels in bf16 (the rest of
#      `pytest -m gpu`, e.g. the 200-step bf16 loss curve, is for a longer slot);
#   2. the benchmarks of benchmarks/gpu_plan.txt, most valuable first (B/16 training: eager
#      baseline and graphed step; B/16 sampling at batch 1 and 128; L/16 training; the kernels at
#      the B/16 shapes; then the rest while time is left);
#   3. the profile of a B/16 training step and a sampling run (python -m jitfast.bench profile).
# Writes to $OUT (default runs/device-check): gpu_tests.log, bench.log, bench.json
# (pytest-benchmark's JSON, for benchmarks/results/), table.md, profile.md and profile.json;
# prints the table and the profile last. Without CUDA the same steps run on the CPU paths
# (small presets, the whole benchmark suite), which is how the script is checked off the GPU.
#
#   benchmarks/device_check.sh                  # 6 minutes in all
#   BUDGET_S=200 OUT=/tmp/check benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/device-check}"
BUDGET_S="${BUDGET_S:-360}"          # the whole script, seconds
TESTS_S="${TESTS_S:-90}"             # at most this much for the GPU tests
PROFILE_S="${PROFILE_S:-45}"         # kept for the profile at the end
TAIL_S="${TAIL_S:-40}"               # room for the last benchmark to finish
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
start=$(date +%s)
left() { echo $((start + BUDGET_S - $(date +%s))); }
at_least_1() { [ "$1" -ge 1 ] && echo "$1" || echo 1; }  # timeout 0 would mean no limit

# No install (the GPU machine has no network and its pip could not install jitfast): from this
# checkout, jitfast imports as it is, and jitfast/__init__.py maps jitfast.kernels to kernels/.
"$PYTHON" -c "import jitfast.kernels" \
  || { echo "error: jitfast.kernels does not import from this checkout (above)" >&2; exit 1; }

status=0
if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch',
                torch.__version__, '| CUDA', torch.version.cuda)"
  echo "== GPU smoke tests (at most $TESTS_S s) =="
  JITFAST_TEST_DEADLINE=$(($(date +%s) + TESTS_S)) timeout $((TESTS_S + 60)) \
    "$PYTHON" -m pytest -m gpu -q -rs tests/test_step.py \
    tests/test_gpu_sampling.py tests/test_draws.py tests/test_train.py tests/test_kernels_model.py \
    tests/test_kernels_ops.py 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}  # those that would start after TESTS_S are skipped (tests/conftest.py)
  export JITFAST_BENCH_PLAN="${JITFAST_BENCH_PLAN:-benchmarks/gpu_plan.txt}"
else
  echo "no CUDA device: the GPU tests are skipped, the benchmarks measure the CPU paths" \
    | tee "$OUT/gpu_tests.log"
fi

echo "== benchmarks ($(left) s left) =="
export JITFAST_BENCH_DEADLINE=$((start + BUDGET_S - PROFILE_S - TAIL_S))
rm -f "$OUT/bench.json"
timeout "$(at_least_1 $(($(left) - PROFILE_S)))" "$PYTHON" -m pytest benchmarks/ \
  --benchmark-only -q -rs --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== profile ($(left) s left) =="
timeout "$(at_least_1 $(($(left) - 5)))" "$PYTHON" -m jitfast.bench profile \
  --json "$OUT/profile.json" >"$OUT/profile.md" 2>"$OUT/profile.log"
profile_status=$?

echo "== results ($OUT, $(($(date +%s) - start)) s) =="
if [ -s "$OUT/bench.json" ]; then
  "$PYTHON" -m jitfast.bench report "$OUT/bench.json" | tee "$OUT/table.md"
else
  echo "error: no benchmark JSON (the suite failed or ran past the budget; see $OUT/bench.log)"
  bench_status=1
fi
if [ "$profile_status" -eq 0 ]; then
  cat "$OUT/profile.md"
else
  echo "error: the profile failed or ran past the budget (exit $profile_status):"
  tail -n 5 "$OUT/profile.log"
fi
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$profile_status" -eq 0 ]
