#!/usr/bin/env bash
# GPU machine: CUDA tests of the runtime and the int8 kernels, then the inference benchmark.
# Usage (repo root, diffusers wheel in .whl/): bash scripts/gpu_runtime_check.sh OUT_DIR PARTS
set -uo pipefail
OUT=${1:?output folder}; PARTS=${2:-bundled}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_int8_kernels.py 2>&1 | tail -25 | tee "$OUT/cuda_tests.txt"
fi
python3 benchmarks/bench_inference.py --device cuda --parts "$PARTS" --json "$OUT/inference_${PARTS//,/_}.json" 2>&1 | tee "$OUT/bench_${PARTS//,/_}.txt"
