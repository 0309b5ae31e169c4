#!/usr/bin/env bash
# GPU machine, one host with >= 2 GPUs (issue 13): the multi-GPU CLI under accelerate launch and
# torchrun, then benchmarks/bench_multi_gpu.py (sampling and calibration, 1 vs NPROC GPUs, and the
# equality of their results). The carried diffusers wheel is installed by scripts/gpu_env.sh.
# Usage (repo root): bash scripts/gpu_multi_check.sh OUT_DIR [NPROC]
# Writes OUT_DIR/gpu.txt, cli_check.txt, bench_multi_gpu.{txt,json,md}.
set -uo pipefail
OUT=${1:?output folder}; NPROC=${2:-2}
GPU_OMP_THREADS=${OMP_NUM_THREADS:-4} source scripts/gpu_env.sh
python3 -c "import diffusers" || { echo "diffusers is not importable: carry .whl" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
W=$(mktemp -d /tmp/tfmq-multi-XXXX)
# the benchmark first (the targets; BENCH_LIMIT seconds at most), then the CLI under the launchers
timeout "${BENCH_LIMIT:-600}" python3 benchmarks/bench_multi_gpu.py --device cuda --nproc "$NPROC" \
    --work "$W/bench" --json "$OUT/bench_multi_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_multi_gpu.txt"
{
  S="sample --device cuda --num-images 96 --batch-size 16 --steps 20 --seed 5"
  echo "== tfmq $S: 1 process, accelerate launch x$NPROC, torchrun x$NPROC"
  python3 -m tfmq $S --out "$W/one" > "$W/one.json"
  accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
      --dynamo_backend no -m tfmq $S --out "$W/acc" > "$W/acc.json" 2> "$W/acc.err" || tail -20 "$W/acc.err"
  torchrun --standalone --nproc_per_node "$NPROC" -m tfmq $S --out "$W/tr" > "$W/tr.json" 2> "$W/tr.err" || tail -20 "$W/tr.err"
  python3 - "$W" <<'PY'
import sys, numpy as np
w = sys.argv[1]
one = np.load(f"{w}/one/samples.npz")["arr_0"]
for name in ("acc", "tr"):
    try:
        x = np.load(f"{w}/{name}/samples.npz")["arr_0"]
    except OSError as exc:
        print(name, "FAILED:", exc); continue
    print(name, "images", x.shape, "equal to 1 process:", bool(np.array_equal(one, x)),
          "max abs diff", int(np.abs(one.astype(int) - x.astype(int)).max()))
PY
  echo "== too many processes must be refused with a clear message"
  torchrun --standalone --nproc_per_node $(( $(nvidia-smi -L | wc -l) + 1 )) -m tfmq sample --device cuda \
      --num-images 4 --out "$W/bad" 2>&1 | grep -m2 "error" || echo "(no error line)"
} 2>&1 | tee "$OUT/cli_check.txt"
