"""Profile one tfmq / qdiff calibration with the torch profiler: where does the time go?

Builds the google/ddpm-cifar10-32-config UNet (RANDOM weights, see bench_calibration.py), runs
``tfmq.quantize`` once with small settings under ``torch.profiler`` (CPU + CUDA activities) and
writes, per method:

  * ``<method>_ops.txt``: the top operators by self CPU time and by self CUDA time;
  * ``<method>_summary.json``: wall time per stage, total CPU-side time vs GPU kernel time,
    the number of host-device syncs (``cudaStreamSynchronize`` / ``cudaMemcpy*`` / ``.item()``
    paths) and of kernel launches.

Usage (GPU)::

    python benchmarks/profile_calibration.py --out OUT/profile --method tfmq qdiff
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration import build_pipeline  # noqa: E402

import tfmq  # noqa: E402
from tfmq.sampling import SamplerConfig  # noqa: E402


def _sum(events, pred, attr) -> float:
    return sum(getattr(e, attr) for e in events if pred(e.key))


def profile_method(method: str, args) -> dict:
    config = tfmq.QuantConfig.for_method(
        method, wbits=4, abits=8, sampler=SamplerConfig("ddim", args.steps), calib_size=args.calib_size,
        recon_iters=args.recon_iters, act_learn_iters=args.act_iters, seed=0,
        **({"tiar_iters": args.recon_iters} if method == "tfmq" else {}))
    pipe = build_pipeline(0, args.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tfmq.quantize(pipe, config, progress=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    text = ("== by self CPU time ==\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n== by self CUDA time ==\n" + events.table(sort_by="self_device_time_total", row_limit=40))
    (args.out / f"{method}_ops.txt").write_text(text)
    cuda_kernel_us = sum(e.self_device_time_total for e in events)
    syncs = {k: sum(e.count for e in events if e.key == k)
             for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                       "aten::item", "aten::_local_scalar_dense", "cudaLaunchKernel", "cuLaunchKernel")}
    info = pipe.unet.tfmq_info
    summary = {"method": method, "wall_s_profiled": wall, "stages_s": info["calibration_time"]["stages_s"],
               "gpu_kernel_s": cuda_kernel_us / 1e6, "gpu_busy_fraction": cuda_kernel_us / 1e6 / wall,
               "counts": syncs, "config": config.to_dict(),
               "device": torch.cuda.get_device_name(0)}
    (args.out / f"{method}_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("method", "wall_s_profiled", "stages_s", "gpu_kernel_s",
                                               "gpu_busy_fraction", "counts")}, indent=1), flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", nargs="+", default=["tfmq", "qdiff"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--recon-iters", type=int, default=40)
    p.add_argument("--act-iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this profile is of the CUDA path: no GPU here")
    args.out.mkdir(parents=True, exist_ok=True)
    for m in args.method:
        profile_method(m, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
