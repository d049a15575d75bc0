#!/usr/bin/env bash
# The GPU numbers in the README, in one script: airbench94 over 5 seeds (bf16, then fp16),
# a ResNet-18 run, and a fp16 smoke run, on one GPU; or (stage peers, on its own) the peer benchmark:
# airbench94 and the tutorial's loop beside dist_cifar (`python -m dist_cifar.bench --gpu`).
#
#   [STAGES="smoke_fp16 airbench94 airbench94_fp16 resnet18"] bash launch/gpu_bench.sh DATA OUT
#   STAGES=peers bash launch/gpu_bench.sh DATA OUT      # (not yet timed on a GPU): OUT/peers.json, OUT/peers.log
#
# DATA: an image folder (train/<class>/, test/<class>/), or a .npz pack of one made with
#       `python launch/pack_images.py SRC pack.npz` (how the data travels to a machine with no network).
# OUT:  where the logs and summaries go.
# Stage limits keep the whole script under TOTAL_SECONDS (555); a stage that runs out is reported as such.
# peers needs the airbench package: installed from PyPI when missing, or from AIRBENCH_SDIST (the file
# `pip download airbench==0.1.8 --no-deps` gives) on a machine without a network. Its repeats:
# PEERS_AIRBENCH_REPEATS (5, both airbench94 rows) and PEERS_TUTORIAL_REPEATS (2, both tutorial rows).
set -u
DATA=$1
OUT=$2
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export DIST_CIFAR_CACHE=${DIST_CIFAR_CACHE:-/tmp/dist_cifar_cache}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"

if [[ $DATA == *.npz ]]; then
    $PY launch/pack_images.py --unpack "$DATA" /tmp/cifar10-jpeg
    DATA=/tmp/cifar10-jpeg
fi
COMMON=(data.name=imagefolder "data.root=$DATA")

STAGES=" ${STAGES:-smoke_fp16 airbench94 airbench94_fp16 resnet18} "
stage() {  # stage NAME SECONDS COMMAND...  (runs only if NAME is in $STAGES)
    local name=$1 limit=$2
    shift 2
    [[ $STAGES == *" $name "* ]] || return 0
    local s=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - s )) s (script at $(elapsed) s)"
    grep -E "seeds|Accuracy of the network|error|Error|warning" "$OUT/$name.log" | tail -n 4
}

# 1. fp16 + grad scaler on the GPU, and the data cache built once (all 16 cores decode)
stage smoke_fp16 90 $PY dist_cifar/train.py --config configs/smoke.yaml "${COMMON[@]}" \
    train.mixed_precision=fp16 "output_dir=$OUT/runs/smoke_fp16"

# 2. airbench94, eager, 5 seeds after an uncounted 1-epoch warm-up
stage airbench94 150 $PY -m dist_cifar.sweep --config configs/airbench94.yaml --seeds 0-4 \
    --out "$OUT/runs/airbench94" --warmup-epochs 1 "${COMMON[@]}"

# 3. airbench94 in fp16 autocast (with a grad scaler) instead of bf16
stage airbench94_fp16 150 $PY -m dist_cifar.sweep --config configs/airbench94.yaml --seeds 0-4 \
    --out "$OUT/runs/airbench94_fp16" --warmup-epochs 1 "${COMMON[@]}" train.mixed_precision=fp16

# 4. the peers beside dist_cifar, interleaved, each run its own process (dist_cifar/bench/gpu.py), and one
#    torchrun run (the NCCL path); the JSON is rewritten after every run, so a stage that runs out keeps its rows
if [[ $STAGES == *" peers "* ]] && ! $PY -c "import airbench" 2>/dev/null; then
    $PY -m pip install -q --no-deps "${AIRBENCH_SDIST:-airbench==0.1.8}" || echo "== peers: could not install airbench"
fi
left=$(( ${TOTAL_SECONDS:-555} - $(elapsed) ))
stage peers $(( left > 60 ? left : 60 )) $PY -m dist_cifar.bench --gpu --data "$DATA" --out "$OUT/peers.json" \
    --work "$OUT/peers-work" --airbench-repeats "${PEERS_AIRBENCH_REPEATS:-5}" \
    --tutorial-repeats "${PEERS_TUTORIAL_REPEATS:-2}"
[[ $STAGES == *" peers "* ]] && sed -n '/^### /,$p' "$OUT/peers.log"

# 5. ResNet-18, one GPU, one seed, RESNET_EPOCHS epochs in what is left of ~9 minutes
#    (metrics.jsonl tells how far it got if the time runs out)
left=$(( ${TOTAL_SECONDS:-555} - $(elapsed) ))
stage resnet18 $(( left > 30 ? left : 30 )) $PY dist_cifar/train.py --config configs/resnet18.yaml "${COMMON[@]}" \
    "output_dir=$OUT/runs/resnet18" "train.epochs=${RESNET_EPOCHS:-40}" train.eval_every_epochs=5 \
    "train.per_device_batch_size=${RESNET_BATCH:-256}"

# keep the small files only
find "$OUT/runs" \( -name "*.safetensors" -o -name "state.pt" \) -delete 2>/dev/null
find "$OUT/peers-work" \( -name "*.safetensors" -o -name "*.pt" -o -name "*.npy" \) -delete 2>/dev/null
for s in airbench94 airbench94_fp16; do
    [[ -f $OUT/runs/$s/summary.json ]] && cp "$OUT/runs/$s/summary.json" "$OUT/$s-summary.json"
done
echo "done in $(elapsed) s"
