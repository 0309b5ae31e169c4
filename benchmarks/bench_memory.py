"""Resident memory of a loaded quantized denoiser vs its checkpoint's tensor bytes, per backend and dtype.

The bundled Fashion-MNIST DDPM (trained weights) quantized by tfmq at W4A8 and W8A8 with
timing-only settings (no reconstruction iterations: how many bytes a layer holds does not depend
on how its codes were chosen), saved, then loaded with each runtime backend in float32 and
bfloat16. Resident bytes are every parameter and buffer of the loaded denoiser plus what a backend
derives from them (``tfmq.runtime.runtime_nbytes``): device-independent, so this runs on the CPU
(``w8a8`` needs a CUDA GPU and is measured there only). Issue 9's target: weight-only W4 resident
memory at most 1.1x the checkpoint's tensors. Prints a table, writes JSON::

    python benchmarks/bench_memory.py --json benchmarks/results/inference/memory_bundled.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import tfmq
from tfmq.runtime import runtime_nbytes
from tfmq.sampling import SamplerConfig
from results_io import write_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-size", type=int, default=8)
    args = p.parse_args(argv)
    out = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "model": "bundled fmnist-ddpm (trained), tfmq, timing-only settings", "rows": []}
    backends = ["reference", "weight-only"] + (["w8a8"] if args.device.startswith("cuda") else [])
    print(f"{'bits':5s} {'backend':12s} {'dtype':9s} {'resident B':>11s} {'checkpoint B':>13s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, (w, a) in (("w4a8", (4, 8)), ("w8a8", (8, 8))):
            pipe = tfmq.load_pipeline(tfmq.default_model_path(), args.device)
            cfg = tfmq.QuantConfig.for_method("tfmq", wbits=w, abits=a, calib_size=args.calib_size,
                                              sampler=SamplerConfig("ddim", 100), recon_iters=0,
                                              act_learn_iters=0, tiar_iters=0)
            tfmq.quantize(pipe, cfg, progress=False)
            ckpt = tfmq.save(pipe, Path(tmp) / bits)
            ckpt_bytes = sum(t.numel() * t.element_size()
                             for t in load_file(str(ckpt / "tfmq_denoiser.safetensors")).values())
            for backend in backends:
                for dtype in (torch.float32, torch.bfloat16):
                    den = tfmq.load(ckpt, args.device, dtype, backend=backend).unet
                    nb = runtime_nbytes(den)
                    row = {"bits": bits, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                           "resident_bytes": nb, "checkpoint_tensor_bytes": ckpt_bytes,
                           "ratio": nb["total"] / ckpt_bytes}
                    out["rows"].append(row)
                    print(f"{bits:5s} {backend:12s} {row['dtype']:9s} {nb['total']:11d} {ckpt_bytes:13d} "
                          f"{row['ratio']:6.3f}", flush=True)
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
