"""Activation step-size learning (LSQ-like), as Q-Diffusion does after weight reconstruction.

Per reconstruction unit, in network order, with the weights at their learned (hard) rounding:
the scales of the unit's activation quantizers (layer inputs, split-shortcut groups, attention
q / k / v / softmax) become trainable, zero-points stay fixed, and Adam with a cosine-decaying
learning rate minimises the unit's output error against the FP network, inputs taken from the
quantized network with activation quantization on. Gradients reach the scales through the
straight-through rounding of :class:`~tfmq.quant.quantizer.UniformQuantizer` (the LSQ gradient).

Settings (``QuantConfig``): ``act_learn_iters`` (project default 500; the reference uses 5,000),
``act_learn_lr`` (4e-4, the reference's), ``act_learn_p`` (loss exponent, 2.4 as the reference's
``--cali_p``), batch size / rows / units shared with weight reconstruction. ``act_learn_iters=0``
skips the pass. Multi-set (per-step, FSC) quantizers are not learned here; they stay as FSC set
them, and the unit forwards quantize each calibration row with its own step's set (so in tfmq
with ``fsc='tib'`` every quantizer but the temporal block's is learned, with ``fsc='all'`` none).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..models.units import Unit
from ..quant.quantizer import UniformQuantizer
from .reconstruction import UnitSettings, UnitWork, _batch_loss, _check_bf16, prepare_units, run_units

MIN_SCALE = 1e-8


def learn_act_steps(quantizers: list[UniformQuantizer], loss_fn, iters: int, lr: float = 4e-4,
                    desc: str = "act steps", progress: bool = True, data_parallel: bool = False) -> dict:
    """Learn the scales of ``quantizers`` with Adam (cosine decay of ``lr`` to 0 over ``iters``)
    minimising ``loss_fn(iteration)``. Scales are kept positive. Returns the first / last loss.

    ``data_parallel`` (under several processes): ``loss_fn`` gives this rank's share of the batch
    loss and the scales' gradients are summed over the ranks before each step."""
    for q in quantizers:
        if q.n_sets > 1:
            raise ValueError("activation step learning handles one parameter set per quantizer; "
                             "per-step (FSC) quantizers are calibrated by their own stage")
        if q.scale.numel() == 0 or not bool(q.initialized.all()):
            raise RuntimeError("activation ranges must be initialised before step-size learning")
    stats = {"iters": iters, "initial_loss": None, "final_loss": None}
    if iters <= 0 or not quantizers:
        return stats
    params = [q.scale for q in quantizers]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    shown = max(1, iters // 100)
    bar = tqdm(range(iters), desc=desc, disable=not progress, leave=False)
    split = data_parallel and distributed.is_distributed()
    try:
        for it in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(it)
            if loss.requires_grad or not split:     # a rank without rows this time has no graph
                loss.backward()
            if split:
                distributed.sync_grads_(params)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(min=MIN_SCALE)
            if it == 0:
                stats["initial_loss"] = _batch_loss(loss, split)
            if it == iters - 1:
                stats["final_loss"] = _batch_loss(loss, split)
            elif it % shown == 0 and progress:
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return stats


class ActStepLearning(UnitWork):
    """Per-unit pass learning the activation scales."""
    phase = "act"
    quant_state = (True, True)

    def quantizers(self, unit: Unit) -> dict[str, UniformQuantizer]:
        return {n: q for n, q in unit.act_quantizers().items()
                if q.enabled and q.n_sets == 1 and q.scale.numel() > 0}

    def applies(self, unit):
        return bool(self.quantizers(unit))

    def run(self, unit, loss_fn, settings):
        return learn_act_steps(list(self.quantizers(unit).values()), loss_fn, settings.iters,
                               settings.lr, desc=unit.name, progress=settings.progress, data_parallel=True)

    def state(self, unit):
        return {f"{n}.scale": q.scale.detach().clone() for n, q in self.quantizers(unit).items()}

    def restore(self, unit, tensors):
        for n, q in self.quantizers(unit).items():
            key = f"{n}.scale"
            if key not in tensors:
                raise RuntimeError(f"saved progress of unit {unit.name} lacks {key}")
            q.scale.data = tensors[key].to(q.scale.device, q.scale.dtype)


def learn_activation_steps(ctx) -> dict[str, dict]:
    """Recipe stage: activation step-size learning over the selected units (after weight
    reconstruction and activation range initialisation). Per-unit results go to
    ``tfmq_info["act_learning"]``."""
    c = ctx.config
    if c.abits >= 32 or c.act_learn_iters <= 0:
        return {}
    _check_bf16(ctx)
    units, rows = prepare_units(ctx)
    settings = UnitSettings(c.act_learn_iters, c.recon_batch_size, c.act_learn_lr, c.seed,
                            c.recon_bf16, c.recon_cache_gb, c.act_learn_p, ctx.progress)
    results = run_units(ctx.denoiser, units, rows, ActStepLearning(), settings, ctx.store, ctx.timer,
                        "act_learning", ctx.on_unit)
    ctx.extra.setdefault("tfmq_info", {})["act_learning"] = results
    return results
