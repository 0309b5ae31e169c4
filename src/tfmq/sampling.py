"""The one sampler loop, used by calibration-data collection, sampling and evaluation.

It runs a diffusers scheduler over the pipeline's denoiser for any supported conditioning
(none, class labels, text prompts) with classifier-free guidance, decodes latents with the
pipeline's autoencoder when it has one, and returns uint8 NHWC images.

Determinism: sample ``i`` starts from noise drawn with seed ``seed + i`` and uses its own
generator for any stochastic scheduler step, so results do not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from tqdm.auto import tqdm

from .models.adapter import adapter_for, get_denoiser
from .models.base import Conditioning
from .runtime.steps import check_timesteps, step_index_of

#: Sampler name -> diffusers scheduler class.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "plms": PNDMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


@dataclass
class SamplerConfig:
    """Which sampler, how many steps, and guidance.

    ``eta`` applies to DDIM only (0 = deterministic). ``guidance_scale`` > 1 turns on
    classifier-free guidance (class-conditional models with a null class, text models).
    """
    name: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    guidance_scale: float = 1.0

    def validate(self) -> "SamplerConfig":
        if self.name not in SCHEDULERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose from {', '.join(SCHEDULERS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def make_scheduler(pipe, sampler: SamplerConfig):
    """A fresh scheduler of the requested kind from the pipeline's scheduler config, with its
    timesteps set."""
    sampler.validate()
    sched = SCHEDULERS[sampler.name].from_config(pipe.scheduler.config)
    sched.set_timesteps(sampler.steps)
    return sched


def sampler_timesteps(pipe, sampler: SamplerConfig) -> list[int]:
    """The timesteps the sampler visits, in order."""
    return [int(t) for t in make_scheduler(pipe, sampler).timesteps]


def null_class(denoiser) -> int:
    """Class id used as the unconditional label for guidance."""
    return adapter_for(denoiser).null_class(denoiser)


def build_conditioning(pipe, num_images: int, seed: int, class_labels=None, prompts=None,
                       guidance_scale: float = 1.0, device="cpu") -> Conditioning:
    """Conditioning for ``num_images`` samples (:class:`~tfmq.models.base.Conditioning`).
    Class-conditional models get the given labels (cycled) or labels drawn with ``seed``; text
    models need ``prompts`` (cycled), encoded by the pipeline's text encoder(s)."""
    denoiser = get_denoiser(pipe)
    return adapter_for(denoiser).conditioning(pipe, denoiser, num_images, seed, class_labels, prompts,
                                              guidance_scale, device)


def initial_noise(shape: tuple[int, ...], start: int, count: int, seed: int) -> torch.Tensor:
    """Noise for samples ``start .. start+count-1``: sample i uses seed ``seed + i``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                        for i in range(count)])


StepHook = Callable[[int, int, torch.Tensor, dict], None]


def serving_denoiser(pipe, denoiser=None):
    """The module that serves the denoiser calls: ``denoiser`` if given, else the one an exported
    pipeline carries (``pipe.onnx_denoiser``, see :func:`tfmq.export.runners.load_onnx`), else
    the pipeline's own."""
    if denoiser is not None:
        return denoiser
    served = getattr(pipe, "onnx_denoiser", None)
    return served if served is not None else get_denoiser(pipe)


