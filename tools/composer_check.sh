#!/usr/bin/env bash
# fxblur.composer in MosaicML Composer's own environment: Composer pins a torch of its own,
# so this makes a fresh virtual environment with it, installs fxblur there, and runs
# tests/test_composer.py (a Trainer training the rewrite; outputs and logged layer counts
# equal to Composer's BlurPool) and fxblur/composer.py's docstring example.
#
#   tools/composer_check.sh          # mosaicml 0.32.1
#   tools/composer_check.sh 0.31.0   # another release
set -euo pipefail
cd "$(dirname "$0")/.."

composer_version="${1:-0.32.1}"
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"

# Composer's requirements choose torch and torchvision first; fxblur accepts any torch >= 2.4.
pip install --quiet "mosaicml==$composer_version" pytest hypothesis
pip install --quiet -e .  # its requirements are met by then: pip keeps Composer's torch
python -c "import composer, torch; print('composer', composer.__version__, 'torch', torch.__version__)"
python -m pytest -q -p no:xdist -o addopts="--doctest-modules" tests/test_composer.py fxblur/composer.py \
    tests/test_docs_code.py -k "composer or production"
