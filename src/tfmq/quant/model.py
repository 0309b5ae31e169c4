"""Turn a denoiser into a fake-quantized one (in place) and operate on its quantizers.

``wrap_denoiser`` replaces every Conv2d / Linear chosen by the layer policy with a
:class:`QuantLayer` and gives every Attention the quantizing processor. The same call, with the
same arguments, rebuilds the structure when a checkpoint is loaded.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.adapter import quantizable_layers
from ..policy import get_policy
from .layers import AttentionQuantizers, GroupActQuantizer, QuantAttnProcessor, QuantLayer
from .quantizer import UniformQuantizer


@dataclass
class WrapSpec:
    """Everything that determines the quantized structure of a denoiser."""
    wbits: int
    abits: int
    softmax_bits: int
    layer_policy: str = "tfmq-official"
    weight_symmetric: bool = False
    act_symmetric: bool = False
    n_sets: int = 1                          # activation parameter sets (FSC: one per step)
    per_step_layers: list[str] | None = None # layers whose act quantizers get n_sets (None: all)
    splits: dict[str, int] = field(default_factory=dict)   # layer -> channel of the split


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def wrap_denoiser(denoiser: nn.Module, spec: WrapSpec) -> nn.Module:
    """Insert quantizers into ``denoiser`` in place; returns it. Quantizers start disabled
    ranges-wise (uninitialised) and must be calibrated before use."""
    if getattr(denoiser, "tfmq_spec", None) is not None:
        raise RuntimeError("denoiser is already quantized")
    policy = get_policy(spec.layer_policy)
    quant_w = spec.wbits < 32
    quant_a = spec.abits < 32
    per_step = None if spec.per_step_layers is None else set(spec.per_step_layers)

    def sets(name: str) -> int:
        return spec.n_sets if per_step is None or name in per_step else 1

    for info in quantizable_layers(denoiser):
        device = _device_of(info.module)
        if info.kind == "attention":
            info.module.set_processor(QuantAttnProcessor())
            if quant_a:
                info.module.add_module("tfmq_attn", AttentionQuantizers(
                    spec.abits, spec.softmax_bits, spec.act_symmetric, sets(info.name)).to(device))
            continue
        decision = policy.decide(info.name)
        wq = UniformQuantizer(spec.wbits, spec.weight_symmetric, channel_axis=0) \
            if quant_w and decision.weight else None
        aq = None
        if quant_a and decision.act:
            if info.name in spec.splits:
                aq = GroupActQuantizer(spec.abits, spec.act_symmetric, spec.splits[info.name], sets(info.name))
            else:
                aq = UniformQuantizer(spec.abits, spec.act_symmetric, None, sets(info.name))
        if wq is None and aq is None:
            continue
        _set_submodule(denoiser, info.name, QuantLayer(info.module, wq, aq).to(device))
    denoiser.tfmq_spec = spec
    return denoiser


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Name -> QuantLayer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """Every activation quantizer (layer inputs, attention q/k/v/softmax, split groups) by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantizer) and m.channel_axis is None:
            out[name] = m
    return out


def weight_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    return {n: m.weight_quantizer for n, m in quant_layers(model).items() if m.weight_quantizer is not None}


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Enable / disable weight and activation fake-quant everywhere (None leaves it as is)."""
    if weight is not None:
        for q in weight_quantizers(model).values():
            q.enabled = weight
    if act is not None:
        for q in act_quantizers(model).values():
            q.enabled = act



@contextmanager
def fixed_weights(model: nn.Module):
    """Within the block every quantized layer of ``model`` computes its fake-quantized weight once
    (:meth:`~tfmq.quant.layers.QuantLayer.fixed_weight`): for passes that change no weight,
    rounding or weight quantizer (range observation, caching unit inputs)."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, QuantLayer):
                stack.enter_context(m.fixed_weight())
        yield

@contextmanager
def quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None):
    """Within the block, weight / activation fake-quant are on or off everywhere as asked (None
    leaves them as they are; the block may change them further); on exit every quantizer gets back
    its own flag, whatever happened inside."""
    qs = list(weight_quantizers(model).values()) + list(act_quantizers(model).values())
    saved = [q.enabled for q in qs]
    try:
        set_quant_state(model, weight, act)
        yield
    finally:
        for q, e in zip(qs, saved):
            q.enabled = e


def multi_set_quantizers(model: nn.Module) -> list[UniformQuantizer]:
    """The activation quantizers holding several parameter sets (FSC: one per step)."""
    return [q for q in act_quantizers(model).values() if q.n_sets > 1]


def set_step(model: nn.Module, index: int) -> None:
    """Select parameter set ``index`` of every multi-set (FSC) activation quantizer."""
    for q in multi_set_quantizers(model):
        if not 0 <= index < q.n_sets:
            raise IndexError(f"step index {index} outside the {q.n_sets} calibrated steps")
        q.set_index = index


@contextmanager
def row_steps(model: nn.Module, steps: torch.Tensor | None, check: bool = True):
    """Within the block, every multi-set (FSC) activation quantizer uses parameter set
    ``steps[i]`` for row ``i`` of its input, and the step index of a calibrated model
    (:class:`tfmq.runtime.steps.StepIndex`) is paused. For calibration batches whose rows come
    from several steps. ``steps=None`` changes nothing. ``check=False`` skips the bounds check
    (a host synchronisation when ``steps`` is on a GPU): for callers that checked every row's
    step once beforehand."""
    if steps is None:
        yield
        return
    multi = multi_set_quantizers(model)
    if check and multi and int(steps.max()) >= min(q.n_sets for q in multi):
        raise IndexError(f"step index {int(steps.max())} outside the calibrated steps")
    selector = getattr(model, "tfmq_steps", None)
    saved = [q.set_index for q in multi]
    paused = selector.paused if selector is not None else None
    try:
        if selector is not None:
            selector.paused = True
        for q in multi:
            q.set_index = steps
        yield
    finally:
        for q, i in zip(multi, saved):
            q.set_index = i
        if selector is not None:
            selector.paused = paused


@torch.no_grad()
def freeze(model: nn.Module) -> None:
    """Fix every quantized weight to its integer codes (see :meth:`QuantLayer.freeze`)."""
    for layer in quant_layers(model).values():
        layer.freeze()
