#!/usr/bin/env bash
# Copies FILES of commit COMMIT of the git directory SRC into DEST (replaced whole, atomically
# by rename), with the full commit hash in DEST/COMMIT: public code read and run beside jitfast,
# never committed (DEST is git-ignored). Used by official_code.sh and official_pmf.sh.
#
#   benchmarks/copy_official.sh SRC COMMIT DEST FILE...
set -euo pipefail
SRC=$1 COMMIT=$2 DEST=$3
shift 3
full=$(git -C "$SRC" rev-parse --verify -q "$COMMIT^{commit}" 2>/dev/null) || {
  echo "error: cannot read commit $COMMIT in '$SRC'; pass a git directory that holds it" >&2
  exit 1
}
tmp=$(mktemp -d "$DEST.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for f in "$@"; do
  mkdir -p "$tmp/$(dirname "$f")"
  git -C "$SRC" show "$full:$f" >"$tmp/$f" 2>/dev/null \
    || { echo "error: commit $full of '$SRC' has no $f" >&2; exit 1; }
done
echo "$full" >"$tmp/COMMIT"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "wrote $* of $full into $DEST/"
