"""The w8a8 backend's images vs the reference backend's, in float32, without a GPU.

Runs the w8a8 backend's Triton kernels on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``: the same kernels, slowly; its "available" check is bypassed for that) on
the bundled model (trained weights) quantized with tfmq W8A8 at timing-only settings, and reports
the PSNR / largest pixel difference of the sampled images against the ``reference`` backend's
(same noise, float32 both: issue 9's PSNR question without bf16's own rounding). An indicator at
small N (the interpreter takes minutes per image); the GPU benchmark (``bench_inference.py``,
config ``w8a8 w8a8 fp32 reduce-overhead``) measures 256 images. Prints and writes JSON::

    python benchmarks/w8a8_interpreter_psnr.py --json benchmarks/results/inference/w8a8_interpreter_psnr_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tfmq  # noqa: E402
from results_io import pooled_psnr, write_results  # noqa: E402
from tfmq.runtime.backends import W8A8Backend  # noqa: E402
from tfmq.sampling import SamplerConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of calibration and sampling (default 20)")
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    W8A8Backend.available = lambda self, device: None          # the interpreter runs the kernels on CPU
    sampler = SamplerConfig("ddim", args.steps)
    out = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Triton interpreter",
           "torch": torch.__version__, "settings": vars(args) | {"json": str(args.json)},
           "model": "bundled Fashion-MNIST DDPM (trained), tfmq W8A8, timing-only calibration (no reconstruction), "
                    "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tfmq.load_pipeline(tfmq.default_model_path())
        cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=args.calib_size, sampler=sampler,
                                          recon_iters=0, act_learn_iters=0, tiar_iters=0)
        tfmq.quantize(pipe, cfg, progress=False)
        ckpt = tfmq.save(pipe, Path(tmp) / "ckpt")
        del pipe
        images, seconds = {}, {}
        for backend in ("reference", "w8a8"):
            loaded = tfmq.load(ckpt, backend=backend)
            t0 = time.perf_counter()
            images[backend] = tfmq.generate(loaded, sampler, args.num_images, args.num_images, seed=args.seed,
                                            progress=False)
            seconds[backend] = round(time.perf_counter() - t0, 1)
    diff = np.abs(images["w8a8"].astype(np.int16) - images["reference"].astype(np.int16))
    out.update({"psnr_w8a8_vs_reference_db": pooled_psnr(images["w8a8"], images["reference"]),
                "max_abs_pixel_diff": int(diff.max()), "pixels_differing": float((diff > 0).mean()),
                "sampling_s": seconds})
    print(f"{out['model']}; {args.num_images} images, DDIM {args.steps}: w8a8 vs reference PSNR "
          f"{out['psnr_w8a8_vs_reference_db']:.2f} dB, max pixel difference {out['max_abs_pixel_diff']} "
          f"({out['pixels_differing']:.2%} of pixels differ); sampling {seconds}")
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
