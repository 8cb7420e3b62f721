#!/usr/bin/env bash
# Writes the official JiT code (LTH14/JiT as first published, commit 869190a: model_jit.py,
# denoiser.py, util/model_util.py) into .official/ at the repo root, for
# benchmarks/test_bench_official.py to time beside jitfast. .official/ is git-ignored: public code
# is read and measured here, never committed; carry it to a GPU machine as an ignored path.
#
#   benchmarks/official_code.sh [GIT_DIR]   # a clone holding that commit; default: the mirror below
set -euo pipefail
cd "$(dirname "$0")/.."

SRC="${1:-/work/.mirror/yashbelhe+jitmask/repo}"
COMMIT=869190a
FILES=(model_jit.py denoiser.py util/model_util.py)

exec benchmarks/copy_official.sh "$SRC" "$COMMIT" .official "${FILES[@]}"
