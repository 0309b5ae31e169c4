"""Public entry points: quantize a pipeline, save it, load it back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from . import checkpoint, distributed
from .calib.data import collect_calibration_data
from .finite import FiniteOutputWatch, check_finite_quant_params, check_finite_weights
from .calib.resume import PROGRESS_DIR, ProgressStore, ResumeError, model_fingerprint
from .config import QuantConfig
from .models.adapter import absent_components, get_denoiser, load_pipeline
from .models.units import shortcut_splits
from .quant.model import WrapSpec, freeze, set_quant_state, wrap_denoiser
from .recipes import QuantContext, StageTimer, get_recipe, run_recipe
from .runtime.backends import COMPILE_MODES, BackendUnavailable, compile_denoiser, get_backend
from .runtime.selection import set_backend
from .runtime.convert import convert as runtime_convert
from .runtime.pipeline import bind_quantized
from .runtime.temporal_cache import tabulate_temporal

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = "fmnist-ddpm"
#: Models shipped inside the package, by name (trained on real Fashion-MNIST; see each folder's
#: training.json): the default DDPM UNet, its class-conditional twin and a class-conditional DiT.
BUNDLED_MODELS = ("fmnist-ddpm", "fmnist-ddpm-cond", "fmnist-dit")


class QuantizedSaveError(RuntimeError):
    """``save_pretrained`` was called on a quantized pipeline: it would write a dense copy."""


def guard_save_pretrained(pipe) -> None:
    """Make ``save_pretrained`` of a quantized pipeline, and of its denoiser, refuse with a message
    pointing to :func:`tfmq.save`.

    diffusers' own ``save_pretrained`` would write the fake-quant denoiser's dequantized weights as
    a full-precision model without its quantization: a user would believe a quantized model was
    kept when it was not. The guard is set on these two objects only (instance attributes), so
    other pipelines are unaffected and :func:`tfmq.save` (which saves the other components with
    their own ``save_pretrained``) works as before.
    """
    denoiser = get_denoiser(pipe)

    def refuse(*args, **kwargs):
        raise QuantizedSaveError(
            "this pipeline's denoiser is quantized by tfmq: save_pretrained would write a dense "
            "full-precision copy without its quantization. Use tfmq.save(pipe, DIR) to write the "
            "compact quantized checkpoint, and tfmq.load(DIR) to read it back.")

    pipe.save_pretrained = refuse
    denoiser.save_pretrained = refuse


def default_model_path() -> Path:
    """The bundled default model (a DDPM trained on Fashion-MNIST)."""
    return bundled_model_path(DEFAULT_MODEL)


def bundled_model_path(name: str) -> Path:
    """The folder of a model shipped with tfmq (one of :data:`BUNDLED_MODELS`)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    path = ASSETS / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall tfmq")
    return path


def resolve_model(model) -> str | Path:
    """``None`` / ``'default'`` -> the default model; a bundled model's name (when no local
    folder of that name exists) -> its folder; anything else unchanged."""
    if model in (None, "default"):
        return default_model_path()
    if isinstance(model, str) and model in BUNDLED_MODELS and not Path(model).exists():
        return bundled_model_path(model)
    return model


def make_wrap_spec(config: QuantConfig, denoiser, timesteps: list[int]) -> WrapSpec:
    """The quantized structure a config asks for. FSC ``all`` gives every activation quantizer
    one parameter set per step; ``tib`` only the temporal information block's (the others keep
    one set, so activation step learning can refine them)."""
    fsc = config.effective_fsc
    per_step_layers = None
    if fsc == "tib":
        from .models.temporal import step_layer_names
        per_step_layers = sorted(step_layer_names(denoiser))
    return WrapSpec(wbits=config.wbits, abits=config.abits, softmax_bits=config.effective_softmax_bits,
                    layer_policy=config.layer_policy, weight_symmetric=config.weight_symmetric,
                    act_symmetric=config.act_symmetric,
                    n_sets=len(timesteps) if fsc != "none" else 1, per_step_layers=per_step_layers,
                    splits=shortcut_splits(denoiser) if config.split_shortcut else {})


