"""What symmetric weight grids cost in fidelity: W8A8 with asymmetric vs symmetric per-channel weights.

Symmetric weights (zero-points 0) let the w8a8 GEMMs skip the activation sums of the zero-point
correction (``tfmq.runtime.kernels.int8``), so their input quantizers are elementwise. This
measures what that choice costs on a trained model: the bundled Fashion-MNIST DDPM quantized
with each method at W8A8, asymmetric and symmetric weights alike (same calibration data and
settings), and the PSNR of ``--num-images`` images against the FP model's from the same noise
(fake-quant models, i.e. the calibrated numbers). Prints a table and writes JSON::

    python benchmarks/weight_symmetry_quality.py --json benchmarks/results/inference/weight_symmetry_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import tfmq
from results_io import pooled_psnr, write_results
from tfmq.sampling import SamplerConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="naive,tfmq", help="comma-separated (default naive,tfmq)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of calibration and sampling (default 20)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                   help="integer config settings for every method, e.g. recon_iters=200 (repeatable)")
    args = p.parse_args(argv)
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = int(value)
        except ValueError:
            p.error(f"--set {item!r}: KEY=INT expected")
    sampler = SamplerConfig("ddim", args.steps)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    out = {"device": device, "torch": torch.__version__, "settings": vars(args) | {"json": str(args.json)},
           "model": f"bundled Fashion-MNIST DDPM (trained), W8A8, {args.num_images} images, DDIM {args.steps}",
           "rows": []}
    fp = tfmq.load_pipeline(tfmq.default_model_path(), args.device)
    ref = tfmq.generate(fp, sampler, args.num_images, args.batch, seed=args.seed, progress=False)
    del fp
    print(f"{out['model']}; {device}")
    for method in args.methods.split(","):
        for symmetric in (False, True):
            pipe = tfmq.load_pipeline(tfmq.default_model_path(), args.device)
            cfg = tfmq.QuantConfig.for_method(method, wbits=8, abits=8, calib_size=args.calib_size, sampler=sampler,
                                              weight_symmetric=symmetric, **extra)
            t0 = time.perf_counter()
            tfmq.quantize(pipe, cfg, progress=False)
            calib_s = time.perf_counter() - t0
            imgs = tfmq.generate(pipe, sampler, args.num_images, args.batch, seed=args.seed, progress=False)
            row = {"method": method, "weights": "symmetric" if symmetric else "asymmetric",
                   "psnr_vs_fp_db": pooled_psnr(imgs, ref), "calibration_s": round(calib_s, 1)}
            out["rows"].append(row)
            print(f"  {method:6s} {row['weights']:10s} PSNR vs FP {row['psnr_vs_fp_db']:6.2f} dB "
                  f"(calibration {calib_s:.0f} s)", flush=True)
            del pipe
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
