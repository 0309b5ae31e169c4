"""The per-step index of a step-dependent quantized denoiser, as data.

TFMQ-DM's finite set calibration (FSC) and the temporal feature cache give a quantized denoiser
parameters per sampling step. At run time the step is one integer: the position of the call's
timestep in the calibrated timesteps. :class:`StepIndex` holds it as a long tensor buffer that
every per-step parameter table is indexed with, so a converted denoiser has no Python state in
its forward pass and can be compiled (``torch.compile(fullgraph=True)``) or captured in a CUDA
graph: between calls only the buffer's value changes.

Who sets the index:

* in eager mode, a forward pre-hook on the denoiser reads the call's timestep, checks it against
  the calibrated sampler (the value, and the ORDER of the steps, which refuses another step count
  whose timesteps happen to be a subset of the calibrated ones) and writes the buffer; a caller
  that knows the timestep on the host (tfmq's own sampler loop) checks and selects it before the
  call with :meth:`StepIndex.expect`, so no timestep is read back from the GPU;
* while compiling or capturing a CUDA graph, the same hook computes the index with tensor
  operations only (no host synchronisation, no check): the caller runs the calibrated sampler,
  which :func:`check_sampler` verified before the first step.

This module imports nothing from calibration: it is shared by the runtime modules and by the
fake-quant (calibration) quantizers, which register a listener instead of reading the buffer.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn


class CalibrationMismatchError(ValueError):
    """Sampling does not match what per-step (FSC / cached) parameters were calibrated for."""


def describe_calibration(sampler: dict, timesteps: list[int]) -> str:
    """'ddim with 100 steps (timesteps 990, 980, ..., 0)'."""
    ts = [int(t) for t in timesteps]
    shown = ", ".join(map(str, ts)) if len(ts) <= 4 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
    return f"{sampler.get('name', '?')} with {sampler.get('steps', len(ts))} steps (timesteps {shown})"


def timestep_key(t) -> int:
    """The integer key of a timestep value: tfmq's sampler passes ``int(t)``, diffusers'
    pipelines may pass the float or the tensor; both map to the truncated integer."""
    return int(float(t))


def call_arguments(denoiser: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The named arguments of a ``denoiser(...)`` call (for forward pre-hooks)."""
    sig = getattr(denoiser, "_tfmq_forward_sig", None)
    if sig is None:
        sig = inspect.signature(type(denoiser).forward)
        denoiser._tfmq_forward_sig = sig
    return sig.bind_partial(denoiser, *args, **kwargs).arguments


