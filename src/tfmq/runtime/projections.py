"""Attention projections that read one input, run as one W8A8 GEMM (the ``w8a8`` backend).

A self-attention's query, key and value projections (a cross-attention's key and value) read the
same tensor. Where their input quantizers also hold the same calibrated grid (min-max / MSE
calibration observes the same data for all of them, so they agree; learned steps may not), the
tensor is quantized once and multiplied by their int8 weights concatenated along the output
channels: one quantize pass and one GEMM launch instead of three, on a wider output. Every output
element has the integer product and the epilogue it has in its own layer's GEMM, so the results
are the same bit for bit. The layers' own kernel tables become views of the concatenated ones (no
extra memory), so each layer still runs alone too.
"""

from __future__ import annotations

import torch
from torch import nn

from .guards import frozen
from .layers import QuantizedLinear


class FusedProjections:
    """The int8 tables of several :class:`QuantizedLinear` layers with one input grid, concatenated
    along the output channels; calling it returns each layer's output (views of one tensor).

    Not an ``nn.Module``: its tensors, like every backend table, are not part of the model's
    state (a checkpoint never holds them)."""

    def __init__(self, kind: str, names: list[str], layers: list[QuantizedLinear], backend):
        self.kind = kind                      # "qkv" (self-attention) or "kv" (cross-attention)
        self.names = list(names)
        self.sizes = [layer.qweight.shape[0] for layer in layers]
        self.backend = backend
        self.act = layers[0].act
        self.ca = layers[0].prepared["ca"][0]
        parts = [layer.prepared["parts"][0] for layer in layers]
        self.w8 = frozen(torch.cat([p[0] for p in parts]))
        cbs = [p[1] for p in parts]
        self.cb = None if all(c is None for c in cbs) else frozen(torch.cat(
            [torch.zeros_like(p[2]) if c is None else c for c, p in zip(cbs, parts)]))
        self.bsum = frozen(torch.cat([p[2] for p in parts]))
        self.sw = frozen(torch.cat([layer.qweight.scale for layer in layers]))
        biases = [layer.bias for layer in layers]
        self.bias = None if all(b is None for b in biases) else frozen(torch.cat(
            [torch.zeros(n, dtype=layers[0].dtype, device=self.w8.device) if b is None else b.detach()
             for b, n in zip(biases, self.sizes)]))
        # the layers' own tables as views of the concatenated ones
        start = 0
        for layer, n in zip(layers, self.sizes):
            rows = slice(start, start + n)
            layer.prepared["parts"] = [(frozen(self.w8[rows]), None if self.cb is None else frozen(self.cb[rows]),
                                        frozen(self.bsum[rows]))]
            start += n

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.backend.int8_product(self.act, x, self.w8, self.cb, self.bsum, self.ca, self.sw, self.bias,
                                      x.dtype)
        return list(y.split(self.sizes, dim=-1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w8, self.cb, self.bsum, self.sw, self.bias)
                   if t is not None)


def _same_grid(layers: list, backend) -> bool:
    """All int8 linears of one input quantizer each (no split), with identical grids: bits, range,
    scale and zero-point (per-step tables included), step index and dtype."""
    if not all(isinstance(m, QuantizedLinear) and backend._int8(m) and "parts" in m.prepared
               and len(backend._act_groups(m)) == 1 for m in layers):
        return False
    a0 = layers[0].act
    for m in layers[1:]:
        a = m.act
        if (a.bits, a.qmin, a.qmax, m.dtype) != (a0.bits, a0.qmin, a0.qmax, layers[0].dtype) \
                or a.step_index is not a0.step_index or a.scale.shape != a0.scale.shape \
                or not torch.equal(a.scale, a0.scale) or not torch.equal(a.zero_point, a0.zero_point):
            return False
    return True


def fuse_attention_projections(denoiser: nn.Module, backend) -> int:
    """Give every attention of ``denoiser`` (layers prepared by the ``w8a8`` backend) whose
    projections of one input share an input grid a :class:`FusedProjections`
    (``attn._tfmq_fused``); returns how many were fused."""
    from diffusers.models.attention_processor import Attention
    count = 0
    for name, attn in denoiser.named_modules():
        if not isinstance(attn, Attention):
            continue
        attn._tfmq_fused = None
        kind, names = ("kv", ["to_k", "to_v"]) if attn.is_cross_attention else ("qkv", ["to_q", "to_k", "to_v"])
        layers = [getattr(attn, n, None) for n in names]
        if _same_grid(layers, backend):
            attn._tfmq_fused = FusedProjections(kind, [f"{name}.{n}" for n in names], layers, backend)
            count += 1
    return count


def unfuse_attention_projections(denoiser: nn.Module) -> None:
    """Drop the fused projections (another backend is about to prepare the layers)."""
    for m in denoiser.modules():
        if getattr(m, "_tfmq_fused", None) is not None:
            m._tfmq_fused = None