def quantize(pipe, config: QuantConfig | None = None, progress: bool = True, work_dir=None,
             resume: bool = False, on_unit=None, **overrides):
    """Quantize ``pipe``'s denoiser in place and return the pipeline.

    ``config`` (or ``QuantConfig.for_method(overrides.pop('method', 'naive'), **overrides)``)
    says how. Calibration data are collected from the FP pipeline in one pass, then the method's
    recipe runs, then weights are frozen to integer codes. The denoiser's ``tfmq_info`` holds the
    config, the sampler's timesteps and the wall time of each stage.

    With ``work_dir``, progress is written to ``work_dir/.tfmq-progress`` after every
    reconstruction unit; ``resume=True`` continues from there (same config and model required)
    and ends with the same result as an uninterrupted run. A run that fails before finishing any
    unit removes the progress folder it created (and ``work_dir`` itself if it created it).
    ``on_unit(phase, unit, stats)`` is called after each unit.

    Raises :class:`tfmq.finite.NonFiniteError` before any work if a weight is NaN / inf,
    while collecting the calibration data if the FP model's output is, and at the end if a
    quantization parameter came out non-finite.

    Under several processes (``torchrun`` / ``accelerate launch``, see :mod:`tfmq.distributed`)
    every process calls it with the same arguments: calibration data, activation ranges and the
    reconstruction rows are split over the ranks, and every rank ends with the same quantized
    denoiser (rank 0's state is broadcast after each stage). Only rank 0 writes ``work_dir``.
    """
    if config is None:
        config = QuantConfig.for_method(overrides.pop("method", "naive"), **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    denoiser = get_denoiser(pipe)
    if getattr(denoiser, "tfmq_info", None) is not None:
        raise RuntimeError("this pipeline's denoiser is already quantized")
    if resume and work_dir is None:
        raise ValueError("resume needs the work_dir that holds the earlier run's progress")
    if (config.recon_parallel == "batch" and distributed.is_distributed()
            and config.recon_batch_size < distributed.world_size()):
        raise ValueError(f"recon_parallel='batch' splits every batch of recon_batch_size="
                         f"{config.recon_batch_size} rows over the {distributed.world_size()} "
                         f"processes: use a batch of at least {distributed.world_size()} rows")
    check_finite_weights(denoiser)
    store = None
    created_work_dir = work_dir is not None and not Path(work_dir).exists()
    if work_dir is not None:
        store = _open_store(work_dir, config.to_dict(), model_fingerprint(denoiser), resume)
    try:
        timer = StageTimer()
        watch = FiniteOutputWatch(denoiser)
        with timer("calibration_data"), watch:
            data = collect_calibration_data(
                pipe, config.sampler, config.calib_size, config.calib_batch_size, config.seed,
                config.class_labels, config.prompts, int(config.memory_budget_gb * (1 << 30)),
                progress=progress)
        try:
            watch.check()
            spec = make_wrap_spec(config, denoiser, data.timesteps)
            wrap_denoiser(denoiser, spec)
            ctx = QuantContext(pipe, denoiser, config, data, timer, progress,
                               Path(work_dir) if work_dir else None, store=store, on_unit=on_unit)
            run_recipe(ctx)
            with timer("freeze"):
                freeze(denoiser)
                set_quant_state(denoiser, weight=True, act=True)
            check_finite_quant_params(denoiser)
        finally:
            data.cleanup()
    except BaseException:
        if store is not None and not store.manifest["done"] and distributed.is_main():  # a failed start
            store.clear()                                                               # leaves nothing
            if created_work_dir and Path(work_dir).is_dir() and not any(Path(work_dir).iterdir()):
                Path(work_dir).rmdir()
        raise
    denoiser.tfmq_info = {
        "method": config.method,
        "recipe": list(get_recipe(config.method).stages),
        "wbits": config.wbits, "abits": config.abits, "softmax_bits": config.effective_softmax_bits,
        "layer_policy": config.layer_policy,
        "sampler": config.sampler.to_dict(),
        "timesteps": data.timesteps,
        "wrap_spec": dataclasses.asdict(spec),
        "config": config.to_dict(),
        "calibration_time": timer.to_dict(),
    }
    denoiser.tfmq_info.update(ctx.info)   # stage results (fsc, temporal, reconstruction, ...)
    bind_quantized(pipe, denoiser)
    guard_save_pretrained(pipe)
    return pipe


def _open_store(work_dir, config_dict: dict, fingerprint: str, resume: bool) -> ProgressStore:
    """The progress store: rank 0 opens (and writes) it; the other ranks read its manifest."""
    store, error = None, None
    if distributed.is_main():
        try:
            store = ProgressStore.open(work_dir, config_dict, fingerprint, resume)
        except ResumeError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)       # every rank fails alike, none waits forever
    if error is not None:
        raise ResumeError(error)
    return store if store is not None else ProgressStore.mirror(work_dir)