def argument_picker(denoiser: nn.Module, name: str) -> Callable[[tuple, dict], object]:
    """A function ``(args, kwargs) -> value`` of forward argument ``name`` of ``denoiser``'s
    calls; plain indexing (the position is looked up once), so it is traceable by torch.compile.
    ``sample`` is the first parameter whatever the model calls it (``hidden_states`` in
    diffusers' transformers)."""
    params = list(inspect.signature(type(denoiser).forward).parameters)[1:]     # without self
    pos = params.index(name) if name in params else (0 if name == "sample" else None)

    def pick(args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        if pos is not None and pos < len(args):
            return args[pos]
        return None
    return pick


def _tracing() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured (no host syncs then)."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class StepIndex(nn.Module):
    """The calibrated timesteps and the current step, as buffers.

    ``index`` (a 0-d long tensor) is what per-step parameter tables are indexed with.
    ``strict`` also checks the order of the calls: a trajectory starts at the first calibrated
    timestep and each call stays at the current step (guidance, repeated evaluations) or moves to
    the next one. ``listeners`` are called with the new index (eager mode only); the fake-quant
    calibration quantizers use that.
    """

    def __init__(self, timesteps: list[int], sampler: dict, strict: bool = True):
        super().__init__()
        ts = [int(t) for t in timesteps]
        if not ts:
            raise ValueError("a step index needs at least one calibrated timestep")
        self.sampler = dict(sampler)
        self.strict = strict
        self.paused = False            # set while calibration drives the index itself
        self.last: int | None = None
        self.listeners: list[Callable[[int], None]] = []
        self._first: dict[int, int] = {}
        for i, t in enumerate(ts):
            self._first.setdefault(t, i)
        self.register_buffer("timesteps", torch.tensor(ts, dtype=torch.long), persistent=False)
        self.register_buffer("index", torch.zeros((), dtype=torch.long), persistent=False)
        self._ts = ts
        self._timestep_of: Callable | None = None      # set by attach_step_index
        self._expected: int | None = None              # the next call's step, announced by expect()

    def __len__(self) -> int:
        return len(self._ts)

    def describe(self) -> str:
        return describe_calibration(self.sampler, self._ts)

    def reset(self) -> None:
        """A new trajectory starts (the order check begins again at the first step)."""
        self.last = None
        self._expected = None

    def index_for(self, key: int) -> int:
        """The step index of timestep ``key``; raises :class:`CalibrationMismatchError` for a
        timestep outside the calibrated set or (strict) out of the calibrated order."""
        if key not in self._first:
            raise CalibrationMismatchError(
                f"timestep {key} is not one this quantized model was calibrated for: its per-step "
                f"parameters are for {self.describe()}; sample with that sampler and step count "
                f"(or quantize again for yours)")
        if not self.strict:
            return self._first[key]
        ts, last = self._ts, self.last
        if last is not None:
            if last + 1 < len(ts) and ts[last + 1] == key:
                return last + 1
            if ts[last] == key:
                return last
        if ts[0] == key:
            return 0
        raise CalibrationMismatchError(
            f"timestep {key} does not follow the calibrated sampler's sequence (previous step: "
            f"{'none' if last is None else ts[last]}); this model's per-step parameters are for "
            f"{self.describe()}: another sampler or step count was used")

    def set(self, index: int) -> None:
        """Select step ``index`` (for callers that drive the sampler loop themselves)."""
        if not 0 <= int(index) < len(self._ts):
            raise IndexError(f"step index {index} outside the {len(self._ts)} calibrated steps")
        self.index.fill_(int(index))
        self.last = int(index)
        for fn in self.listeners:
            fn(int(index))

    def select(self, timestep) -> int:
        """Check ``timestep`` (one value for the whole call) and select its step."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        keys = {timestep_key(v) for v in t.reshape(-1).tolist()}
        if len(keys) != 1:
            raise CalibrationMismatchError(
                f"one denoiser call mixes timesteps {sorted(keys)}; per-step parameters need a "
                "single timestep per call")
        index = self.index_for(keys.pop())
        self.set(index)
        return index

    def expect(self, timestep) -> None:
        """Check and select the step of the NEXT call's timestep, known on the host by a caller
        that runs the sampler loop itself (:func:`tfmq.sampling.denoise`). That call's pre-hook
        then skips reading the call's timestep tensor back from the device, which would stall
        the host once per step until the GPU caught up. The caller passes that timestep to the
        call. Does nothing while the index is paused."""
        if self.paused:
            return
        self._expected = self.select(timestep)

    def select_traced(self, timestep: torch.Tensor) -> None:
        """Tensor-only selection for compiled / captured code: the index of the first element of
        ``timestep`` in the calibrated timesteps (no check, no host synchronisation)."""
        t = timestep.reshape(-1)[:1].to(self.timesteps.device).long()
        self.index.copy_((self.timesteps == t).long().argmax())

    def pre_hook(self, denoiser: nn.Module, args: tuple, kwargs: dict):
        if self.paused:
            return None
        if self._expected is not None:         # selected and checked by expect(): no read-back
            self._expected = None
            return None
        pick = self._timestep_of or argument_picker(denoiser, "timestep")
        timestep = pick(args, kwargs)
        if _tracing():
            if not torch.is_tensor(timestep):
                timestep = torch.tensor(timestep)
            self.select_traced(timestep)
        else:
            self.select(timestep)
        return None

    def extra_repr(self) -> str:
        return self.describe()


def attach_step_index(denoiser: nn.Module, timesteps: list[int], sampler: dict,
                      strict: bool = True) -> StepIndex:
    """Give ``denoiser`` a :class:`StepIndex` (``denoiser.tfmq_steps``) and the pre-hook that
    sets it on every call; an earlier one is replaced."""
    detach_step_index(denoiser)
    steps = StepIndex(timesteps, sampler, strict)
    device = next((p.device for p in denoiser.parameters() if not p.is_meta), None)
    if device is not None:
        steps = steps.to(device)
    steps._timestep_of = argument_picker(denoiser, "timestep")
    denoiser.tfmq_steps = steps
    denoiser._tfmq_step_hook = denoiser.register_forward_pre_hook(steps.pre_hook, with_kwargs=True)
    return steps


def detach_step_index(denoiser: nn.Module) -> None:
    hook = getattr(denoiser, "_tfmq_step_hook", None)
    if hook is not None:
        hook.remove()
    denoiser._tfmq_step_hook = None
    if "tfmq_steps" in denoiser._modules:
        del denoiser._modules["tfmq_steps"]
    elif hasattr(denoiser, "tfmq_steps"):
        denoiser.tfmq_steps = None


def step_index_of(denoiser: nn.Module) -> StepIndex | None:
    """The denoiser's :class:`StepIndex`, or None for a model without per-step parameters."""
    return getattr(denoiser, "tfmq_steps", None)


def is_step_dependent(denoiser: nn.Module) -> bool:
    """Whether a quantized denoiser holds per-step parameters (FSC) or per-step cached temporal
    features (stored, or tabulated at load), i.e. is tied to its calibration sampler."""
    info = getattr(denoiser, "tfmq_info", None) or {}
    return (info.get("fsc", {}).get("n_sets", 1) > 1 or info.get("temporal", {}).get("mode") == "cache"
            or getattr(denoiser, "tfmq_temporal_cache", None) is not None)


def check_timesteps(denoiser: nn.Module, sampler: dict, timesteps: list[int]) -> None:
    """Refuse sampling a step-dependent quantized model with another sampler / step count than its
    calibration's (``sampler``: the requested sampler as a dict with ``name`` and ``steps``,
    ``timesteps``: the ones it visits). Resets the order check for a new trajectory."""
    if not is_step_dependent(denoiser):
        return
    info = denoiser.tfmq_info
    cal = info["sampler"]
    ts = [int(t) for t in timesteps]
    if sampler.get("name") != cal["name"] or sampler.get("steps") != cal["steps"] or \
            ts != [int(t) for t in info["timesteps"]]:
        raise CalibrationMismatchError(
            f"this quantized model was calibrated for {describe_calibration(cal, info['timesteps'])} "
            f"and holds per-step parameters; requested {describe_calibration(sampler, ts)}. "
            f"Sample with --sampler {cal['name']} --steps {cal['steps']}, or quantize again for this sampler")
    steps = step_index_of(denoiser)
    if steps is not None:
        steps.reset()