@torch.no_grad()
def denoise(pipe, sampler: SamplerConfig, num_images: int, batch_size: int, seed: int,
            cond: Conditioning | None = None, on_step: StepHook | None = None,
            denoiser=None, progress: bool = True, desc: str = "sampling",
            first_index: int = 0) -> torch.Tensor:
    """Run the sampler and return the final latents / images (float, model space).

    ``on_step(step_index, t, model_input, kwargs)`` sees exactly what the denoiser receives
    at every step (with the guidance batch doubled). ``denoiser`` overrides the pipeline's own.
    ``first_index``: the samples drawn are ``first_index .. first_index + num_images - 1`` of a
    larger set (one process's share, see :func:`tfmq.distributed.shard`): their noise seeds are
    those global indices; ``cond`` holds the rows of these samples only.
    """
    sampler.validate()
    arch = get_denoiser(pipe)
    adapter = adapter_for(arch)
    denoiser = serving_denoiser(pipe, denoiser)
    check_timesteps(denoiser, sampler.to_dict(), sampler_timesteps(pipe, sampler))  # per-step models
    steps = step_index_of(denoiser)          # per-step models: each step selected from the host value
    cond = cond or Conditioning()
    device = next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    cfg = sampler.guidance_scale > 1.0
    if cfg and cond.negative is None:
        raise ValueError("guidance scale > 1 needs class labels or prompts")
    shape = adapter.sample_shape(arch)
    outputs = []
    n_batches = (num_images + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * sampler.steps, desc=desc, disable=not progress, leave=False)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        sched = make_scheduler(pipe, sampler)
        x = initial_noise(shape, first_index + start, count, seed).to(device=device, dtype=dtype)
        x = x * sched.init_noise_sigma
        gens = [torch.Generator(device).manual_seed(seed + 1_000_003 + first_index + start + i)
                for i in range(count)]
        kwargs = cond.rows(slice(start, start + count), cfg)
        kwargs = {k: v.to(device) if not v.is_floating_point() else v.to(device, dtype) for k, v in kwargs.items()}
        for i, t in enumerate(sched.timesteps):
            model_in = torch.cat([x, x]) if cfg else x
            model_in = sched.scale_model_input(model_in, t)
            t_batch = torch.full((model_in.shape[0],), int(t), device=device, dtype=torch.long)
            if on_step is not None:
                on_step(i, int(t), model_in, kwargs)
            if steps is not None:
                steps.expect(int(t))
            eps = adapter.epsilon(arch, denoiser(model_in, timestep=t_batch, **adapter.forward_kwargs(kwargs)))
            if cfg:
                e_cond, e_uncond = eps.chunk(2)
                eps = e_uncond + sampler.guidance_scale * (e_cond - e_uncond)
            step_kw = {"generator": gens}
            if sampler.name == "ddim":
                step_kw["eta"] = sampler.eta
            x = sched.step(eps, t, x, **step_kw).prev_sample
            bar.update(1)
        outputs.append(x.float().cpu())
    bar.close()
    return torch.cat(outputs)


@torch.no_grad()
def decode(pipe, x: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Latents (or pixels) in model space -> uint8 NHWC images."""
    vae = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)
    if vae is not None:
        device = next(vae.parameters()).device
        dtype = next(vae.parameters()).dtype
        scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
        x = torch.cat([vae.decode((x[i:i + batch_size] / scale).to(device, dtype)).sample.float().cpu()
                       for i in range(0, len(x), batch_size)])
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def generate(pipe, sampler: SamplerConfig, num_images: int, batch_size: int = 16, seed: int = 0,
             class_labels=None, prompts=None, progress: bool = True, desc: str = "sampling",
             denoiser=None, indices: range | None = None) -> np.ndarray:
    """Sample ``num_images`` images (uint8 NHWC) from a FP or quantized pipeline. ``denoiser``
    overrides the pipeline's own (see :func:`serving_denoiser`).

    ``indices`` (a contiguous ``range`` within ``0 .. num_images - 1``, e.g. this process's
    :func:`tfmq.distributed.shard`) draws only those images, exactly as they are in the full set
    (same noise, labels and prompts); None draws all."""
    denoiser = serving_denoiser(pipe, denoiser)
    device = next(denoiser.parameters()).device
    cond = build_conditioning(pipe, num_images, seed, class_labels, prompts, sampler.guidance_scale, device)
    first = 0
    if indices is not None:
        if indices.step != 1 or indices.start < 0 or indices.stop > num_images:
            raise ValueError(f"indices must be a contiguous range within 0..{num_images - 1}, got {indices}")
        first, num_images = indices.start, len(indices)
        cond = select_rows(cond, slice(indices.start, indices.stop))
        if num_images == 0:      # a process with no share (more processes than batches)
            return np.zeros((0, 0, 0, 0), dtype=np.uint8)
    x = denoise(pipe, sampler, num_images, batch_size, seed, cond, progress=progress, desc=desc,
                denoiser=denoiser, first_index=first)
    return decode(pipe, x)


def select_rows(cond: Conditioning, rows: slice) -> Conditioning:
    """The conditioning of samples ``rows`` only."""
    inputs = {k: v[rows] for k, v in cond.inputs.items()}
    negative = None if cond.negative is None else {k: v[rows] for k, v in cond.negative.items()}
    return Conditioning(inputs, negative)

