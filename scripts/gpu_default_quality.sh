#!/usr/bin/env bash
# Issue 12 on the GPU machine, in one call: the bundled model (fmnist-ddpm) calibrated by tfmq and
# qdiff at W4A8 with the project's DEFAULT settings (256 trajectories, 2,000 AdaRound / 500
# act-step / 2,000 TIAR iterations, CUDA graphs on), N images per cell, DDIM 100, seed 0.
# The GPU machine has no FID network: the evaluation stops at FID; finish it on a CPU machine by
# running the same command (--device cpu) on the unpacked folder (finished cells are reused).
#   bash scripts/gpu_default_quality.sh OUT [N] [LIMIT_S]      (carry .whl)
set -u
OUT=${1:?usage: gpu_default_quality.sh OUT [N] [LIMIT_S]}; N=${2:-1000}; LIMIT=${3:-480}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
GPU_OMP_THREADS=8 source scripts/gpu_env.sh
W=${TMPDIR:-/tmp}/default_quality_$$
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/log.txt"
start=$SECONDS
timeout "$LIMIT" python3 -m tfmq evaluate fmnist-ddpm --methods fp,tfmq,qdiff --bits w4a8 \
    --num-images "$N" --device cuda --out "$W" ${EVAL_ARGS:-} 2>&1 | grep -v "it/s\|s/it\|unit/s" >> "$OUT/log.txt"
echo "evaluate rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
tail -5 "$OUT/log.txt"
(cd "$W" && tar -czf "$OUT/default_quality.tar.gz" --exclude='checkpoint' . 2>/dev/null)
ls -la "$OUT"
