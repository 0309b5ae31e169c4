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

from tqdm.auto import tqdm

from .. import distributed
from ..models.units import Unit
from ..quant.model import fixed_weights
from ..quant.quantizer import UniformQuantizer
from .loop import StepLoop, cosine_lr_table, run_steps, use_graphs
from .reconstruction import (UnitSettings, UnitWork, _check_bf16, graph_setting, loop_losses,
                             prepare_units, run_units, sum_grads_over_ranks)

MIN_SCALE = 1e-8


def learn_act_steps(quantizers: list[UniformQuantizer], loss_fn, iters: int, lr: float = 4e-4,
                    desc: str = "act steps", progress: bool = True, graphs: bool | None = False,
                    data_parallel: bool = False) -> dict:
    """Learn the scales of ``quantizers`` with Adam (cosine decay of ``lr`` to 0 over ``iters``)
    minimising ``loss_fn(it)``. Scales are kept positive. Returns the first / last loss and
    ``loop`` (graph or eager).

    ``loss_fn(it)`` gets the iteration as a 0-d long tensor on the scales' device; the loop is
    :mod:`tfmq.calib.loop`'s (no host synchronisation; with ``graphs=True``, or None on CUDA,
    captured in a CUDA graph, so ``loss_fn`` must then compute from device tensors only).

    ``data_parallel`` (under several processes, :mod:`tfmq.distributed`): ``loss_fn`` gives this
    rank's share of the batch loss and the scales' gradients are summed over the ranks before each
    step (``loop``: ``... (data-parallel)``) and the losses reported are the ranks' sums."""
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
    split = data_parallel and distributed.is_distributed()
    captured = use_graphs(graphs, params[0].device)  # "rows" sets graphs=False; "batch" captures NCCL
    for p in params:
        p.requires_grad_(True)

    def clamp():
        for p in params:
            p.clamp_(min=MIN_SCALE)

    def step_loss(it):
        loss = loss_fn(it)
        return loss, loss

    bar = tqdm(total=iters, desc=desc, disable=not progress, leave=False)
    try:
        loop = StepLoop(params, step_loss, cosine_lr_table(lr, iters), after_step=clamp,
                        grad_hook=sum_grads_over_ranks if split else None)
        stats["loop"] = run_steps(loop, captured, lambda n: bar.update(n - bar.n),
                                  report_every=max(1, iters // 100))
        stats["initial_loss"], stats["final_loss"] = loop_losses(loop, split)   # one synchronisation
        if split:
            stats["loop"] = f"{stats['loop']} (data-parallel)"
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
        with fixed_weights(unit.module):        # the weights stay as reconstruction left them
            return learn_act_steps(list(self.quantizers(unit).values()), loss_fn, settings.iters,
                                   settings.lr, desc=unit.name, progress=settings.progress,
                                   graphs=settings.graphs, data_parallel=settings.data_parallel)

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
                            c.recon_bf16, c.recon_cache_gb, c.act_learn_p, ctx.progress, graph_setting(c),
                            parallel=c.recon_parallel)
    results = run_units(ctx.denoiser, units, rows, ActStepLearning(), settings, ctx.store, ctx.timer,
                        "act_learning", ctx.on_unit)
    ctx.info["act_learning"] = results
    return results
