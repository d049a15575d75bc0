#!/usr/bin/env bash
# Set up (a .venv in the repository, when missing) and train: `bash launch/quickstart.sh [key=value ...]`.
#   CONFIG=configs/X.yaml picks another run config (default configs/tutorial.yaml).
#   Data: with DIST_CIFAR_DATA=DIR (an image folder with train/ and test/, e.g. ../shared/data/cifar10-jpeg)
#   it trains on that; otherwise torchvision's CIFAR-10 is downloaded into ./data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import dist_cifar, torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" || .venv/bin/pip install -q torch torchvision
    .venv/bin/pip install -q -e .
fi
download=()
[[ -n ${DIST_CIFAR_DATA:-} ]] || download=(data.download=true)
exec .venv/bin/dist-cifar-train --config "${CONFIG:-configs/tutorial.yaml}" "${download[@]}" "$@"
