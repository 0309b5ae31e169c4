"""Finite set calibration (FSC): activation quantization parameters per sampling step.

The time step takes one of a finite set of values (the sampler's timesteps), so activation
ranges can be found per step instead of one range for all steps. Every multi-set activation
quantizer (``UniformQuantizer(n_sets=T)``) holds one scale / zero-point per step. Two modes:

``tib``
    Per-step parameters for the temporal information block's activations only. They depend on
    ``t`` (and the class) alone, so the per-step min-max over the finite set is exact. The other
    activation quantizers hold one parameter set, a range for all steps (which activation step
    learning may refine afterwards).
``all``
    What the official TFMQ-DM code does: every activation quantizer gets its own parameters at
    every step, initialised by the MSE range search on that step's calibration data and refined
    with running statistics (an exponential moving average of each batch's min / max).

While sampling, a forward pre-hook on the denoiser (:class:`StepSelector`) maps the call's
timestep to its index in the calibrated timesteps and selects that parameter set, so tfmq's
sampler and diffusers' own ``pipe()`` both work. A timestep outside the calibrated set, or a
sequence that is not the calibrated sampler's, is refused with a message saying what the
checkpoint was calibrated for (:class:`CalibrationMismatchError`).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import FSC_MODES  # noqa: F401  (re-exported: none, tib, all)
from ..models.temporal import (call_arguments, find_temporal_block, finite_set, model_classes,
                               temporal_features, timestep_key, tib_layer_names)
from ..quant.model import act_quantizers, multi_set_quantizers, set_quant_state
from ..quant.quantizer import UniformQuantizer
from .data import CalibrationData
from .ranges import calibrate_activations

#: Momentum of the running-statistics refinement of ``all`` mode.
RUNNING_MOMENTUM = 0.95
#: Rows of the finite set processed at once when calibrating the TIB.
TIB_CHUNK_ROWS = 4096


class CalibrationMismatchError(ValueError):
    """Sampling does not match what per-step (FSC / cached) parameters were calibrated for."""


def describe_calibration(sampler: dict, timesteps: list[int]) -> str:
    """'ddim with 100 steps (timesteps 990, 980, ..., 0)'."""
    ts = [int(t) for t in timesteps]
    shown = ", ".join(map(str, ts)) if len(ts) <= 4 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
    return f"{sampler.get('name', '?')} with {sampler.get('steps', len(ts))} steps (timesteps {shown})"


# ---- which quantizers --------------------------------------------------------------------------
def tib_act_quantizers(denoiser: nn.Module) -> dict[str, UniformQuantizer]:
    """Activation quantizers of the TIB's layers, by name."""
    prefixes = tuple(n + "." for n in tib_layer_names(denoiser))
    return {n: q for n, q in act_quantizers(denoiser).items() if n.startswith(prefixes)}


