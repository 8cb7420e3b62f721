#!/usr/bin/env bash
# Writes the official pixel MeanFlow JAX training code (github Lyy-iiis/pMF, branch main, commit
# 75f6073: pmf.py, models/ and the configs) into .official-pmf-jax/ at the repo root, for the pMF
# objective's parity (tests/fixtures/make_pmf_objective_fixture.py, tests/test_pmf_objective.py)
# and the recipe's values (tests/fixtures/make_pmf_configs_fixture.py; the code runs on
# the CPU with pip install jax==0.4.34 jaxlib==0.4.34 flax==0.10.4), and the optimizer and EMA
# updates (tests/fixtures/make_muon_fixture.py, with optax==0.2.5). .official-pmf-jax/ is
# git-ignored: public code is read and run here, never committed.
#
#   benchmarks/official_pmf_jax.sh [GIT_DIR]   # a clone holding that commit; default: the mirror
set -euo pipefail
cd "$(dirname "$0")/.."

SRC="${1:-/work/.mirror/Lyy-iiis+pMF/repo}"
COMMIT=75f6073042c21f7104686261a0c4784db4ede9d1
FILES=(pmf.py models/pmfDiT.py models/embedder.py models/torch_models.py configs/default.py
       configs/pMF_B_16_config.yml configs/pMF_B_32_config.yml configs/pMF_L_16_config.yml
       configs/pMF_L_32_config.yml utils/ema_util.py utils/trainstate_util.py)

exec benchmarks/copy_official.sh "$SRC" "$COMMIT" .official-pmf-jax "${FILES[@]}"
