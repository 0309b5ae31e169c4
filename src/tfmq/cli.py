"""Command line: parse flags, validate them before any work, call the public API.

    tfmq quantize [MODEL] --method tfmq --wbits 4 --abits 8 --out DIR
    tfmq sample   [MODEL_OR_DIR] --num-images 16 --out OUT

MODEL defaults to the bundled model. Every subcommand is registered in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .policy import POLICIES
from .quant.quantizer import SUPPORTED_BITS
from .sampling import SCHEDULERS

BITS_HELP = f"{SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}, or 32 for full precision"


def _bits(value: str) -> int:
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if b != 32 and b not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"unsupported bit width {b}; use {BITS_HELP}")
    return b


def _positive(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_float(value: str) -> float:
    v = float(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _device(value: str) -> str:
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {value!r}")
    return value


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda requested but no CUDA GPU is available")


def _check_out(out: Path, allow_existing: bool, what: str = "--out") -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not allow_existing:
        raise SystemExit(f"error: {what} {out} exists and is not empty; choose another folder "
                         f"(or pass --overwrite)")


def add_sampler_flags(p: argparse.ArgumentParser, steps_default: int | None) -> None:
    p.add_argument("--sampler", choices=sorted(SCHEDULERS), default=None,
                   help="diffusers scheduler used for sampling (default: ddim; a quantized checkpoint "
                        "defaults to the one it was calibrated with)")
    p.add_argument("--steps", type=_positive, default=steps_default,
                   help="number of sampling steps" + (f" (default {steps_default})" if steps_default else
                                                      " (default: the checkpoint's, else 100)"))
    p.add_argument("--eta", type=_nonneg_float, default=None, help="DDIM eta, 0 = deterministic (default 0)")
    p.add_argument("--guidance-scale", type=_nonneg_float, default=None,
                   help="classifier-free guidance scale for conditional models (default 1 = off)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="class ids for a class-conditional model (cycled over the images)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text prompt for a text-to-image model (repeat for several)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default cpu)")


# ---- quantize ------------------------------------------------------------------------------
def build_quantize(sub) -> None:
    from .recipes import RECIPES
    p = sub.add_parser("quantize", help="calibrate and quantize a pipeline, write a compact checkpoint",
                       description="Quantize a diffusers pipeline's denoiser and write a compact "
                                   "checkpoint folder that `tfmq sample` and `tfmq.load` read.")
    p.add_argument("model", nargs="?", default="default",
                   help="hub id or local pipeline folder (default: the bundled Fashion-MNIST DDPM)")
    p.add_argument("--method", choices=sorted(RECIPES), default="naive",
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    p.add_argument("--wbits", type=_bits, default=8, help=f"weight bits, {BITS_HELP} (default 8)")
    p.add_argument("--abits", type=_bits, default=8, help=f"activation bits, {BITS_HELP} (default 8)")
    p.add_argument("--softmax-bits", type=int, choices=list(SUPPORTED_BITS) + [16], default=None,
                   help="bits of the attention softmax output (default: --abits)")
    p.add_argument("--layer-policy", choices=sorted(POLICIES), default="tfmq-official",
                   help="; ".join(f"{p.name}: {p.description}" for p in POLICIES.values()))
    p.add_argument("--calib-size", type=_positive, default=None,
                   help="number of calibration trajectories (default: the method's, 256)")
    p.add_argument("--calib-batch-size", type=_positive, default=None,
                   help="batch size of calibration sampling and forward passes (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration noise and sampling (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_sampler_flags(p, steps_default=100)
    p.set_defaults(func=run_quantize)


def quantize_overrides(args) -> dict:
    """QuantConfig overrides from the parsed flags (only those the user set)."""
    from .sampling import SamplerConfig
    o = {"wbits": args.wbits, "abits": args.abits, "layer_policy": args.layer_policy, "seed": args.seed,
         "sampler": SamplerConfig(args.sampler or "ddim", args.steps, args.eta or 0.0,
                                  args.guidance_scale if args.guidance_scale is not None else 1.0)}
    for flag, key in (("softmax_bits", "softmax_bits"), ("calib_size", "calib_size"),
                      ("calib_batch_size", "calib_batch_size"), ("class_labels", "class_labels"),
                      ("prompt", "prompts")):
        if getattr(args, flag) is not None:
            o[key] = getattr(args, flag)
    return o


def run_quantize(args) -> int:
    import tfmq
    from .api import load_any
    from .config import QuantConfig
    config = QuantConfig.for_method(args.method, **quantize_overrides(args))   # validates first
    _check_out(args.out, args.overwrite or getattr(args, "resume", False))
    _check_device(args.device)
    pipe = load_any(args.model, args.device)
    tfmq.quantize(pipe, config, progress=True, **_extra_quantize_kwargs(args))
    tfmq.save(pipe, args.out, overwrite=True)
    info = pipe.unet.tfmq_info
    print(json.dumps({"out": str(args.out), "method": config.method, "wbits": config.wbits,
                      "abits": config.abits, "layer_policy": config.layer_policy,
                      "calibration_time": info["calibration_time"]}, indent=2))
    return 0


def _extra_quantize_kwargs(args) -> dict:
    """Keyword arguments for tfmq.quantize that other subsystems add to the CLI (e.g. resume)."""
    return {}


# ---- sample --------------------------------------------------------------------------------
def build_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from an FP pipeline or a quantized checkpoint",
                       description="Sample images; writes one PNG per image, grid.png and samples.npz "
                                   "(uint8 NHWC array arr_0).")
    p.add_argument("model", nargs="?", default="default",
                   help="hub id, pipeline folder or tfmq checkpoint folder (default: the bundled model)")
    p.add_argument("--num-images", type=_positive, default=16, help="number of images (default 16)")
    p.add_argument("--batch-size", type=_positive, default=16, help="sampling batch size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded with seed + i")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    add_sampler_flags(p, steps_default=None)
    p.set_defaults(func=run_sample)


def resolve_sampler(pipe, args):
    """The sampler for ``pipe``: flags, else the checkpoint's calibration sampler, else DDIM-100."""
    from .sampling import SamplerConfig
    info = getattr(pipe.unet, "tfmq_info", None)
    base = SamplerConfig(**info["sampler"]) if info else SamplerConfig()
    return SamplerConfig(args.sampler or base.name, args.steps or base.steps,
                         base.eta if args.eta is None else args.eta,
                         base.guidance_scale if args.guidance_scale is None else args.guidance_scale).validate()


def run_sample(args) -> int:
    from .api import load_any
    from .eval.grid import save_samples
    from .sampling import generate
    _check_out(args.out, args.overwrite)
    _check_device(args.device)
    pipe = load_any(args.model, args.device)
    sampler = resolve_sampler(pipe, args)
    images = generate(pipe, sampler, args.num_images, args.batch_size, args.seed,
                      class_labels=args.class_labels, prompts=args.prompt, progress=True)
    paths = save_samples(images, args.out)
    print(json.dumps({"out": str(args.out), "num_images": len(images), "sampler": sampler.to_dict(),
                      "grid": str(paths["grid"]), "npz": str(paths["npz"])}, indent=2))
    return 0


COMMANDS = [build_quantize, build_sample]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="tfmq", description=(
        "Post-training quantization of diffusers pipelines (naive PTQ, Q-Diffusion, TFMQ-DM)."))
    parser.add_argument("--version", action="version", version=f"tfmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in COMMANDS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tfmq`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