# ---- step selection at sampling time --------------------------------------------------------------
class StepSelector:
    """Forward pre-hook selecting each call's parameter set from its timestep.

    ``strict`` (the default) also checks the ORDER of the calls: a trajectory starts at the first
    calibrated timestep and each call stays at the current step (guidance, repeated evaluations)
    or moves to the next one. That is what refuses another step count whose timesteps happen to
    be a subset of the calibrated ones (DDIM-50 inside DDIM-100)."""

    def __init__(self, denoiser: nn.Module, timesteps: list[int], sampler: dict, strict: bool = True):
        self.timesteps = [int(t) for t in timesteps]
        self.sampler = dict(sampler)
        self.strict = strict
        self.first_index: dict[int, int] = {}
        for i, t in enumerate(self.timesteps):
            self.first_index.setdefault(timestep_key(t), i)
        self.quantizers = multi_set_quantizers(denoiser)
        self.last: int | None = None
        self.paused = False        # set by tfmq.quant.model.row_steps while calibrating

    def describe(self) -> str:
        return describe_calibration(self.sampler, self.timesteps)

    def index_for(self, key: int) -> int:
        if key not in self.first_index:
            raise CalibrationMismatchError(
                f"timestep {key} is not one this quantized model was calibrated for: its per-step "
                f"activation parameters are for {self.describe()}; sample with that sampler and "
                f"step count (or quantize again for yours)")
        if not self.strict:
            return self.first_index[key]
        ts, last = self.timesteps, self.last
        if last is not None:
            if last + 1 < len(ts) and ts[last + 1] == key:
                return last + 1
            if ts[last] == key:
                return last
        if ts[0] == key:
            return 0
        raise CalibrationMismatchError(
            f"timestep {key} does not follow the calibrated sampler's sequence "
            f"(previous step: {'none' if last is None else ts[last]}); this model's per-step "
            f"activation parameters are for {self.describe()}: another sampler or step count was used")

    def select(self, timestep) -> int:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        keys = {timestep_key(v) for v in t.reshape(-1).tolist()}
        if len(keys) != 1:
            raise CalibrationMismatchError(
                f"one denoiser call mixes timesteps {sorted(keys)}; per-step activation parameters "
                "need a single timestep per call")
        index = self.index_for(keys.pop())
        for q in self.quantizers:
            q.set_index = index
        self.last = index
        return index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.paused:
            return None
        self.select(call_arguments(module, args, kwargs)["timestep"])
        return None


def attach_step_selector(denoiser: nn.Module, timesteps: list[int], sampler: dict,
                         strict: bool = True) -> StepSelector | None:
    """Install (or replace) the step-selecting pre-hook; None when no quantizer has several sets."""
    detach_step_selector(denoiser)
    selector = StepSelector(denoiser, timesteps, sampler, strict)
    if not selector.quantizers:
        return None
    n_sets = {q.n_sets for q in selector.quantizers}
    if n_sets != {len(selector.timesteps)}:
        raise CalibrationMismatchError(f"quantizers hold {sorted(n_sets)} parameter sets but "
                                       f"{len(selector.timesteps)} timesteps were calibrated")
    denoiser._tfmq_step_hook = denoiser.register_forward_pre_hook(selector, with_kwargs=True)
    denoiser._tfmq_step_selector = selector
    return selector


def detach_step_selector(denoiser: nn.Module) -> None:
    hook = getattr(denoiser, "_tfmq_step_hook", None)
    if hook is not None:
        hook.remove()
    denoiser._tfmq_step_hook = None
    denoiser._tfmq_step_selector = None


def attach_from_info(denoiser: nn.Module) -> None:
    """Re-install the step selector of a loaded checkpoint from its ``tfmq_info``."""
    info = getattr(denoiser, "tfmq_info", None) or {}
    if info.get("fsc", {}).get("n_sets", 1) > 1:
        attach_step_selector(denoiser, info["timesteps"], info["sampler"])


def is_step_dependent(denoiser: nn.Module) -> bool:
    """Whether the quantized denoiser holds per-step parameters (FSC) or per-step cached
    temporal features, i.e. is tied to its calibration sampler."""
    info = getattr(denoiser, "tfmq_info", None) or {}
    return info.get("fsc", {}).get("n_sets", 1) > 1 or info.get("temporal", {}).get("mode") == "cache"


def check_sampler(pipe, sampler, denoiser: nn.Module | None = None) -> None:
    """Refuse sampling a step-dependent quantized model with another sampler / step count than
    its calibration's (called at the sampling entry)."""
    from ..sampling import sampler_timesteps
    denoiser = denoiser if denoiser is not None else pipe.unet
    if not is_step_dependent(denoiser):
        return
    info = denoiser.tfmq_info
    cal = info["sampler"]
    ts = sampler_timesteps(pipe, sampler)
    if sampler.name != cal["name"] or sampler.steps != cal["steps"] or ts != [int(t) for t in info["timesteps"]]:
        raise CalibrationMismatchError(
            f"this quantized model was calibrated for {describe_calibration(cal, info['timesteps'])} "
            f"and holds per-step parameters; requested {describe_calibration(sampler.to_dict(), ts)}. "
            f"Sample with --sampler {cal['name']} --steps {cal['steps']}, or quantize again for this sampler")
    selector = getattr(denoiser, "_tfmq_step_selector", None)
    if selector is not None:
        selector.last = None                      # a new trajectory starts


