"""Sampling with the ONNX export vs the PyTorch runtime: PSNR of final images, same noise.

For each checkpoint of a bundled model (trained weights; ``--model``, default the Fashion-MNIST
DDPM; ``fmnist-dit`` is the DiT, sampled over the ten classes in turn), quantized in the run:
  * naive W8A8 (MSE ranges), layer policy tfmq-official;
  * tfmq W4A8 (TIAR on the temporal block, FSC ``tib``: per-step temporal-block parameters, exported
    as the feature table), layer policy tfmq-official;
sample N images with the PyTorch ``reference`` backend, then with the ONNX export run by ONNX
Runtime and by OpenVINO (when installed), from the same initial noise (DDIM, eta 0), and report
the PSNR of every image set vs the reference's (and the worst single image).

    python benchmarks/onnx_psnr.py --num-images 64 --steps 50 --json benchmarks/results/onnx_psnr.json
    python benchmarks/onnx_psnr.py --model fmnist-dit --json benchmarks/results/onnx_psnr_dit.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tfmq
from tfmq.api import BUNDLED_MODELS, bundled_model_path
from tfmq.models.adapter import adapter_for, get_denoiser
from tfmq.sampling import SamplerConfig
from results_io import pooled_psnr, write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-ddpm", choices=BUNDLED_MODELS)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (calibration and sampling)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=10, help="steps (spread uniformly) for activation ranges")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "onnx_psnr.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler = SamplerConfig("ddim", args.steps)
    runners = ["onnxruntime"]
    try:
        import openvino  # noqa: F401
        runners.append("openvino")
    except ImportError:
        pass
    configs = {
        "naive w8a8": tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, calib_size=args.calib_size,
                                                  calib_steps=args.calib_steps, sampler=sampler, seed=args.seed),
        "tfmq w4a8 (TIAR, fsc tib)": tfmq.QuantConfig.for_method(
            "tfmq", wbits=4, abits=8, fsc="tib", temporal="tiar", calib_size=args.calib_size,
            calib_steps=args.calib_steps, sampler=sampler, recon_iters=0, act_learn_iters=0, tiar_iters=200,
            seed=args.seed),
    }
    model = bundled_model_path(args.model)
    probe = tfmq.load_pipeline(model)
    den = get_denoiser(probe)
    classes = (list(range(adapter_for(den).num_classes(den)))
               if adapter_for(den).class_labels_apply(den) else None)
    del probe, den
    out = {"model": f"bundled {args.model}", "class_labels": classes, "sampler": sampler.to_dict(), "num_images": args.num_images,
           "seed": args.seed, "threads": args.threads, "settings": {k: str(v) for k, v in vars(args).items()},
           "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in configs.items():
            t0 = time.perf_counter()
            pipe = tfmq.load_pipeline(model)
            tfmq.quantize(pipe, config, progress=False)
            ckpt = tfmq.save(pipe, Path(tmp) / "ckpt", overwrite=True)
            quant_s = time.perf_counter() - t0
            del pipe
            export = tfmq.export_onnx(ckpt, Path(tmp) / "onnx", overwrite=True)
            ref_pipe = tfmq.load(ckpt, backend="reference")
            t0 = time.perf_counter()
            ref = tfmq.generate(ref_pipe, sampler, args.num_images, args.batch, args.seed, class_labels=classes,
                                progress=False)
            row = {"checkpoint": label, "quantize_s": round(quant_s, 1),
                   "reference_sampling_s": round(time.perf_counter() - t0, 1), "runners": {}}
            for runner in runners:
                opipe = tfmq.load_onnx(export, runner, threads=args.threads)
                t0 = time.perf_counter()
                got = tfmq.generate(opipe, sampler, args.num_images, args.batch, args.seed, class_labels=classes,
                                    progress=False, denoiser=opipe.onnx_denoiser)
                per_image = [pooled_psnr(got[i], ref[i]) for i in range(len(ref))]
                row["runners"][runner] = {"psnr_db": round(pooled_psnr(got, ref), 2), "min_image_psnr_db": round(min(per_image), 2),
                                          "identical_images": int(sum(np.isinf(per_image))),
                                          "sampling_s": round(time.perf_counter() - t0, 1)}
                print(f"{label:28s} {runner:12s} PSNR {row['runners'][runner]['psnr_db']:6.2f} dB "
                      f"(worst image {row['runners'][runner]['min_image_psnr_db']:6.2f} dB)", flush=True)
            out["results"].append(row)
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
