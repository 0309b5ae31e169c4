"""Range calibration: weight ranges from the weights, activation ranges from calibration data.

Activation ranges are observed with forward pre-hooks on the activation quantizers while the
calibration data run through the (weight-quantized) denoiser with activation quantization off.
Each observer keeps the exact min / max and a seeded random subsample of the values; ``minmax``
uses the former (or their EMA, Q-Diffusion's running statistics), ``mse`` and ``percentile``
the subsample (with the exact extremes added).

With ``per_step=True`` every multi-set quantizer gets one parameter set per sampling step
(finite set calibration, FSC); otherwise one set for all steps.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapter import call_denoiser
from ..quant.model import act_quantizers, set_quant_state, weight_quantizers
from ..quant.quantizer import UniformQuantizer, init_range
from .data import CalibrationData

SAMPLE_PER_CALL = 2048       # values kept from each observed tensor
SAMPLE_CAP = 1 << 17         # values kept per observer in total


class Observer:
    """Running statistics of one activation quantizer's input.

    Everything stays on the input's device until :meth:`apply` (one host synchronisation per
    quantizer, not one per observed call); the sample positions come from the CPU generator as
    before (sent without waiting), so the values kept are the same as those of a CPU-side
    observer."""

    def __init__(self, generator: torch.Generator, ema: float | None = None):
        self.lo = None
        self.hi = None
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.gen = generator
        self.ema = ema

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.ema is not None:
            self.lo = self.ema * self.lo + (1 - self.ema) * lo
            self.hi = self.ema * self.hi + (1 - self.ema) * hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if self.kept < SAMPLE_CAP:
            flat = x.reshape(-1)
            idx = torch.randint(0, flat.numel(), (min(SAMPLE_PER_CALL, flat.numel()),),
                                generator=self.gen).to(flat.device, non_blocking=True)
            self.samples.append(torch.cat([flat[idx], lo.reshape(1), hi.reshape(1)]))
            self.kept += self.samples[-1].numel()

    def apply(self, quantizer: UniformQuantizer, method: str, set_index: int | None) -> None:
        if self.lo is None:
            raise RuntimeError("an activation quantizer saw no data during calibration")
        like = torch.zeros(1)
        if method == "minmax":
            quantizer.set_range(self.lo.cpu().reshape(1), self.hi.cpu().reshape(1), like, set_index=set_index)
        else:
            init_range(quantizer, torch.cat(self.samples).cpu(), method, set_index=set_index)


@torch.no_grad()
def init_weight_ranges(model: nn.Module, method: str = "mse", progress: bool = True) -> None:
    """Per-output-channel weight ranges of every quantized layer."""
    items = list(weight_quantizers(model).items())
    layers = dict(model.named_modules())
    for name, q in tqdm(items, desc="weight ranges", disable=not progress, leave=False):
        init_range(q, layers[name].weight, method)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    call_denoiser(model, batch)


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: CalibrationData, method: str = "mse",
                          per_step: bool = False, rows_per_step: int | None = None,
                          batch_size: int = 64, ema: float | None = None, seed: int = 0,
                          steps: list[int] | None = None, progress: bool = True,
                          only: dict[str, UniformQuantizer] | None = None) -> None:
    """Set activation quantizer ranges from calibration data.

    Args:
        method: ``minmax``, ``mse`` or ``percentile``.
        per_step: one parameter set per step for quantizers that have several (FSC).
        rows_per_step: rows used from each step (all by default).
        ema: momentum of running min / max (Q-Diffusion's ``--running_stat``), None = exact.
        steps: which step indices to use (all by default).
        only: restrict to these quantizers (by name); others are left untouched.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    quantizers = only if only is not None else act_quantizers(model)
    if not quantizers:
        return
    steps = list(range(len(data))) if steps is None else steps
    gen = torch.Generator().manual_seed(seed)
    groups = [[s] for s in steps] if per_step else [steps]
    all_act = act_quantizers(model)
    prev = {n: q.enabled for n, q in all_act.items()}
    set_quant_state(model, act=False)
    try:
        for group in tqdm(groups, desc="activation ranges", disable=not progress, leave=False):
            observers = {n: Observer(gen, ema) for n in quantizers}
            hooks = [q.register_forward_pre_hook(lambda m, a, o=observers[n]: o.update(a[0]))
                     for n, q in quantizers.items()]
            try:
                for s in group:
                    d = data.batch([s], rows_per_step, gen)
                    for i in range(0, d["sample"].shape[0], batch_size):
                        b = {k: (v[i:i + batch_size].to(device) if v.dtype == torch.long
                                 else v[i:i + batch_size].to(device, dtype)) for k, v in d.items()}
                        _forward(model, b)
            finally:
                for h in hooks:
                    h.remove()
            for n, q in quantizers.items():
                set_index = group[0] if (per_step and q.n_sets > 1) else None
                observers[n].apply(q, method, set_index)
    finally:
        for n, q in all_act.items():
            q.enabled = prev[n]
