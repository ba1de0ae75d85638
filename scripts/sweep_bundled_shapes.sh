#!/usr/bin/env bash
# The short scaling sweep behind the bundled model's shape (data/README.md): a few shapes, each trained for about the
# same wall time on this machine with scripts/train_bundled_model.py, held-out loss against tokens seen in
# out/sweep/<shape>/curve.jsonl. Steps per shape = seconds x that shape's measured tokens/s (bench/sft_speed.py) / 2048.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/aclImdb_v1.tar.gz}
run() {  # name n_layer n_head n_embd steps
  python scripts/train_bundled_model.py --data "$DATA" --work-dir "out/sweep/$1" --out "out/sweep/$1/model" \
    --n-layer "$2" --n-head "$3" --n-embd "$4" --steps "$5" --warmup-steps 50 --eval-every 50 --eval-windows 128 \
    --checkpoint-every 1000
}
run L4-d128 4 4 128 "${STEPS_A:-900}"
run L6-d256 6 4 256 "${STEPS_B:-450}"
run L8-d384 8 6 384 "${STEPS_C:-190}"
