"""A quantized denoiser inside a normal diffusers pipeline.

``tfmq.load`` / ``tfmq.quantize`` return the pipeline with its calibrated scheduler (the class
and config the per-step parameters were calibrated with). For a step-dependent model (FSC
parameter sets or a temporal feature cache), the pipeline's own ``__call__`` is checked before
it starts: another scheduler class or step count raises
:class:`~tfmq.runtime.steps.CalibrationMismatchError` naming what was calibrated, instead of
silently sampling with the wrong parameters.
"""

from __future__ import annotations

import inspect

from torch import nn

from .steps import CalibrationMismatchError, check_timesteps, describe_calibration, is_step_dependent

#: tfmq sampler names -> diffusers scheduler class names.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "plms": "PNDMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def calibrated_scheduler(pipe, sampler: dict):
    """A scheduler of the calibrated class built from the pipeline's scheduler config."""
    import diffusers
    cls_name = SCHEDULER_CLASSES.get(sampler["name"])
    if cls_name is None:
        raise ValueError(f"unknown sampler {sampler['name']!r}")
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config)


def _requested_steps(pipe, args: tuple, kwargs: dict) -> int | None:
    sig = inspect.signature(type(pipe).__mro__[1].__call__)
    try:
        bound = sig.bind(pipe, *args, **kwargs)
    except TypeError:
        return kwargs.get("num_inference_steps")
    bound.apply_defaults()
    return bound.arguments.get("num_inference_steps")


def check_pipeline_call(pipe, denoiser: nn.Module, steps: int | None) -> None:
    """Refuse ``pipe(num_inference_steps=steps)`` unless it runs the calibrated scheduler class
    and timesteps."""
    info = denoiser.tfmq_info
    cal = info["sampler"]
    want = SCHEDULER_CLASSES.get(cal["name"])
    have = type(pipe.scheduler).__name__
    if steps is None:
        raise CalibrationMismatchError(
            f"this quantized model holds per-step parameters for {describe_calibration(cal, info['timesteps'])}; "
            f"call the pipeline with num_inference_steps={cal['steps']}")
    if have != want:
        raise CalibrationMismatchError(
            f"this quantized model was calibrated for {describe_calibration(cal, info['timesteps'])} "
            f"with {want}; the pipeline's scheduler is {have}. Use the calibrated scheduler "
            f"(tfmq.load / tfmq.quantize set pipe.scheduler to it) or quantize again for {have}")
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(int(steps))
    check_timesteps(denoiser, {"name": cal["name"], "steps": int(steps)}, [int(t) for t in probe.timesteps])


def _checked_call(self, *args, **kwargs):
    denoiser = self.tfmq_denoiser
    if is_step_dependent(denoiser):
        check_pipeline_call(self, denoiser, _requested_steps(self, args, kwargs))
    return type(self).__mro__[1].__call__(self, *args, **kwargs)


def bind_quantized(pipe, denoiser: nn.Module) -> None:
    """Give ``pipe`` (in place) the calibrated scheduler and a ``__call__`` that checks the
    scheduler and step count for step-dependent models."""
    info = denoiser.tfmq_info
    pipe.scheduler = calibrated_scheduler(pipe, info["sampler"])
    pipe.tfmq_denoiser = denoiser
    base = type(pipe)
    if getattr(base, "_tfmq_quantized", False):
        return
    cls = type(base.__name__, (base,), {"__call__": _checked_call, "_tfmq_quantized": True,
                                        "__module__": base.__module__,
                                        "__doc__": base.__doc__})
    pipe.__class__ = cls
