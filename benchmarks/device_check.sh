#!/usr/bin/env bash
# The one script for a lent GPU machine (no network): the GPU tests (pytest -m gpu tests/), then
# the benchmark suite, inside a time budget. Writes to $OUT (default runs/device-check):
# gpu_tests.log, bench.log, bench.json (pytest-benchmark's JSON, for benchmarks/results/) and
# table.md, and prints the table last. Without CUDA it skips the GPU tests and benchmarks the
# CPU paths, which is how it is checked off the GPU machine.
#
#   benchmarks/device_check.sh                  # 8 minutes in all
#   BUDGET_S=120 OUT=/tmp/check benchmarks/device_check.sh
#
# The budget holds with `timeout`; benchmarks that would start within TAIL_S of its end are
# skipped (JITFAST_BENCH_DEADLINE), so the JSON is still written.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/device-check}"
BUDGET_S="${BUDGET_S:-480}"              # the whole script, seconds
TESTS_S="${TESTS_S:-$((BUDGET_S / 4))}"  # at most this much for the GPU tests
TAIL_S="${TAIL_S:-75}"                   # room for the last benchmark (a compile) and the report
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((start + BUDGET_S - $(date +%s))); }

# jitfast.kernels is the kernels/ folder under the package's name: it needs jitfast installed
if ! "$PYTHON" -c "import jitfast.kernels" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "error: could not install jitfast (pip install -e .)" >&2; exit 1; }
fi

status=0
if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch',
                torch.__version__, '| CUDA', torch.version.cuda)"
  echo "== GPU tests: pytest -m gpu tests/ =="
  timeout "$TESTS_S" "$PYTHON" -m pytest -m gpu tests/ -q -rs 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
else
  echo "no CUDA device: the GPU tests are skipped, the benchmarks measure the CPU paths" \
    | tee "$OUT/gpu_tests.log"
fi

echo "== benchmarks: pytest benchmarks/ --benchmark-only ($(left) s left) =="
export JITFAST_BENCH_DEADLINE=$((start + BUDGET_S - TAIL_S))
rm -f "$OUT/bench.json"
bench_s=$(($(left) - 10)); [ "$bench_s" -ge 1 ] || bench_s=1  # timeout 0 would mean none
timeout "$bench_s" "$PYTHON" -m pytest benchmarks/ --benchmark-only -q -rs \
  --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "== results ($OUT) =="
if [ ! -s "$OUT/bench.json" ]; then
  echo "error: no benchmark JSON (the suite failed or ran past the budget; see $OUT/bench.log)"
  exit 1
fi
"$PYTHON" -m jitfast.bench report "$OUT/bench.json" | tee "$OUT/table.md"
[ "$status" -eq 0 ] && [ "$bench_status" -eq 0 ]
