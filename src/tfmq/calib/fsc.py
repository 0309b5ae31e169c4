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

While sampling, the runtime's step index (:class:`tfmq.runtime.steps.StepIndex`, set by a
forward pre-hook on the denoiser) maps the call's timestep to its index in the calibrated
timesteps and selects that parameter set, so tfmq's sampler and diffusers' own ``pipe()`` both
work. A timestep outside the calibrated set, or a sequence that is not the calibrated sampler's,
is refused with a message saying what the model was calibrated for
(:class:`~tfmq.runtime.steps.CalibrationMismatchError`).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..hooks import temporary_hooks
from ..models.temporal import (find_temporal_block, finite_set, model_classes, step_layer_names,
                               temporal_features)
from ..quant.model import act_quantizers, multi_set_quantizers, quant_state, set_quant_state
from ..quant.quantizer import UniformQuantizer
from ..runtime.steps import (CalibrationMismatchError, StepIndex, attach_step_index,  # noqa: F401
                             detach_step_index)
from .data import CalibrationData
from .ranges import calibrate_activations

#: Momentum of the running-statistics refinement of ``all`` mode.
RUNNING_MOMENTUM = 0.95
#: Rows of the finite set processed at once when calibrating the TIB.
TIB_CHUNK_ROWS = 4096


# ---- which quantizers --------------------------------------------------------------------------
def tib_act_quantizers(denoiser: nn.Module) -> dict[str, UniformQuantizer]:
    """Activation quantizers of the TIB's layers whose inputs depend on the step, by name."""
    prefixes = tuple(n + "." for n in step_layer_names(denoiser))
    return {n: q for n, q in act_quantizers(denoiser).items() if n.startswith(prefixes)}


# ---- step selection at sampling time --------------------------------------------------------------
def attach_step_selector(denoiser: nn.Module, timesteps: list[int], sampler: dict,
                         strict: bool = True) -> StepIndex | None:
    """Give the calibrated (fake-quant) denoiser the runtime's :class:`StepIndex` and make it
    select the parameter set of every multi-set quantizer; None when no quantizer has several sets."""
    quantizers = multi_set_quantizers(denoiser)
    if not quantizers:
        detach_step_index(denoiser)
        return None
    n_sets = {q.n_sets for q in quantizers}
    if n_sets != {len(timesteps)}:
        raise CalibrationMismatchError(f"quantizers hold {sorted(n_sets)} parameter sets but "
                                       f"{len(timesteps)} timesteps were calibrated")
    steps = attach_step_index(denoiser, timesteps, sampler, strict)

    def select(index: int) -> None:
        for q in quantizers:
            q.set_index = index

    steps.listeners.append(select)
    return steps


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

    with temporary_hooks((q, observe(n)) for n, q in quantizers.items()):
        with quant_state(denoiser, act=False):
            if block.needs_conditioning:
                if data is None:
                    raise ValueError("this model's time embedding reads other inputs: calibration data needed")
                for s in tqdm(range(len(timesteps)), desc="FSC (TIB)", disable=not progress, leave=False):
                    d = data.step(s)
                    current["step"] = torch.full((d["timestep"].shape[0],), s, dtype=torch.long)
                    temporal_features(denoiser, d["timestep"].to(device),
                                      d["class_labels"].to(device) if "class_labels" in d else None, d,
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
    hooks = [(q, lambda m, a, n=n: extremes[n].append(     # on the device: read once per step, not per call
        torch.stack([a[0].detach().amin().float(), a[0].detach().amax().float()])))
        for n, q in quantizers.items()]
    like = torch.zeros(1)
    with temporary_hooks(hooks):
        for s in tqdm(range(len(data)), desc="FSC (all)", disable=not progress, leave=False):
            for v in extremes.values():
                v.clear()
            calibrate_activations(denoiser, data, method, per_step=True, rows_per_step=rows_per_step,
                                  batch_size=batch_size, seed=seed + s, steps=[s], progress=False,
                                  only=quantizers)
            if momentum == 0:
                continue
            # this rank's batch extremes, read once per step (one host sync); several processes:
            # every rank's batches, in batch (= rank) order
            seen = {n: torch.stack(v).cpu() if v else torch.empty(0, 2) for n, v in extremes.items()}
            if distributed.is_distributed():
                parts = distributed.gather_objects(seen)
                seen = {n: torch.cat([part[n] for part in parts]) for n in quantizers}
            for n, q in quantizers.items():
                lo, hi = _representable_range(q, s)
                for mn, mx in seen[n]:
                    lo = momentum * lo + (1 - momentum) * mn
                    hi = momentum * hi + (1 - momentum) * mx
                q.set_range(lo, hi, like, set_index=s)


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
