#!/usr/bin/env bash
# Set up (a fresh .venv when missing) and run the whole test suite: `bash tests/run.sh [pytest args]`.
# Needs Python 3.10+; the SLURM tests install and start a single-node cluster (root, apt), and
# use the CIFAR-10 image folder at ../shared/data/cifar10-jpeg (or $DIST_CIFAR_TEST_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import dist_cifar, pytest, xdist, torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    # On machines whose pip is capped at these versions (and holds them on disk) this is offline.
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" || .venv/bin/pip install -q torch torchvision
    .venv/bin/pip install -q -e ".[test]"
fi
export DIST_CIFAR_CACHE=${DIST_CIFAR_CACHE:-$(mktemp -d /tmp/dist_cifar_cache.XXXXXX)}
# Two pytest-xdist workers unless the arguments choose (-n N, -p no:xdist): the suite spends about
# half its time waiting on processes and SLURM, so two workers keep both cores busy. Each test file
# runs whole in one worker, longest files first (tests/conftest.py).
workers=(-n "${TEST_WORKERS:-2}")
for arg in "$@"; do
    case $arg in -n | -n* | --numprocesses* | no:xdist) workers=() ;; esac
done
set +e
.venv/bin/python -m pytest "${workers[@]}" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "tests/run.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit $rc
