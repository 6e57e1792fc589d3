#!/usr/bin/env bash
# One visit to a GPU machine, everything written under $OUT (see DEVELOPERS notes in the
# README's Benchmark section for how the data gets there):
#   1. training throughput alone on the GPU: batch 128/256/512, fp32 and bf16;
#   2. the default recipe, 50 epochs, fp32: the run that replaces the pretrained checkpoint;
#   3. the seed recipe and the default recipe in bf16, 50 epochs each, side by side (their
#      epoch times are shared-GPU times, not throughput);
#   4. the explainers' throughput, if time is left.
# Usage:  CIFAR10_DIR=/path/to/cifar-10-batches-bin OUT=gpu_results bash benchmarks/gpu_visit.sh
# A dry run on CPU: TRAIN_FLAGS=--smoke BENCH_FLAGS="--width 8 --steps 4" XAI_FLAGS="--width 8"
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the side-by-side runs share the GPU
deadline=$((SECONDS + ${BUDGET_S:-480}))
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }
stamp() { echo "== $(date -u +%H:%M:%S) +${SECONDS}s: $*"; }

train() {  # train NAME FLAGS...: writes NAME.pkl, .json, .png and .log under $OUT
  local name=$1; shift
  timeout "$(left)" python3 train_cifar10.py --output "$OUT/$name.pkl" \
    --history-plot "$OUT/$name.png" --checkpoint-dir "/tmp/states/$name" "$@" \
    ${TRAIN_FLAGS:-} > "$OUT/$name.log" 2>&1  # states stay off $OUT: tens of MB each
  echo "$name: rc $? after ${SECONDS}s; $(tail -n 1 "$OUT/$name.log")"
}

{
  stamp "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  stamp "training throughput"
  timeout "$(left)" python3 benchmarks/bench_train.py --batch-size 128 256 512 \
    --precision fp32 bf16 --steps 702 --quiet ${BENCH_FLAGS:-}
  stamp "default recipe, fp32, 50 epochs"
  train cifar10_cnn
  stamp "seed recipe and default recipe in bf16, side by side"
  train seed_recipe --recipe seed &
  train default_bf16 --precision bf16 &
  wait
  if (( $(left) > 60 )); then
    stamp "explainers"
    timeout "$(left)" python3 benchmarks/bench_xai.py --no-reference --quiet ${XAI_FLAGS:-}
  fi
  stamp "done"
} 2>&1 | tee "$OUT/log"
