#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most ~8 minutes on one H100/H200, ending in one summary table.
#   bash bench/gpu_check.sh            # from the repository root, on a CUDA machine
# What it runs: the CUDA-only tests (bf16 autocast, CUDA generation, fused kernels on the GPU), bench/dpo_step.py
# against TRL with its MFU column, bench/generate.py, and `train.py --preset tiny` on the GPU. bench/ needs
# bench/requirements.txt (TRL, PEFT, transformers); missing packages skip their rows, they do not stop the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minidpo-gpu-check}
mkdir -p "$OUT"
python - <<'PY' || { echo "gpu_check: no CUDA device visible to torch; nothing to do"; exit 1; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name|$rc|$(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}
: > "$OUT/steps.txt"
step tests_cuda 120 python -m pytest -q -k "cuda or bf16 or gpu" tests/
step dpo_step 180 python bench/dpo_step.py
step generate 90 python bench/generate.py --device cuda
step tiny_gpu 150 python train.py --preset tiny --device cuda --out-dir "$OUT/tiny" --overwrite

echo
echo "| step | exit | seconds | result |"
echo "|---|---|---|---|"
while IFS='|' read -r name rc secs; do
  case $name in
    tests_cuda) res=$(grep -E "passed|failed|skipped" "$OUT/$name.log" | tail -1) ;;
    tiny_gpu) res=$(grep -E "policy reward" "$OUT/$name.log" | tail -1) ;;
    *) res=$(grep -iE "ratio|x TRL|mfu|tok/s" "$OUT/$name.log" | tail -3 | tr '\n' ' ') ;;
  esac
  echo "| $name | $rc | $secs | ${res:0:160} |"
done < "$OUT/steps.txt"
