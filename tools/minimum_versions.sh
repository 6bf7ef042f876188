#!/usr/bin/env bash
# Run the test suite on the oldest torch and torchvision pyproject.toml accepts, in a fresh
# virtual environment (as .ci/run does for the newest). Skips name what that torch lacks.
#
#   tools/minimum_versions.sh              # torch 2.4.1, torchvision 0.19.1
#   tools/minimum_versions.sh 2.5.1 0.20.1 # any other pair
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version="${1:-2.4.1}"
torchvision_version="${2:-0.19.1}"
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"

pip install --quiet -e '.[test]' "torch==$torch_version" "torchvision==$torchvision_version"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python -m pytest -q -rs
