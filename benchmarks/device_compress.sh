#!/usr/bin/env bash
# One GPU visit for the compression card (issue 28): fine-tunes the variants that need
# training (structured and magnitude pruning, int4 quantisation-aware) of the shipped CNN
# and ResNet-20, each variant in its own run so that what finished survives a timeout.
# The CPU then measures them with `compress_xai.py --variants-from DIR` (size, accuracy,
# speed, survival, faithfulness all on this CPU); only the fine-tuning ran here.
#
# Staging (on the CPU machine, from the repo root): ../shared/device/stage-data.sh, the
# parts re-split to fit beside the working tree into .devdata/p-??, each carried to the
# device and moved to /tmp/c10/; qwix's wheel in .whl/. Then, on the device:
#     EPOCHS=10 bash benchmarks/device_compress.sh
# Writes under $OUT: device.log, and <checkpoint>.tar.xz holding the
# variants' checkpoints and reports.
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?run on the device machine, where OUT is set}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
if [[ ! -d ${CIFAR10_DIR:-/nonexistent} ]]; then
    if [[ ! -d /tmp/c10/cifar-10-batches-bin ]]; then
        cat /tmp/c10/p-?? | tar -xJ -C /tmp/c10 || exit 1
        (cd /tmp/c10/cifar-10-batches-bin && sha256sum --quiet -c SHA256SUMS) || exit 1
    fi
    export CIFAR10_DIR=/tmp/c10/cifar-10-batches-bin
fi
EPOCHS=${EPOCHS:-10}
LIMIT=${LIMIT:-120}   # seconds per variant at most
EXTRA=${EXTRA:-}      # more compress_xai.py flags
nvidia-smi -L 2>/dev/null
DEADLINE=${DEADLINE:-480}  # seconds: no variant starts after it, so the tarballs are written
for run in ${RUNS:-cifar10_cnn:filters cifar10_cnn:sparse90 cifar10_cnn:sparse70 \
        cifar10_cnn:sparse50 resnet20:filters resnet20:sparse90 resnet20:sparse70 \
        resnet20:sparse50 resnet20:int4_weights_qat cifar10_cnn:int4_weights_qat}; do
    checkpoint=${run%%:*} variant=${run#*:}
    left=$((DEADLINE - SECONDS)); (( left > 20 )) || { echo "no time for $run"; continue; }
    timeout "$(( left < LIMIT ? left : LIMIT ))" python3 compress_xai.py \
        --checkpoint "pretrained/$checkpoint.pkl" --variants "$variant" --parts accuracy \
        --finetune-epochs "$EPOCHS" --filter-criterion bn_scale \
        --output-dir "/tmp/runs/$checkpoint/$variant" $EXTRA >> "$OUT/device.log" 2>&1
    echo "$run: exit $? after ${SECONDS}s" | tee -a "$OUT/device.log"
    grep -E "^\| (original|$variant) " "/tmp/runs/$checkpoint/$variant/compression.md" 2>/dev/null
done
for d in /tmp/runs/*/; do
    checkpoint=$(basename "$d"); mkdir -p "/tmp/out/$checkpoint"
    for v in "$d"*/; do
        cp "$v"variants/* "/tmp/out/$checkpoint/" 2>/dev/null
        cp "$v"compression.json "/tmp/out/$checkpoint/$(basename "$v").card.json" 2>/dev/null
    done
    tar -C "/tmp/out/$checkpoint" -cJf "$OUT/$checkpoint.tar.xz" .
done
ls -l "$OUT"
