#!/usr/bin/env bash
# Writes the official pixel MeanFlow PyTorch port (github Lyy-iiis/pMF, branch torch, commit
# 990e81a: pmf.py and models/) into .official-pmf/ at the repo root, for the pMF parity script
# (tests/fixtures/make_pmf_fixture.py, benchmarks/pmf_parity.py) and the pMF benchmarks to run
# beside jitfast. .official-pmf/ is git-ignored: public code is read and run here, never committed.
#
#   benchmarks/official_pmf.sh [GIT_DIR]   # a clone holding that commit; default: the mirror below
set -euo pipefail
cd "$(dirname "$0")/.."

SRC="${1:-/work/.mirror/Lyy-iiis+pMF/repo}"
COMMIT=990e81a84249dbd68a128accef67eb95621d10b1
FILES=(pmf.py models/pmfDiT.py models/embedder.py models/torch_models.py)

exec benchmarks/copy_official.sh "$SRC" "$COMMIT" .official-pmf "${FILES[@]}"
