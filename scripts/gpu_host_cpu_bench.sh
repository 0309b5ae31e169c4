#!/usr/bin/env bash
# Issue 10 on the GPU machine's 16-core host CPU: benchmarks/bench_cpu.py with OpenVINO.
# OpenVINO is not installed there and its wheel (59 MB) does not fit one call's carry limit beside
# the tree, so a CPU-only, ONNX-only cut of it (CPU plugin + ONNX frontend + Python bindings; GPU /
# NPU plugins and other frontends removed; 22 MB as tar.xz, sha256 below) travels in two halves,
# .ov/a/part_00 and .ov/b/part_01 (ignored paths; rebuild them with `bash scripts/gpu_host_cpu_bench.sh pack`
# here). Back-to-back calls on one warm machine (it keeps /tmp):
#
#   run(carry=[".whl", ".ov/a"]):  bash scripts/gpu_host_cpu_bench.sh stage
#   run(carry=[".whl", ".ov/b"]):  bash scripts/gpu_host_cpu_bench.sh prepare "$OUT"   # quantize + export
#   run(carry=[".whl"]):           bash scripts/gpu_host_cpu_bench.sh measure "$OUT"   # the timed rows
set -u
MODE=${1:?usage: gpu_host_cpu_bench.sh pack|stage|prepare OUT|measure OUT}
cd "$(dirname "$0")/.."
SHA=8b5b7dc9163ad28895baab4908ac2c87883d7b5f3e265ca867498e0c61279efd
PARTS=/tmp/tfmq_ov_parts; OVSITE=/tmp/tfmq_ov_site; WORK=/tmp/tfmq_cpu_work
THREADS=${THREADS:-16}; SD_SCALE=${SD_SCALE:-1.0}
case "$MODE" in
  pack)     # on the CPU machine: the two halves from the cp312 wheel
    tmp=$(mktemp -d); pip download openvino==2026.4.1 --no-deps --python-version 3.12 --only-binary=:all: \
        --platform manylinux_2_28_x86_64 -d "$tmp" -q && (cd "$tmp" && unzip -q ./*.whl -d x && cd x &&
      rm -f openvino/libs/libopenvino_intel_{gpu,npu}_plugin.so openvino/libs/libopenvino_{tensorflow,tensorflow_lite,pytorch,paddle,gguf,jax}_frontend.so* &&
      tar -cf - openvino openvino-*.dist-info | xz -9 -T2 > "$tmp/ov.tar.xz")
    mkdir -p .ov/a .ov/b && split -b 11000000 -d "$tmp/ov.tar.xz" "$tmp/part_" && mv "$tmp/part_00" .ov/a/ &&
      mv "$tmp/part_01" .ov/b/ && sha256sum "$tmp/ov.tar.xz"; rm -rf "$tmp" ;;
  stage)
    mkdir -p "$PARTS" && cp .ov/a/part_00 "$PARTS/" && ls -la "$PARTS" ;;
  prepare|measure)
    OUT=${2:?an output folder}; mkdir -p "$OUT"
    if [ ! -d "$OVSITE/openvino" ]; then
      cp .ov/b/part_01 "$PARTS/" || exit 1
      cat "$PARTS/part_00" "$PARTS/part_01" > "$PARTS/ov.tar.xz"
      echo "$SHA  $PARTS/ov.tar.xz" | sha256sum -c - || exit 1
      mkdir -p "$OVSITE" && tar -xJf "$PARTS/ov.tar.xz" -C "$OVSITE"
    fi
    EXTRA_PYTHONPATH=$OVSITE source scripts/gpu_env.sh
    { lscpu | grep -i "model name\|^CPU(s)"; grep -o -w "avx2\|avx512f\|avx512_vnni\|avx_vnni\|avx512_bf16\|amx_tile\|amx_int8\|amx_bf16" /proc/cpuinfo | sort | uniq -c; } > "$OUT/cpu.txt"
    python3 -c "import openvino, onnxruntime; print('openvino', openvino.__version__, 'onnxruntime', onnxruntime.__version__)" >> "$OUT/cpu.txt" 2>&1
    extra=$([ "$MODE" = prepare ] && echo --prepare-only)
    timeout 560 python3 benchmarks/bench_cpu.py --threads "$THREADS" --machine h100host16core --sd-scale "$SD_SCALE" \
        --work "$WORK" $extra --json "$OUT/h100host16core.json" > "$OUT/bench_cpu_$MODE.log" 2>&1
    echo "rc=$?" >> "$OUT/bench_cpu_$MODE.log"; tail -25 "$OUT/bench_cpu_$MODE.log" ;;
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
