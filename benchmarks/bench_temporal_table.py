"""The temporal block tabulated at load (``tfmq.load(..., temporal_table=True)``) vs computed every call.

Model: the bundled Fashion-MNIST DDPM (trained weights), quantized in the run with tfmq W8A8 at
timing-only calibration settings (no reconstruction iterations; per-step FSC parameters of the
temporal block, DDIM ``--steps``). Loaded twice with the same backend, it reports per row: the
runtime layers left in the model, its resident bytes (``runtime_nbytes``), the eager per-call
time over one sampling trajectory (batch ``--batch``, median of ``--repeats`` trajectories;
wall clock, synchronised on CUDA) and, for the tabulated model, the PSNR / largest pixel
difference of ``--num-images`` sampled images against the block-computed ones (same noise).
Prints a table and writes JSON::

    python benchmarks/bench_temporal_table.py --json benchmarks/results/inference/temporal_table_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tfmq
from tfmq.runtime import runtime_layers, runtime_nbytes
from tfmq.sampling import SamplerConfig
from results_io import pooled_psnr, write_results


def trajectory_ms(unet, x: torch.Tensor, timesteps: list[int], repeats: int) -> float:
    """Median over ``repeats`` of the mean eager per-call milliseconds along the trajectory."""
    per = []
    with torch.no_grad():
        for _ in range(repeats + 1):                  # the first trajectory warms up
            unet.tfmq_steps.reset()
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for t in timesteps:
                unet(x, torch.full((x.shape[0],), t, device=x.device))
            if x.is_cuda:
                torch.cuda.synchronize()
            per.append((time.perf_counter() - t0) / len(timesteps) * 1e3)
    return float(np.median(per[1:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", help="runtime backend of both loads (default reference)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of calibration and sampling (default 20)")
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="batch of the timed calls (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed trajectories per model (default 3)")
    p.add_argument("--num-images", type=int, default=32, help="images compared (default 32)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    sampler = SamplerConfig("ddim", args.steps)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} threads)")
    out = {"device": device, "torch": torch.__version__, "settings": vars(args) | {"json": str(args.json)},
           "model": "bundled Fashion-MNIST DDPM (trained), tfmq W8A8, timing-only calibration (no "
                    "reconstruction iterations), per-step FSC parameters of the temporal block", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tfmq.load_pipeline(tfmq.default_model_path(), args.device)
        cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=args.calib_size, sampler=sampler,
                                          recon_iters=0, act_learn_iters=0, tiar_iters=0)
        tfmq.quantize(pipe, cfg, progress=False)
        ckpt = tfmq.save(pipe, Path(tmp) / "ckpt")
        del pipe
        c = tfmq.load(ckpt).unet.config
        x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size,
                        generator=torch.Generator().manual_seed(args.seed)).to(args.device)
        images = {}
        for table in (False, True):
            t0 = time.perf_counter()
            loaded = tfmq.load(ckpt, args.device, backend=args.backend, temporal_table=table)
            load_s = time.perf_counter() - t0
            unet = loaded.unet
            layers = runtime_layers(unet)
            row = {"temporal": "table at load" if table else "block every call", "load_s": round(load_s, 2),
                   "runtime_layers": len(layers),
                   "quantized_layers": sum(1 for m in layers.values() if m.qweight is not None),
                   "runtime_bytes": runtime_nbytes(unet)["total"],
                   "call_ms": trajectory_ms(unet, x, [int(t) for t in unet.tfmq_info["timesteps"]], args.repeats)}
            images[table] = tfmq.generate(loaded, sampler, args.num_images, args.batch, seed=args.seed,
                                          progress=False)
            out["rows"].append(row)
            del loaded, unet
        diff = np.abs(images[True].astype(np.int16) - images[False].astype(np.int16))
        out["rows"][1].update({"psnr_vs_block_db": pooled_psnr(images[True], images[False]),
                               "max_abs_pixel_diff": int(diff.max()),
                               "pixels_differing": float((diff > 0).mean())})
    print(f"\n{out['model']}; backend {args.backend}; {device}; DDIM {args.steps}, batch {args.batch}")
    print(f"{'temporal':18s} {'layers':>7s} {'quantized':>9s} {'bytes':>9s} {'ms/call':>8s} {'PSNR dB':>8s} {'max diff':>8s}")
    for r in out["rows"]:
        print(f"{r['temporal']:18s} {r['runtime_layers']:7d} {r['quantized_layers']:9d} {r['runtime_bytes']:9d} "
              f"{r['call_ms']:8.1f} {r.get('psnr_vs_block_db', float('nan')):8.2f} {r.get('max_abs_pixel_diff', 0):8d}")
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