# ---- calibration ---------------------------------------------------------------------------------
def _require_sets(quantizers: dict[str, UniformQuantizer], n: int) -> None:
    bad = [name for name, q in quantizers.items() if q.n_sets != n]
    if bad:
        raise ValueError(f"{len(bad)} activation quantizer(s) (e.g. {bad[0]}) hold "
                         f"{quantizers[bad[0]].n_sets} parameter sets, FSC needs {n} (one per step); "
                         "wrap the denoiser with WrapSpec.n_sets = number of steps")


@torch.no_grad()
def calibrate_tib_per_step(denoiser: nn.Module, timesteps: list[int], data: CalibrationData | None = None,
                           progress: bool = True) -> dict[str, UniformQuantizer]:
    """Exact per-step min-max of the TIB's activation quantizers.

    Their inputs depend on (t, class) only, so the range at step ``s`` is taken over every class
    of the model (class-conditional models with an embedding table) or over the calibration
    data's conditioning at that step (models whose embedding also reads text / other inputs)."""
    quantizers = tib_act_quantizers(denoiser)
    if not quantizers:
        return quantizers
    _require_sets(quantizers, len(timesteps))
    block = find_temporal_block(denoiser)
    device = next(denoiser.parameters()).device
    all_act = act_quantizers(denoiser)
    prev = {n: q.enabled for n, q in all_act.items()}
    set_quant_state(denoiser, act=False)
    lo = {n: torch.full((len(timesteps),), float("inf")) for n in quantizers}
    hi = {n: torch.full((len(timesteps),), float("-inf")) for n in quantizers}
    current: dict = {}

    def observe(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(args[0].shape[0], -1)
            step = current["step"].to(x.device)
            mn = torch.full((len(timesteps),), float("inf"), device=x.device).scatter_reduce(
                0, step, x.amin(dim=1), "amin")
            mx = torch.full((len(timesteps),), float("-inf"), device=x.device).scatter_reduce(
                0, step, x.amax(dim=1), "amax")
            lo[name] = torch.minimum(lo[name], mn.cpu())
            hi[name] = torch.maximum(hi[name], mx.cpu())
        return hook

    hooks = [q.register_forward_pre_hook(observe(n)) for n, q in quantizers.items()]
    try:
        if block.needs_conditioning:
            if data is None:
                raise ValueError("this model's time embedding reads other inputs: calibration data needed")
            for s in tqdm(range(len(timesteps)), desc="FSC (TIB)", disable=not progress, leave=False):
                d = data.step(s)
                current["step"] = torch.full((d["timestep"].shape[0],), s, dtype=torch.long)
                temporal_features(denoiser, d["timestep"].to(device),
                                  d["class_labels"].to(device) if "class_labels" in d else None,
                                  d["encoder_hidden_states"].to(device) if "encoder_hidden_states" in d else None,
                                  block=block)
        else:
            classes = model_classes(denoiser) if block.class_conditional else None
            if block.class_conditional and classes is None:
                if data is None:
                    raise ValueError("class labels of this model are not a finite table: calibration data needed")
                classes = sorted({int(c) for s in range(len(data)) for c in data.step(s)["class_labels"]})
            t, labels, step = finite_set(timesteps, classes)
            for a in tqdm(range(0, len(t), TIB_CHUNK_ROWS), desc="FSC (TIB)", disable=not progress, leave=False):
                sl = slice(a, a + TIB_CHUNK_ROWS)
                current["step"] = step[sl]
                temporal_features(denoiser, t[sl].to(device), None if labels is None else labels[sl].to(device),
                                  block=block)
    finally:
        for h in hooks:
            h.remove()
        for n, q in all_act.items():
            q.enabled = prev[n]
    like = torch.zeros(1)
    for n, q in quantizers.items():
        for s in range(len(timesteps)):
            q.set_range(lo[n][s].reshape(1), hi[n][s].reshape(1), like, set_index=s)
    return quantizers


def _representable_range(q: UniformQuantizer, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = q.scale.data[s].float().cpu(), q.zero_point[s].float().cpu()
    return ((q.qmin - zero) * scale).reshape(1), ((q.qmax - zero) * scale).reshape(1)


@torch.no_grad()
def calibrate_all_per_step(denoiser: nn.Module, data: CalibrationData, method: str = "mse",
                           momentum: float = RUNNING_MOMENTUM, rows_per_step: int | None = None,
                           batch_size: int = 64, seed: int = 0, progress: bool = True) -> None:
    """Every activation quantizer, every step: range by ``method`` (MSE search by default) on the
    step's data, then refined with running statistics: ``lo <- m * lo + (1 - m) * batch_min``
    (and likewise the max) over the step's calibration batches, in order."""
    if not 0 <= momentum < 1:
        raise ValueError(f"running-statistics momentum must be in [0, 1), got {momentum}")
    quantizers = act_quantizers(denoiser)
    _require_sets(quantizers, len(data))
    extremes: dict[str, list] = {n: [] for n in quantizers}
    hooks = [q.register_forward_pre_hook(
        lambda m, a, n=n: extremes[n].append((a[0].detach().amin().float().cpu(),
                                               a[0].detach().amax().float().cpu())))
        for n, q in quantizers.items()]
    like = torch.zeros(1)
    try:
        for s in tqdm(range(len(data)), desc="FSC (all)", disable=not progress, leave=False):
            for v in extremes.values():
                v.clear()
            calibrate_activations(denoiser, data, method, per_step=True, rows_per_step=rows_per_step,
                                  batch_size=batch_size, seed=seed + s, steps=[s], progress=False,
                                  only=quantizers)
            if momentum == 0:
                continue
            for n, q in quantizers.items():
                lo, hi = _representable_range(q, s)
                for mn, mx in extremes[n]:
                    lo = momentum * lo + (1 - momentum) * mn
                    hi = momentum * hi + (1 - momentum) * mx
                q.set_range(lo, hi, like, set_index=s)
    finally:
        for h in hooks:
            h.remove()


def run_fsc(denoiser: nn.Module, data: CalibrationData, mode: str, method: str = "mse",
            momentum: float = RUNNING_MOMENTUM, rows_per_step: int | None = None, batch_size: int = 64,
            seed: int = 0, progress: bool = True) -> dict:
    """Calibrate activations in FSC ``mode`` (``tib`` or ``all``), turn activation quantization
    on and install the step selector. Returns the summary stored in ``tfmq_info['fsc']``."""
    if mode not in ("tib", "all"):
        raise ValueError(f"FSC mode must be 'tib' or 'all' here, got {mode!r}")
    if mode == "all":
        calibrate_all_per_step(denoiser, data, method, momentum, rows_per_step, batch_size, seed, progress)
        per_step = act_quantizers(denoiser)
    else:
        per_step = tib_act_quantizers(denoiser)
        others = {n: q for n, q in act_quantizers(denoiser).items() if n not in per_step}
        if others:        # one range for all steps
            calibrate_activations(denoiser, data, method, per_step=False, rows_per_step=rows_per_step,
                                  batch_size=batch_size, seed=seed, progress=progress, only=others)
        calibrate_tib_per_step(denoiser, data.timesteps, data, progress)
    set_quant_state(denoiser, act=True)
    attach_step_selector(denoiser, data.timesteps, data.sampler.to_dict())
    return {"mode": mode, "n_sets": len(data.timesteps), "per_step_quantizers": len(per_step),
            "method": method, "momentum": momentum if mode == "all" else None}
