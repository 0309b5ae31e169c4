"""The convolutions a W8A8 model keeps at full-precision input: W8A16 kernel vs the reference path.

Under the ``tfmq-official`` layer policy the input of every resnet ``conv1`` of a UNet stays in
full precision, so the ``w8a8`` backend cannot run these 22 convolutions (the largest of the SD
v1.5 UNet) on int8 tensor cores. Per shape (SD v1.5, batch 2, 64x64 latents, bf16, channels_last)
this times, with CUDA events (median of ``--iters`` warm calls):

* ``cudnn_bf16``: ``F.conv2d`` with a bf16 weight already in memory (the FP model's cost);
* ``expand+cudnn``: the packed 8-bit codes expanded to the bf16 weight, then ``F.conv2d`` (what the
  ``w8a8`` backend did for these layers before the W8A16 kernel, and what ``reference`` does);
* ``w8a16``: :func:`tfmq.runtime.kernels.w8a16.w8a16_conv2d` (int8 codes dequantized in registers).
  (A variant over a zero-padded copy of the input was timed here too, slower: results/w8a16/
  h200_v3_and_padded.txt, and removed.)

Random codes and inputs (the timing does not depend on the values). Prints a table, writes JSON::

    python benchmarks/bench_w8a16.py --json benchmarks/results/w8a16_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_inference import time_call
from tfmq.runtime import PackedWeight
from tfmq.runtime.kernels import int8, w8a16

# (cin, cout, resolution) of the SD v1.5 UNet's 22 resnet conv1 (3x3, stride 1, padding 1), with
# how many times each occurs
SD15_CONV1 = [(320, 320, 64, 2), (320, 640, 32, 1), (640, 640, 32, 1), (640, 1280, 16, 1),
              (1280, 1280, 16, 1), (1280, 1280, 8, 4), (2560, 1280, 8, 3), (2560, 1280, 16, 2),
              (1920, 1280, 16, 1), (1920, 640, 32, 1), (1280, 640, 32, 1), (960, 640, 32, 1),
              (960, 320, 64, 1), (640, 320, 64, 2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    if not int8.available():
        sys.exit("needs a CUDA GPU of compute capability >= 8.0 with Triton")
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for cin, cout, res, count in SD15_CONV1:
        shape = (cout, cin, 3, 3)
        qw = PackedWeight(torch.randint(0, 256, (cout * cin * 9,), device=dev, dtype=torch.uint8, generator=g),
                          torch.rand(cout, device=dev, generator=g) * 0.01 + 1e-3,
                          torch.randint(100, 156, (cout,), device=dev, generator=g).float(), shape, 8, 0)
        x = torch.randn(args.batch, cin, res, res, device=dev, generator=g).to(dt).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(cout, device=dev, generator=g).to(dt)
        w_bf16 = qw.dequantize(dt).contiguous(memory_format=torch.channels_last)
        w8, zo = w8a16.prepare_weight(qw.codes(), qw.zero_point, int8.offset_for(qw.qmin, qw.qmax))
        fns = {"cudnn_bf16": lambda: F.conv2d(x, w_bf16, bias, 1, 1),
               "expand+cudnn": lambda: F.conv2d(x, qw.dequantize(dt), bias, 1, 1),
               "w8a16": lambda: w8a16.w8a16_conv2d(x, w8, zo, qw.scale, bias, 1, 1)}
        err = float((fns["w8a16"]().float() - fns["cudnn_bf16"]().float()).abs().max())
        row = {"cin": cin, "cout": cout, "res": res, "count": count, "max_abs_diff_vs_cudnn": err}
        for name, fn in fns.items():
            row[name + "_us"] = time_call(fn, args.iters, 5)["median_ms"] * 1e3
        row["w8a16_vs_expand"] = row["expand+cudnn_us"] / row["w8a16_us"]
        row["w8a16_vs_cudnn"] = row["cudnn_bf16_us"] / row["w8a16_us"]
        rows.append(row)
        print(f"{cin:5d}->{cout:5d} @{res:3d} x{count}: cuDNN bf16 {row['cudnn_bf16_us']:7.1f} us, expand+cuDNN "
              f"{row['expand+cudnn_us']:7.1f}, W8A16 {row['w8a16_us']:7.1f} ({row['w8a16_vs_expand']:.2f}x expand, "
              f"{row['w8a16_vs_cudnn']:.2f}x cuDNN), max |diff| {err:.3g}", flush=True)
    total = {k: sum(r[k] * r["count"] for r in rows)
             for k in ("cudnn_bf16_us", "expand+cudnn_us", "w8a16_us")}
    print(f"all 22 conv1 of one UNet call: cuDNN bf16 {total['cudnn_bf16_us']:.0f} us, expand+cuDNN "
          f"{total['expand+cudnn_us']:.0f} us, W8A16 {total['w8a16_us']:.0f} us")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "batch": args.batch, "dtype": "bfloat16", "rows": rows, "total_us": total},
                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
