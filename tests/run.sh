#!/usr/bin/env bash
# Set up (a fresh .venv when missing) and run the whole test suite: `bash tests/run.sh [pytest args]`.
# Needs Python 3.10+ and the CIFAR-10 image folder at ../shared/data/cifar10-jpeg (or $DIST_CIFAR_TEST_DATA).
# The SLURM tests install and start test clusters (root and apt-get, or slurm already installed); without
# those they are skipped, and this script says so once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
# install PACKAGES...: uv when it can (about 4x faster than pip for torch's 5 GB of wheels), with pip's
# own settings (indexes, find-links, version caps, certificates) passed on to it; pip when uv cannot.
# uv_settings reads pip's settings and installs uv, once. Bytecode: uv, unlike pip, writes no .pyc files
# at install, and where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) Python writes none at
# import either, so every process compiled torch's sources again: `import torch, torch._dynamo,
# accelerate, torchvision` took 15.9 CPU-s in such a venv against 6.1 with the .pyc files (2026-11-29).
# compileall writes them after the install, whichever installer ran (45 s for torch on 2 cores; 7 s when
# they are all there). Not uv's UV_COMPILE_BYTECODE: when that step fails after uv has placed the
# packages (seen here when its compile workers were killed), the pip fallback finds them installed and
# compiles none of them.
uv_env=() uv_checked=
uv_settings() {
    uv_checked=1
    local line key value
    uv_env=(UV_INDEX_STRATEGY=unsafe-best-match)
    while IFS= read -r line; do
        key=${line%%=*} value=${line#*=}
        value=${value#\'} value=${value%\'}
        case ${key##*.} in
            index-url) uv_env+=("UV_DEFAULT_INDEX=$value") ;;
            extra-index-url) uv_env+=("UV_INDEX=$value") ;;
            find-links) uv_env+=("UV_FIND_LINKS=${value// /,}") ;;
            constraint) uv_env+=("UV_CONSTRAINT=$value") ;;
            cert) uv_env+=("SSL_CERT_FILE=$value") ;;
        esac
    done < <(.venv/bin/python -m pip config list 2>/dev/null || true)
    [[ -x .venv/bin/uv ]] || .venv/bin/python -m pip install -q uv 2>/dev/null || uv_env=()
}
install() {
    [[ -n $uv_checked ]] || uv_settings
    if [[ ${#uv_env[@]} -gt 0 ]] && env "${uv_env[@]}" .venv/bin/uv pip install -q --python .venv/bin/python "$@"; then
        return 0
    fi
    echo "tests/run.sh: uv could not install $*; using pip" >&2
    .venv/bin/pip install -q "$@"
}
if ! .venv/bin/python -c "import dist_cifar, pytest, xdist, torch, torchvision, airbench" 2>/dev/null; then
    # On machines whose pip is capped at these versions (and holds them on disk) this is offline.
    install "torch==2.14.1" "torchvision==0.29.1" || install torch torchvision
    install -e ".[test,bench]"
    # exit status 1 when any file does not compile (some packages ship deliberately broken test files):
    # such a file only lacks its .pyc
    .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true
fi
# Two pytest-xdist workers unless the arguments choose (-n N, -p no:xdist): the suite spends about
# half its time waiting on processes and SLURM, so two workers keep both cores busy. Each test file
# runs whole in one worker, longest files first (tests/conftest.py).
workers=(-n "${TEST_WORKERS:-2}")
for arg in "$@"; do
    case $arg in -n | -n* | --numprocesses* | no:xdist) workers=() ;; esac
done
if [[ ${DIST_CIFAR_SKIP_SLURM:-} != 1 ]]; then
    why=
    if [[ $(id -u) -ne 0 ]]; then
        why="not running as root"
    elif ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; then
        why="slurm is not installed and apt-get is not available"
    fi
    if [[ -n $why ]]; then
        echo "tests/run.sh: skipping the SLURM tests ($why): they start SLURM test clusters (munged, slurmctld," \
             "slurmd), which needs root and apt-get; run as root to include them" >&2
        export DIST_CIFAR_SKIP_SLURM=1
    fi
fi
# Two phases: every test but the `alone` ones (timed comparisons) in parallel, then those one at a time
# with nothing beside them (beside other tests a timed run swings 2x). Both read one decoded-image cache.
alone_args=() skip=
for arg in "$@"; do  # the same arguments without xdist's
    if [[ -n $skip ]]; then skip=; continue; fi
    case $arg in
        -n | --numprocesses | --dist | --maxprocesses) skip=1 ;;
        -n* | --numprocesses=* | --dist=* | --maxprocesses=*) ;;
        *) alone_args+=("$arg") ;;
    esac
done
own_cache=
if [[ -z ${DIST_CIFAR_TEST_CACHE:-} ]]; then
    own_cache=$(mktemp -d /tmp/dist_cifar_test_cache.XXXXXX)
    export DIST_CIFAR_TEST_CACHE=$own_cache
    trap 'rm -rf "$own_cache"' EXIT
fi
set +e
DIST_CIFAR_TEST_PHASE=shared .venv/bin/python -m pytest "${workers[@]}" "$@"
rc=$?
alone_rc=5
if [[ $rc -eq 0 || $rc -eq 1 || $rc -eq 5 ]]; then  # not after an interruption or a usage error
    echo "tests/run.sh: the timed tests, alone" >&2
    DIST_CIFAR_TEST_PHASE=alone .venv/bin/python -m pytest -p no:xdist "${alone_args[@]}"
    alone_rc=$?
fi
set -e
if [[ $rc -eq 5 && $alone_rc -eq 5 ]]; then
    echo "tests/run.sh: pytest collected no tests: failing" >&2
    exit 1
fi
[[ $rc -eq 5 ]] && rc=0
[[ $alone_rc -eq 5 ]] && alone_rc=0
(( rc != 0 )) && exit $rc
exit $alone_rc
