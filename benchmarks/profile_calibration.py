"""Profile a bounded window of a tfmq / qdiff calibration with the torch profiler: where does
the time go?

Builds the google/ddpm-cifar10-32-config UNet (RANDOM weights, see bench_calibration.py) and runs
``tfmq.quantize`` with small settings; the profiler (CPU + CUDA activities) records only the
stages named by ``--stage`` (default: TIAR and reconstruction), and reconstruction / activation
learning run only on the few ``--units`` (a resnet, an attention block, an up-block resnet), so
a profile takes about a minute instead of the whole job. Per method it writes:

  * ``<method>_ops.txt``: the top operators by self CPU time and by self CUDA time;
  * ``<method>_summary.json``: wall time per stage, the profiled window's wall time vs GPU
    kernel time, the number of host-device syncs (``cudaStreamSynchronize`` / ``cudaMemcpy*`` /
    ``.item()`` paths), of kernel launches and of CUDA graph launches, and the seconds per
    iteration of every profiled unit.

Usage (GPU)::

    python benchmarks/profile_calibration.py --out OUT/profile --method tfmq qdiff
    python benchmarks/profile_calibration.py --out OUT/profile_eager --method tfmq --no-graphs
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
import tfmq.recipes  # noqa: E402
from tfmq.models.adapter import get_denoiser  # noqa: E402
from tfmq.sampling import SamplerConfig  # noqa: E402

#: Units of the CIFAR-10 UNet reconstructed (and profiled) by default: a resnet, the attention
#: block of the first attention down block and a resnet of an up block (split shortcut input).
DEFAULT_UNITS = ["down_blocks.0.resnets.0", "down_blocks.1.attentions.0", "up_blocks.1.resnets.0"]


def _sum(events, pred, attr) -> float:
    return sum(getattr(e, attr) for e in events if pred(e.key))


def _digest(prof, wall: float, ops_file: Path) -> dict:
    """Operator tables (written to ``ops_file``) and the summary numbers of one profiled stage."""
    events = prof.key_averages()
    ops_file.write_text("== by self CPU time ==\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
                        + "\n== by self CUDA time ==\n"
                        + events.table(sort_by="self_device_time_total", row_limit=40))
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6
    counts = {k: sum(e.count for e in events if e.key == k)
              for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
                        "aten::item", "aten::_local_scalar_dense", "cudaLaunchKernel", "cuLaunchKernel",
                        "cudaGraphLaunch")}
    return {"wall_s": wall, "gpu_kernel_s": kernel_s, "gpu_busy_fraction": kernel_s / max(wall, 1e-9),
            "counts": counts}


def profile_method(method: str, args) -> dict:
    config = tfmq.QuantConfig.for_method(
        method, wbits=4, abits=8, sampler=SamplerConfig("ddim", args.steps), calib_size=args.calib_size,
        recon_iters=args.recon_iters, act_learn_iters=args.act_iters, seed=0, recon_units=args.units,
        recon_cuda_graphs=not args.no_graphs,
        **({"tiar_iters": args.tiar_iters} if method == "tfmq" else {}))
    pipe = build_pipeline(0, args.device)
    torch.cuda.synchronize()
    windows: dict[str, dict] = {}           # stage -> its own profile's numbers
    saved = dict(tfmq.recipes.STAGES)

    def profiled(name, fn):
        def stage(ctx):
            if name not in args.stage:
                return fn(ctx)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(ctx)
                torch.cuda.synchronize()
            windows[name] = _digest(prof, time.perf_counter() - t, args.out / f"{method}_{name}_ops.txt")
        return stage

    for name, fn in saved.items():
        tfmq.recipes.STAGES[name] = profiled(name, fn)
    t0 = time.perf_counter()
    try:
        tfmq.quantize(pipe, config, progress=False)
        torch.cuda.synchronize()
    finally:
        tfmq.recipes.STAGES.update(saved)
    total = time.perf_counter() - t0
    info = get_denoiser(pipe).tfmq_info
    per_iter = {f"{phase}:{u}": {"s_per_iter": r["optimize_s"] / max(1, r["iters"]), "iters": r["iters"],
                                 "loop": r.get("loop")}
                for phase, key in (("weights", "reconstruction"), ("act", "act_learning"))
                for u, r in info.get(key, {}).items() if r.get("iters")}
    summary = {"method": method, "profiled": windows, "wall_s_total": total,
               "stages_s": info["calibration_time"]["stages_s"], "units_s_per_iter": per_iter,
               "tiar": {k: v for k, v in info.get("temporal", {}).items() if k != "layers"},
               "graphs": not args.no_graphs, "config": config.to_dict(),
               "device": torch.cuda.get_device_name(0)}
    (args.out / f"{method}_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("method", "profiled", "wall_s_total", "stages_s",
                                               "units_s_per_iter", "tiar")}, indent=1), flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", nargs="+", default=["tfmq", "qdiff"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--recon-iters", type=int, default=300)
    p.add_argument("--act-iters", type=int, default=100)
    p.add_argument("--tiar-iters", type=int, default=300)
    p.add_argument("--units", nargs="+", default=DEFAULT_UNITS, help="units reconstructed (and profiled)")
    p.add_argument("--stage", nargs="+", default=["temporal", "reconstruct"],
                   choices=sorted(tfmq.recipes.STAGES), help="stages recorded by the profiler")
    p.add_argument("--no-graphs", action="store_true", help="eager loops (no CUDA graphs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this profile is of the CUDA path: no GPU here")
    args.out.mkdir(parents=True, exist_ok=True)
    for m in args.method:
        profile_method(m, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
