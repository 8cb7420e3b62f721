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

full=$(git -C "$SRC" rev-parse --verify -q "$COMMIT^{commit}" 2>/dev/null) || {
  echo "error: cannot read commit $COMMIT (the original official JiT code) in '$SRC';" \
       "pass a git directory that holds it: benchmarks/official_code.sh GIT_DIR" >&2
  exit 1
}
tmp=$(mktemp -d .official.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
for f in "${FILES[@]}"; do
  mkdir -p "$tmp/$(dirname "$f")"
  git -C "$SRC" show "$full:$f" >"$tmp/$f" 2>/dev/null \
    || { echo "error: commit $full of '$SRC' has no $f" >&2; exit 1; }
done
echo "$full" >"$tmp/COMMIT"  # recorded in the benchmarks' extra_info
rm -rf .official
mv "$tmp" .official
trap - EXIT
echo "wrote ${FILES[*]} of $full into .official/"
