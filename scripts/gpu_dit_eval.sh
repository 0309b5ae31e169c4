#!/usr/bin/env bash
# Issue 11 on the GPU machine, in one call: the trained DiT (fmnist-dit) evaluated FP / naive /
# qdiff / tfmq at W8A8 and W4A8 (N images per cell, DDIM 100, seed 0, real Fashion-MNIST test
# reference), then the temporal-feature analysis of qdiff vs tfmq; the CUDA tests of the
# calibration loops first (graph capture is turned off for the evaluation if they fail).
#   bash scripts/gpu_dit_eval.sh OUT [N] [EVAL_LIMIT_S]      (carry .whl)
set -u
OUT=${1:?usage: gpu_dit_eval.sh OUT [N] [EVAL_LIMIT_S]}; N=${2:-1000}; LIMIT=${3:-420}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
GPU_OMP_THREADS=8 source scripts/gpu_env.sh
W=${TMPDIR:-/tmp}/dit_eval_$$
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/log.txt"
GRAPHS=${GRAPHS:-true}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$SECONDS
  timeout 100 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fast_loop.py >> "$OUT/log.txt" 2>&1
  rc=$?; echo "fast-loop cuda tests rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  [ $rc -ne 0 ] && GRAPHS=false
fi
evaluate() {   # evaluate GRAPHS SECONDS: finished cells in $W are reused by a second run
  timeout "$2" python3 -m tfmq evaluate fmnist-dit --methods fp,naive,qdiff,tfmq --bits w8a8,w4a8 \
      --num-images "$N" --calib-size 128 --device cuda --out "$W" \
      --set recon_iters=500 --set act_learn_iters=200 --set tiar_iters=500 --set recon_cuda_graphs=$1 \
      2>&1 | grep -v "it/s\|s/it\|unit/s" >> "$OUT/log.txt"
  return ${PIPESTATUS[0]}
}
start=$SECONDS
evaluate $GRAPHS "$LIMIT"; rc=$?
echo "evaluate rc=$rc in $((SECONDS - start)) s (graphs $GRAPHS)" | tee -a "$OUT/log.txt"
left=$((LIMIT - (SECONDS - start)))
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$GRAPHS" = true ] && [ $left -gt 60 ]; then
  evaluate false "$left"; rc=$?
  echo "evaluate (again, graphs off) rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
fi
timeout 60 python3 -m tfmq analyze "$W/cells/qdiff-w4a8/checkpoint" "$W/cells/tfmq-w4a8/checkpoint" \
    "$W/cells/qdiff-w8a8/checkpoint" "$W/cells/tfmq-w8a8/checkpoint" --model fmnist-dit \
    --labels qdiff-W4A8,tfmq-W4A8,qdiff-W8A8,tfmq-W8A8 --device cuda --out "$W/analyze" >> "$OUT/log.txt" 2>&1
echo "analyze rc=$?" | tee -a "$OUT/log.txt"
cat "$W/report.md" 2>/dev/null | head -60
(cd "$W" && tar -czf "$OUT/dit_eval.tar.gz" --exclude='*.npz' --exclude='checkpoint' . 2>/dev/null)
ls -la "$OUT"
