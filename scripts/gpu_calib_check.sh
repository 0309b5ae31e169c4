#!/usr/bin/env bash
# Issue 12 on the GPU machine, in one call (<= 9 minutes): the CUDA tests of the calibration loops,
# then the calibration benchmark of tfmq and of qdiff at the project's DEFAULT settings on the
# google/ddpm-cifar10-32-config UNet (35.7M parameters, RANDOM weights), each stopped cleanly by
# its own time limit (the JSON then says complete: false and how far it got).
#
#   bash scripts/gpu_calib_check.sh "$OUT"          (carry .whl: the diffusers wheel)
#
# Environment knobs: TFMQ_LIMIT / QDIFF_LIMIT (seconds per benchmark run, default 215 / 190),
# METHODS (default "tfmq qdiff") picks the benchmark runs, SKIP_TESTS=1 skips the CUDA tests, PROFILE=1 also runs benchmarks/profile_calibration.py (about a minute more; tar'ed;
# PROFILE_ARGS are passed on, e.g. "--stage fsc act_learning").
# Writes at most 8 files into OUT: env.txt, tests.log, tfmq_default.json, tfmq.log,
# qdiff_default.json, qdiff.log, profile.tar.gz (with PROFILE=1).
set -u
OUT=${1:?usage: gpu_calib_check.sh OUT}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
GPU_OMP_THREADS=4 source scripts/gpu_env.sh

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'python', sys.version.split()[0])"
  git log --oneline -1 2>/dev/null; } > "$OUT/env.txt" 2>&1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
start=$SECONDS
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fast_loop.py tests/test_reconstruction.py \
    tests/test_fsc.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/tests.log"
fi

for m in ${METHODS:-tfmq qdiff}; do
  limit=$([ "$m" = tfmq ] && echo "${TFMQ_LIMIT:-215}" || echo "${QDIFF_LIMIT:-190}")
  start=$SECONDS
  timeout $((limit + 45)) python3 benchmarks/bench_calibration.py --device cuda --method "$m" --run default \
      --time-limit "$limit" --no-progress --json "$OUT/${m}_default.json" > "$OUT/$m.log" 2>&1
  echo "$m rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/$m.log"
  tail -15 "$OUT/$m.log"
done

if [ "${PROFILE:-0}" = 1 ]; then
  P=${TMPDIR:-/tmp}/tfmq_profile_$$
  timeout 150 python3 benchmarks/profile_calibration.py --out "$P" --method tfmq ${PROFILE_ARGS:-} > "$P.log" 2>&1
  echo "profile rc=$?" >> "$P.log"; mv "$P.log" "$P/"
  tar -czf "$OUT/profile.tar.gz" -C "$P" .
fi
ls -la "$OUT"
