#!/usr/bin/env bash
# One visit to a GPU machine for the explainers, everything written under $OUT:
#   1. evaluate_xai.py on the first 1,000 test records with the shipped checkpoint: the
#      README's evaluation table (every method, curves every 4 px);
#   2. deletion + insertion speed on 10,000 images at 1-px steps, fp32 then bf16;
#   3. every method's throughput.
# Usage:  CIFAR10_DIR=/path/to/cifar-10-batches-bin OUT=gpu_results bash benchmarks/gpu_visit_xai.sh
# A dry run on CPU: EVAL_FLAGS="--num-images 8 --chunk 8 ..." BENCH_FLAGS="--width 8 ..."
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
deadline=$((SECONDS + ${BUDGET_S:-480}))
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }
stamp() { echo "== $(date -u +%H:%M:%S) +${SECONDS}s: $*"; }
{
  stamp "machine"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  stamp "evaluation"
  timeout "$(( $(left) - 150 ))" python3 evaluate_xai.py --checkpoint pretrained/cifar10_cnn.pkl \
    --step 4 --chunk 250 --batch-size 2048 --output-dir "$OUT" --quiet ${EVAL_FLAGS:-}
  echo "evaluation rc $?"
  for precision in fp32 bf16; do
    stamp "deletion + insertion speed, $precision"
    timeout "$(left)" python3 benchmarks/bench_xai.py --no-reference --repeats 5 --quiet \
      --deletion-images 10000 --deletion-step 1 --deletion-chunk 1000 --deletion-batch 8192 \
      --precision "$precision" ${BENCH_FLAGS:-} | tail -n 1
  done
  if (( $(left) > 40 )); then
    stamp "methods"
    timeout "$(left)" python3 benchmarks/bench_xai.py --no-reference --repeats 5 --quiet \
      --methods --method-batch 256 ${BENCH_FLAGS:-}
  fi
  stamp "done"
} 2>&1 | tee "$OUT/log"
