"""Attention with 8-bit probabilities on the GPU: the fused kernel against the explicit computation.

TFMQ's default calibration quantizes the attention probabilities with the activation bits (8), so
the w8a8 runtime cannot hand such an attention to flash attention. Before session 16 it ran the
explicit matmuls (score and probability matrices written to memory); now it runs
``tfmq.runtime.kernels.attention.quant_attention`` (two passes over the keys, nothing written but
the output). Per attention shape of the models benchmarked elsewhere, this times (CUDA events,
median of ``--iters`` after warm-up, each call a CUDA-graph replay so launch costs do not count):

* ``fused``: the kernel (what the w8a8 runtime runs now), rounding q, k, v to their grids as it
  loads them;
* ``explicit compiled``: the explicit computation under ``torch.compile`` (what a compiled w8a8
  graph ran before: q / k / v rounding and Inductor's softmax + rounding kernels, cuBLAS matmuls);
* ``flash, unquantized``: ``scaled_dot_product_attention`` without any rounding (the FP model's
  attention: a lower bound, not the same computation);

and states the largest difference of ``fused`` from the explicit computation (same inputs, bf16).
Prints a table and writes JSON (the device named).

    python benchmarks/bench_quant_attention.py --json benchmarks/results/inference/quant_attention_h200.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import cuda_graph, time_call  # noqa: E402
from results_io import write_results  # noqa: E402

from tfmq.runtime.kernels import attention as A  # noqa: E402
from tfmq.runtime.kernels import int8 as K  # noqa: E402

# (name, batch, heads, query tokens, key tokens, head dim): the attentions of the benchmarked models
SHAPES = [
    ("bundled 16x16 self, batch 250", 250, 1, 256, 256, 64),
    ("bundled mid 4x4 self, batch 250", 250, 1, 16, 16, 96),
    ("SD v1.5 64x64 self, batch 2", 2, 8, 4096, 4096, 40),
    ("SD v1.5 64x64 cross, batch 2", 2, 8, 4096, 77, 40),
    ("SD v1.5 32x32 self, batch 2", 2, 8, 1024, 1024, 80),
    ("SD v1.5 16x16 self, batch 2", 2, 8, 256, 256, 160),
    ("SD v1.5 8x8 self, batch 2", 2, 8, 64, 64, 160),
]


def run_shape(name, b, h, nq, nk, d, iters: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, nq, h, d, device="cuda", generator=gen).transpose(1, 2).to(torch.bfloat16)
    k = torch.randn(b, nk, h, d, device="cuda", generator=gen).transpose(1, 2).to(torch.bfloat16)
    v = torch.randn(b, nk, h, d, device="cuda", generator=gen).transpose(1, 2).to(torch.bfloat16)
    scale_tab = torch.full((100,), 1.0 / 255, device="cuda")      # a per-step table, as calibrated
    zero_tab = torch.zeros(100, device="cuda")
    step = torch.tensor(50, device="cuda")
    qkv = [torch.full((100,), 0.03, device="cuda"), torch.full((100,), 128.0, device="cuda")] * 3   # q, k, v grids
    args = (q, k, v, d ** -0.5, scale_tab, zero_tab, 0, 255, step, False, qkv, 0, 255)
    explicit = torch.compile(A.ref_quant_attention, fullgraph=True)
    row = {"shape": name, "batch": b, "heads": h, "q_tokens": nq, "k_tokens": nk, "head_dim": d,
           "score_matrix_mb": b * h * nq * nk * 2 / 2**20}
    fused_out = A.quant_attention(*args)
    ref_out = A.ref_quant_attention(*args)
    row["max_abs_diff_vs_explicit"] = float((fused_out.float() - ref_out.float()).abs().max())
    row["max_abs_output"] = float(ref_out.float().abs().max())
    for label, fn in (("fused", lambda: A.quant_attention(*args)),
                      ("explicit compiled", lambda: explicit(*args)),
                      ("flash, unquantized", lambda: F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5))):
        try:
            replay, _ = cuda_graph(fn)
            row[label] = time_call(replay, iters, 5)["median_ms"]
        except Exception as exc:  # noqa: BLE001  (a configuration that fails is reported, not fatal)
            row[label] = None
            row[label + " error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    if not K.available():
        print("error: this benchmark times the CUDA kernel; no CUDA GPU (cc >= 8.0) with Triton here", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "dtype": "bfloat16", "settings": {"iters": args.iters}, "rows": []}
    cols = ("fused", "explicit compiled", "flash, unquantized")
    print(f"{'attention':34s} " + " ".join(f"{c:>18s}" for c in cols) + f" {'speed-up':>9s} {'max diff':>9s}")
    for shape in SHAPES:
        r = run_shape(*shape, args.iters)
        out["rows"].append(r)
        sp = r["explicit compiled"] / r["fused"] if r["fused"] and r["explicit compiled"] else float("nan")
        print(f"{r['shape']:34s} " + " ".join(f"{r[c]:18.4f}" if r[c] is not None else f"{'failed':>18s}"
                                               for c in cols)
              + f" {sp:9.2f} {r['max_abs_diff_vs_explicit']:9.4f}", flush=True)
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
