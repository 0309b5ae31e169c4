#!/usr/bin/env bash
# Issue 9 on the GPU machine, one call (<= 9.5 minutes) a part: the W8A8 runtime under CUDA graphs
# on both sides (torch.compile mode reduce-overhead), per call and where its time goes.
#   bash scripts/gpu_w8a8_check.sh OUT sd-w8a8   SD-v1.5-config UNet (random weights), policy all: w8a8
#                                               alone (~8 min cold: compile + autotune fill the caches)
#   bash scripts/gpu_w8a8_check.sh OUT sd        then, caches warm: bf16, bf16 and w8a8 with guards
#                                               skipped, w8a8 with full guards (~6 min)
#   bash scripts/gpu_w8a8_check.sh OUT sd-next   w8a8 with symmetric weight grids and the temporal
#                                               table (new kernel variants: cold, ~8 min)
#   bash scripts/gpu_w8a8_check.sh OUT sd-large  bf16 vs w8a8 (symmetric weights, table) at batch 8,
#                                               128x128 latents: where int8 may pay (cold, ~9 min)
#   bash scripts/gpu_w8a8_check.sh OUT bundled   bundled model, 1000-image sampling with graphs: w8a8
#                                               vs reference PSNR in fp32 first, then FP32 / bf16 /
#                                               w8a8 variants in one process (~8 min)
#   bash scripts/gpu_w8a8_check.sh OUT bundled-profile  bundled model, bf16 vs w8a8 kernels (~5 min)
#   bash scripts/gpu_w8a8_check.sh OUT attention fused attention (8-bit probabilities) vs explicit (~2 min)
#   bash scripts/gpu_w8a8_check.sh OUT sd-softmax8  SD w8a8 with 8-bit probabilities vs bf16 (cold, ~9 min)
#   bash scripts/gpu_w8a8_check.sh OUT tests     the runtime's CUDA tests (28 passed in the first
#                                               220 s in session 16: ~6-8 min; names logged)
# (carry .whl: the diffusers wheel). Every step has its own time limit; what finished is in OUT.
set -u
OUT=${1:?usage: gpu_w8a8_check.sh OUT sd-w8a8|sd|sd-next|sd-large|sd-softmax8|bundled|bundled-profile|attention|tests}; PART=${2:?usage: gpu_w8a8_check.sh OUT sd-w8a8|sd|sd-next|sd-large|sd-softmax8|bundled|bundled-profile|attention|tests}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
GPU_OMP_THREADS=8 source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case "$PART" in
  sd-w8a8)   # a cold machine: the w8a8 graph alone (its first compile + autotune is ~350 s), fills the caches
    (cd benchmarks && timeout 500 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs w8a8-fused --iters 30 --calls 3 --json "$OUT/profile_sd_w8a8.json" > "$OUT/profile_sd_w8a8.txt" 2>&1)
    echo "profile sd w8a8 rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  sd)        # warm caches (after sd-w8a8 on the same machine, or carried): bf16 as users compile it, bf16
             # and w8a8 with the guards skipped after the first call, then w8a8 checking them every call
    (cd benchmarks && timeout 330 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs bf16,bf16-skip-guards,w8a8-fused --iters 30 --calls 3 --json "$OUT/profile_sd_ro.json" \
        > "$OUT/profile_sd_ro.txt" 2>&1)
    echo "profile sd rc=$?" | tee -a "$OUT/gpu.txt"
    (cd benchmarks && timeout 200 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs w8a8-fused --full-guards --iters 30 --calls 3 --json "$OUT/profile_sd_full_guards.json" \
        > "$OUT/profile_sd_full_guards.txt" 2>&1)
    echo "profile sd full guards rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  sd-next)   # the kernel variants of session 15 (cold: their compile + autotune fill the caches, ~8 min):
             # symmetric weight grids (no activation sums) and the temporal block tabulated at load
    (cd benchmarks && timeout 540 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs w8a8-fused --weight-symmetric --temporal-table --iters 30 --calls 3 \
        --json "$OUT/profile_sd_next.json" > "$OUT/profile_sd_next.txt" 2>&1)
    echo "profile sd symmetric weights + temporal table rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  sd-large)  # where int8 throughput may count: the same UNet at batch 8, 128x128 latents (cold, ~9 min)
    (cd benchmarks && timeout 560 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --sd-batch 8 --sd-latent 128 --configs bf16,w8a8-fused --weight-symmetric --temporal-table --iters 20 \
        --calls 3 --json "$OUT/profile_sd_large.json" > "$OUT/profile_sd_large.txt" 2>&1)
    echo "profile sd batch 8 128x128 rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  bundled)   # the PSNR question first (w8a8 vs reference, fp32), then the sampling times, one process:
             # FP32 and bf16 graphs beside w8a8 (symmetric weights; temporal table) (~8 min cold)
    (cd benchmarks && timeout 560 python3 bench_inference.py --device cuda --parts bundled-graphs --graph-configs \
        "w8a8 reference fp32 eager,w8a8 w8a8 fp32 reduce-overhead,fp32 reduce-overhead,bf16 reduce-overhead,w8a8-symw w8a8 bf16 reduce-overhead,w8a8 w8a8 bf16 reduce-overhead temporal table,w8a8 w8a8 bf16 reduce-overhead" \
        --json "$OUT/bundled_graphs.json" > "$OUT/bundled_graphs.txt" 2>&1)
    echo "bench bundled-graphs rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  bundled-profile)  # where the bundled model's time goes: bf16 vs w8a8 (symmetric weights + table) (~5 min)
    (cd benchmarks && timeout 300 python3 profile_inference.py --model bundled --batch 250 --compile-mode reduce-overhead \
        --configs bf16,w8a8-fused --weight-symmetric --temporal-table --json "$OUT/profile_bundled.json" \
        > "$OUT/profile_bundled.txt" 2>&1)
    echo "profile bundled rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  attention) # the fused attention with 8-bit probabilities vs the explicit computation, per shape (~2 min)
    (cd benchmarks && timeout 300 python3 bench_quant_attention.py --json "$OUT/quant_attention.json" \
        > "$OUT/quant_attention.txt" 2>&1)
    echo "bench quant attention rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  sd-softmax8)  # SD w8a8 with calibration's default 8-bit probabilities (the fused kernel) vs bf16 (cold, ~9 min)
    (cd benchmarks && timeout 560 python3 profile_inference.py --model sd --policy all --compile-mode reduce-overhead \
        --configs bf16,w8a8-fused --weight-symmetric --temporal-table --softmax-bits 8 --iters 30 --calls 3 \
        --json "$OUT/profile_sd_softmax8.json" > "$OUT/profile_sd_softmax8.txt" 2>&1)
    echo "profile sd 8-bit probabilities rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  tests)
    TFMQ_INT8_AUTOTUNE=0 timeout 540 python3 -m pytest -v -p no:cacheprovider tests/test_int8_kernels.py \
        tests/test_runtime.py tests/test_temporal_table.py tests/test_quant_attention.py \
        -k "step or host_value or cuda_graph or reduce_overhead or symmetric or table or attention or custom_op or autotune" \
        > "$OUT/cuda_tests.txt" 2>&1
    echo "cuda tests rc=$?" | tee -a "$OUT/gpu.txt"
    ;;
  *) echo "unknown part $PART (sd-w8a8, sd, sd-next, sd-large, sd-softmax8, bundled, bundled-profile, attention or tests)"; exit 2 ;;
esac
# the caches, for a later session's .kernel_carry/ (files back from OUT: at most 16 MiB each)
for _c in triton_cache:$TRITON_CACHE_DIR inductor_cache:$TORCHINDUCTOR_CACHE_DIR; do
  tar -czf "$OUT/${_c%%:*}.tgz" -C "${_c#*:}" . 2>/dev/null
  [ "$(stat -c %s "$OUT/${_c%%:*}.tgz" 2>/dev/null || echo 0)" -lt 16000000 ] || rm -f "$OUT/${_c%%:*}.tgz"
done
ls -l "$OUT"/*.tgz 2>/dev/null | tee -a "$OUT/gpu.txt"
grep -h "wall .* ms per call\|host launch\|^bf16\|^w8a8\|^reference\|seconds  PSNR" "$OUT"/*.txt 2>/dev/null | head -30
