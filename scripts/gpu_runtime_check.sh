#!/usr/bin/env bash
# GPU machine: CUDA tests of the runtime and the int8 kernels, then the inference benchmark.
# Usage (repo root, diffusers wheel in .whl/): bash scripts/gpu_runtime_check.sh OUT_DIR PARTS
set -uo pipefail
OUT=${1:?output folder}; PARTS=${2:-bundled}
GPU_OMP_THREADS=${GPU_OMP_THREADS:-8} source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the kernels' own tests: tests/test_int8_kernels.py (run with TFMQ_INT8_AUTOTUNE=0, see NOTES_int8.md)
  TFMQ_INT8_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_runtime.py 2>&1 | tee "$OUT/cuda_tests.txt"
fi
python3 benchmarks/bench_inference.py --device cuda --parts "$PARTS" ${BENCH_ARGS:-} --json "$OUT/inference_${PARTS//,/_}.json" 2>&1 | tee "$OUT/bench_${PARTS//,/_}.txt"
