"""Host time a compiled denoiser call spends before its graph runs: Dynamo's guard check and argument
gathering, with every call checked vs the runtime's ``SkipGuardsAfterFirstCall``.

The compiled graph is replaced by a function returning precomputed outputs (a custom
``torch.compile`` backend), so a timed call is host work only, on any device. Model: a UNet with
Stable Diffusion v1.5's block structure (same modules, layers and tensors as SD v1.5; channel
widths times ``--scale``, RANDOM weights, 16x16 latents: the guard tree depends on the structure,
not the widths), its naive W8A8 checkpoint (calibration: 1 prompt, DDIM 2) loaded with the
``reference`` backend and with the ``w8a8`` backend's kernel tables (on a CPU the tables are built
by the backend's ``prepare`` directly and the one real run of the graph goes through Triton's
interpreter; the kernels are never timed here; attention projections fused as ``set_backend``
fuses them), each also with its temporal block replaced by
the table of its outputs (``tfmq.load(..., temporal_table=True)``). Prints a table and writes JSON::

    python benchmarks/bench_host_overhead.py --json benchmarks/results/inference/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")       # CPU: the w8a8 graph's one real run

import torch  # noqa: E402

import tfmq  # noqa: E402
from sd_random import random_sd_pipeline  # noqa: E402
from tfmq.runtime.backends import BACKENDS  # noqa: E402
from tfmq.runtime.guards import CAN_SKIP_GUARDS, SkipGuardsAfterFirstCall  # noqa: E402
from tfmq.runtime.layers import runtime_layers  # noqa: E402
from tfmq.runtime.projections import fuse_attention_projections  # noqa: E402
from tfmq.sampling import SamplerConfig  # noqa: E402
from results_io import write_results  # noqa: E402


def per_call_us(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def measure(denoiser, inputs, iters: int) -> dict:
    """Per-call host microseconds of the compiled forward, guards checked on every call and
    skipped after the first call; the number of graph inputs."""
    info = {}

    def precomputed(gm, example_inputs):
        outs = gm(*example_inputs)
        info["graph_inputs"] = len(example_inputs)
        return lambda *args: outs

    torch._dynamo.reset()
    plain = torch.compile(denoiser.forward, backend=precomputed, fullgraph=True)
    with torch.no_grad():
        denoiser.forward = plain
        full = per_call_us(lambda: denoiser(*inputs), iters)
        denoiser.forward = SkipGuardsAfterFirstCall(plain)
        skip = per_call_us(lambda: denoiser(*inputs), iters)
        skipped = denoiser.forward.skipped
    del denoiser.forward
    return {"full_guards_us": full, "skip_guards_us": skip, "skipped_calls": skipped, **info}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--model", default="sd", choices=["sd", "bundled"],
                   help="sd: the SD v1.5 block structure (random weights, narrow); bundled: the bundled model "
                        "(trained) at batch 8 and its tfmq W8A8 checkpoint (per-step parameters, DDIM 100, "
                        "timing-only calibration settings, middle step held)")
    p.add_argument("--scale", type=float, default=0.1, help="sd: channel widths times this (structure unchanged)")
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args(argv)
    if not CAN_SKIP_GUARDS:
        print("error: this PyTorch has no torch.compiler.set_stance(skip_guard_eval_unsafe=...)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "settings": vars(args) | {"json": str(args.json)},
           "model": (f"UNet2DConditionModel, SD v1.5 block structure, widths x{args.scale}, RANDOM weights, "
                     "batch 2, 16x16 latents, 77 tokens, fp32" if args.model == "sd" else
                     "bundled Fashion-MNIST DDPM (trained), batch 8, fp32"), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "sd":
            pipe = random_sd_pipeline(work, scale=args.scale, sample_size=16)
            inputs = (torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 768))
            cfg = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, softmax_bits=16, calib_size=1,
                                              sampler=SamplerConfig("ddim", 2), prompts=["a photo"])
        else:
            pipe = tfmq.load_pipeline(tfmq.default_model_path())
            c = pipe.unet.config
            inputs = (torch.randn(8, c.in_channels, c.sample_size, c.sample_size), None)
            cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=2, sampler=SamplerConfig("ddim", 100),
                                              recon_iters=0, act_learn_iters=0, tiar_iters=0)
        if inputs[1] is None:                          # the bundled model: a timestep of its sampler's middle step
            ts = [int(v) for v in tfmq.sampling.sampler_timesteps(pipe, cfg.sampler)]
            inputs = (inputs[0], torch.full((inputs[0].shape[0],), ts[len(ts) // 2]))
        rows = [("full precision", measure(pipe.unet, inputs, args.iters))]
        tfmq.quantize(pipe, cfg, progress=False)
        ckpt = tfmq.save(pipe, work / "ckpt")
        method = f"{cfg.method} W8A8"

        def loaded(table=False):
            unet = tfmq.load(ckpt, temporal_table=table).unet
            if getattr(unet, "tfmq_steps", None) is not None and len(unet.tfmq_steps) > 1:
                unet.tfmq_steps.set(len(unet.tfmq_steps) // 2)      # repeated calls at the middle step
                unet.tfmq_steps.paused = True
            return unet
        for table in (False, True):
            how = ", temporal table" if table else ""
            rows.append((f"{method}, reference{how}", measure(loaded(table), inputs, args.iters)))
            unet = loaded(table)
            for layer in runtime_layers(unet).values():   # the w8a8 backend's tables, without its device check
                BACKENDS["w8a8"].prepare(layer)
                layer.backend = "w8a8"
            fuse_attention_projections(unet, BACKENDS["w8a8"])     # as set_backend does
            rows.append((f"{method}, w8a8 tables{how}", measure(unet, inputs, args.iters)))
    print(f"\n{out['model']}; {out['device']}, torch {torch.__version__}")
    print(f"{'denoiser':48s} {'graph inputs':>12s} {'guards every call us':>21s} {'guards skipped us':>18s}")
    for name, r in rows:
        print(f"{name:48s} {r['graph_inputs']:12d} {r['full_guards_us']:21.1f} {r['skip_guards_us']:18.1f}")
        out["rows"].append({"denoiser": name, **r})
    write_results(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
