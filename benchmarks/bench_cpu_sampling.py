"""CPU sampling wall time: the bundled model's FP pipeline vs its quantized checkpoints, whole runs.

Issue 9's "quantized sampling is no slower than FP", measured on a CPU end to end
(``tfmq.generate``: the sampler loop, every denoiser call, the scheduler; model loading, ONNX
export and OpenVINO compilation excluded and reported apart). Rows:

* FP32 PyTorch eager (what a diffusers user runs) and FP32 OpenVINO (the same runtime as the
  INT8 rows: the like-for-like comparison);
* tfmq W8A8 checkpoints exported to ONNX QDQ and run by OpenVINO INT8: the default layer policy
  (``tfmq-official``, resnet conv1 inputs etc. in full precision) and ``all`` (every layer int8);
* the ``reference`` PyTorch runtime (fake-quant numerics, eager) of the default checkpoint.

Calibration at timing-only settings (tfmq, no reconstruction iterations: a layer's speed does not
depend on how its codes were chosen). PSNR of every row's images vs FP32 PyTorch's (same noise).
Prints a table and writes JSON::

    python benchmarks/bench_cpu_sampling.py --json benchmarks/results/cpu/sampling_dev2core.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import tfmq
from bench_cpu import cpu_info, versions
from results_io import pooled_psnr, write_results
from tfmq.sampling import SamplerConfig


def timed(label: str, make, sampler, args) -> tuple[dict, object]:
    """Build the pipeline (``make()``, timed apart), then time ``generate`` of all images."""
    t0 = time.perf_counter()
    pipe = make()
    setup = time.perf_counter() - t0
    tfmq.generate(pipe, sampler, args.batch, args.batch, seed=10_000, progress=False)      # warm-up batch
    t0 = time.perf_counter()
    images = tfmq.generate(pipe, sampler, args.num_images, args.batch, seed=args.seed, progress=False)
    seconds = time.perf_counter() - t0
    print(f"  {label}: {seconds:.1f} s (setup {setup:.1f} s)", flush=True)
    return {"config": label, "seconds": seconds, "setup_s": setup,
            "calls": args.steps * -(-args.num_images // args.batch)}, images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (calibration and sampling)")
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="leave out the slow PyTorch reference row")
    args = p.parse_args(argv)
    import importlib.util
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnx") is None:
        print("error: needs the deploy extra (pip install 'tfmq[deploy]')", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sampler = SamplerConfig("ddim", args.steps)
    fp_path = tfmq.default_model_path()
    out = {"device": f"CPU {cpu_info()['model']} ({platform.machine()}), {args.threads} threads",
           "cpu": cpu_info(), "versions": versions(), "settings": vars(args) | {"json": str(args.json)},
           "model": f"bundled Fashion-MNIST DDPM (trained), {args.num_images} images, batch {args.batch}, "
                    f"DDIM {args.steps}", "rows": []}
    rows, imgs = out["rows"], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpts = {}
        for policy in ("tfmq-official", "all"):
            pipe = tfmq.load_pipeline(fp_path)
            cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=args.calib_size, sampler=sampler,
                                              recon_iters=0, act_learn_iters=0, tiar_iters=0, layer_policy=policy)
            tfmq.quantize(pipe, cfg, progress=False)
            ckpts[policy] = tfmq.save(pipe, work / f"ckpt-{policy}")
            del pipe
        exports = {"fp32": tfmq.export_onnx(fp_path, work / "fp32-onnx", sampler=sampler)}
        for policy, ck in ckpts.items():
            exports[policy] = tfmq.export_onnx(ck, work / f"onnx-{policy}")
        print(f"{out['model']}; {out['device']}", flush=True)
        configs = [("FP32 PyTorch eager", lambda: tfmq.load_pipeline(fp_path)),
                   ("FP32 OpenVINO", lambda: tfmq.load_onnx(exports["fp32"], "openvino", args.threads)),
                   ("tfmq W8A8 OpenVINO INT8, policy tfmq-official",
                    lambda: tfmq.load_onnx(exports["tfmq-official"], "openvino", args.threads)),
                   ("tfmq W8A8 OpenVINO INT8, policy all",
                    lambda: tfmq.load_onnx(exports["all"], "openvino", args.threads))]
        if not args.skip_reference:
            configs.append(("tfmq W8A8 PyTorch reference eager, policy tfmq-official",
                            lambda: tfmq.load(ckpts["tfmq-official"])))
        for label, make in configs:
            row, imgs[label] = timed(label, make, sampler, args)
            rows.append(row)
    fp = rows[0]
    fp_ov = rows[1]
    for r in rows:
        r["vs_fp32_pytorch"] = fp["seconds"] / r["seconds"]
        r["vs_fp32_openvino"] = fp_ov["seconds"] / r["seconds"]
        r["psnr_vs_fp32_pytorch_db"] = pooled_psnr(imgs[r["config"]], imgs[fp["config"]])
    print(f"\n{'config':58s} {'seconds':>8s} {'x FP PT':>8s} {'x FP OV':>8s} {'PSNR vs FP':>10s}")
    for r in rows:
        print(f"{r['config']:58s} {r['seconds']:8.1f} {r['vs_fp32_pytorch']:8.2f} {r['vs_fp32_openvino']:8.2f} "
              f"{r['psnr_vs_fp32_pytorch_db']:10.2f}")
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