def save(pipe, out_dir, overwrite: bool = False) -> Path:
    """Write the compact checkpoint of a quantized pipeline (see :mod:`tfmq.checkpoint`)."""
    return checkpoint.save(pipe, out_dir, overwrite)


def load(ckpt_dir, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         backend: str = "reference", compile: bool | str = False, temporal_table: bool = False):
    """Load a compact checkpoint as a diffusers pipeline whose denoiser is made of runtime modules
    (:mod:`tfmq.runtime`): packed weights, no FP copy of a quantized weight, computing with
    ``backend`` (``reference``, ``weight-only`` or ``w8a8``; see :mod:`tfmq.runtime.backends`).

    ``pipe.scheduler`` is the calibrated scheduler; ``pipe(...)`` works as for any diffusers
    pipeline, and refuses another scheduler or step count where the model holds per-step
    parameters. ``compile=True`` compiles the denoiser's forward (``torch.compile``,
    fullgraph; see :func:`tfmq.runtime.compile_denoiser`): the first call of each input shape
    compiles, later calls run fused kernels; a string is the ``torch.compile`` mode, e.g.
    ``compile="reduce-overhead"`` to replay every call as a CUDA graph. A compiled denoiser
    skips Dynamo's per-call guard check after each input signature's first call
    (:mod:`tfmq.runtime.guards`): do not change its modules afterwards, load it again.

    ``temporal_table=True`` replaces the quantized temporal information block (time and class
    embeddings, every temporal projection) by the table of its outputs for the calibrated
    timesteps, computed once at load with ``backend`` (:func:`tfmq.runtime.tabulate_temporal`):
    those layers then leave every call. The outputs equal the block's up to the last-bit rounding
    of its matrix products; the pipeline is then tied to the calibrated sampler and step count,
    and cannot be saved again."""
    ckpt_dir = Path(ckpt_dir)
    cfg = checkpoint.read_config(ckpt_dir)
    mode = _compile_mode(compile)                                    # fail before any work
    reason = get_backend(backend).available(torch.device(device))
    if reason is not None:
        raise BackendUnavailable(reason)
    # weight-only is the memory-first backend: FP layers too stay in their (narrower) stored dtype
    denoiser = checkpoint.load_denoiser(ckpt_dir, dtype, backend="reference", cfg=cfg,
                                        compact_fp=backend == "weight-only")
    # safetensors only: a checkpoint never makes diffusers unpickle a .bin of another component
    pipe = DiffusionPipeline.from_pretrained(str(ckpt_dir), **absent_components(ckpt_dir),
                                             **{cfg["denoiser_component"]: denoiser},
                                             dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if backend != "reference":
        set_backend(denoiser, backend)
    if temporal_table:
        tabulate_temporal(denoiser)
    if compile is not False:
        compile_denoiser(denoiser, mode)
    bind_quantized(pipe, denoiser)
    guard_save_pretrained(pipe)
    return pipe


def _compile_mode(compile: bool | str) -> str | None:
    """``load``'s ``compile`` argument as a ``torch.compile`` mode (None: torch's default)."""
    if isinstance(compile, bool):
        return None
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile must be True, False or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                     f"got {compile!r}")


def convert(pipe, backend: str = "reference"):
    """Turn a quantized pipeline's calibrated (fake-quant) denoiser into runtime modules computing
    with ``backend``, in place (see :func:`tfmq.runtime.convert`); returns the pipeline."""
    denoiser = get_denoiser(pipe)
    runtime_convert(denoiser, backend)
    return pipe


def load_any(model_or_dir, device="cpu", dtype=torch.float32):
    """A quantized checkpoint folder or an FP pipeline (hub id / folder / 'default' / the name
    of a bundled model, e.g. ``fmnist-dit``)."""
    model_or_dir = resolve_model(model_or_dir)
    folder = Path(model_or_dir)
    if (folder / checkpoint.CONFIG_FILE).exists():
        return load(model_or_dir, device, dtype)
    if (folder / checkpoint.TENSOR_FILE).exists():
        raise checkpoint.CheckpointError(
            f"{folder} is an incomplete tfmq checkpoint: it has {checkpoint.TENSOR_FILE} but no "
            f"{checkpoint.CONFIG_FILE}; write it again with `tfmq quantize`")
    if (folder / PROGRESS_DIR).is_dir() and not (folder / "model_index.json").exists():
        raise ValueError(
            f"{folder} holds an unfinished `tfmq quantize` run ({PROGRESS_DIR}), not a model: continue "
            f"it with the same `tfmq quantize ... --out {folder}` command plus --resume")
    return load_pipeline(model_or_dir, device, dtype)
