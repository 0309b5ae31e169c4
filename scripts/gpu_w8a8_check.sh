#!/usr/bin/env bash
# Issue 9 on the GPU machine, one call (<= 9.5 minutes) a part: the W8A8 runtime under CUDA graphs
# on both sides (torch.compile mode reduce-overhead), per call and where its time goes.
#   bash scripts/gpu_w8a8_check.sh OUT sd        SD-v1.5-config UNet (random weights), policy all:
#                                               bf16 vs w8a8 (~7 min), then how Triton lowers the
#                                               int8 kernels for this GPU (~1 min)
#   bash scripts/gpu_w8a8_check.sh OUT bundled   bundled model: bf16 / w8a8 / reference profile
#                                               (~3.5 min), 1000-image sampling with graphs
#                                               (bench_inference bundled-graphs, ~3.5 min), the
#                                               runtime's CUDA tests
# (carry .whl: the diffusers wheel). Every step has its own time limit; what finished is in OUT.
set -u
OUT=${1:?usage: gpu_w8a8_check.sh OUT sd|bundled}; PART=${2:?usage: gpu_w8a8_check.sh OUT sd|bundled}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
GPU_OMP_THREADS=8 source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(c[0] * 10 + c[1])")
case "$PART" in
  sd)
    (cd benchmarks && timeout 470 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs bf16,w8a8-fused --iters 30 --calls 3 --json "$OUT/profile_sd_ro.json" > "$OUT/profile_sd_ro.txt" 2>&1)
    echo "profile sd rc=$?" | tee -a "$OUT/gpu.txt"
    timeout 60 python3 benchmarks/check_int8_lowering.py --arch "$arch" --json "$OUT/lowering.json" > "$OUT/lowering.txt" 2>&1
    echo "lowering rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  bundled)
    (cd benchmarks && timeout 230 python3 profile_inference.py --model bundled --batch 250 --compile-mode reduce-overhead \
        --configs bf16,w8a8-fused,reference --json "$OUT/profile_bundled_ro.json" > "$OUT/profile_bundled_ro.txt" 2>&1)
    echo "profile bundled rc=$?" | tee -a "$OUT/gpu.txt"
    (cd benchmarks && timeout 230 python3 bench_inference.py --device cuda --parts bundled-graphs --graph-configs \
        "bf16 reduce-overhead,w8a8 reference fp32 eager,w8a8 w8a8 bf16 reduce-overhead,w8a8 reference bf16 reduce-overhead,w4a8 weight-only bf16 reduce-overhead" \
        --json "$OUT/bundled_graphs.json" > "$OUT/bundled_graphs.txt" 2>&1)
    echo "bench bundled-graphs rc=$?" | tee -a "$OUT/gpu.txt"
    TFMQ_INT8_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_int8_kernels.py \
        tests/test_runtime.py -k "step or host_value or cuda_graph or reduce_overhead" > "$OUT/cuda_tests.txt" 2>&1
    echo "cuda tests rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  *) echo "unknown part $PART (sd or bundled)"; exit 2 ;;
esac
grep -h "wall .* ms per call\|host launch\|^bf16\|^w8a8\|^reference\|seconds  PSNR" "$OUT"/*.txt 2>/dev/null | head -30
