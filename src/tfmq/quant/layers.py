"""Quantized layers: a wrapper that quantizes a Conv2d / Linear weight and its input, and the
attention processor that quantizes the inputs of the two attention matmuls and the softmax output.

The weight path has three states:
  * calibrating: fake-quant of the FP weight on every call (with AdaRound when a rounding module
    is attached);
  * frozen: integer codes are fixed (``freeze()``); the layer's weight is replaced by their
    dequantized value, so the FP weight is gone and a reloaded checkpoint computes exactly the
    same thing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import UniformQuantizer


class GroupActQuantizer(nn.Module):
    """Per-tensor activation quantizer with separate parameters for channel groups.

    Used for Q-Diffusion's split shortcut: the input of an up block's first layers is the
    concatenation of the upsampled feature and the skip feature, whose ranges differ a lot.
    ``split`` is the channel index where the second group starts (dimension 1).
    """

    def __init__(self, bits: int, symmetric: bool, split: int, n_sets: int = 1):
        super().__init__()
        self.split = split
        self.groups = nn.ModuleList(UniformQuantizer(bits, symmetric, None, n_sets) for _ in range(2))

    @property
    def enabled(self) -> bool:
        return self.groups[0].enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for g in self.groups:
            g.enabled = value

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : self.split], x[:, self.split:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(c) for q, c in zip(self.groups, self.chunks(x))], dim=1)


class QuantLayer(nn.Module):
    """Wraps an ``nn.Conv2d`` or ``nn.Linear``: quantizes its weight (per output channel) and its
    input activation (per tensor). Either quantizer may be None (kept in full precision)."""

    def __init__(self, layer: nn.Module, weight_quantizer: UniformQuantizer | None,
                 act_quantizer: nn.Module | None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.rounding: nn.Module | None = None      # AdaRound, attached during reconstruction
        self.frozen = False
        self.register_buffer("weight_codes", None, persistent=False)
        self._fixed_weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    @contextmanager
    def fixed_weight(self):
        """Within the block the fake-quantized weight is computed once (without gradient) and
        reused by every call that quantizes the weight (with the weight quantizer off the layer
        still computes with its FP weight): for passes where the weight, its quantizer and its
        rounding stay fixed (range observation, caching unit inputs, activation step learning).
        A frozen or full-precision weight is left as it is."""
        wq = self.weight_quantizer
        if not self.frozen and wq is not None and wq.scale.numel() > 0:
            with torch.no_grad():
                w = self.layer.weight
                if self.rounding is not None:
                    self._fixed_weight = self.rounding(w, self.weight_quantizer)
                else:
                    scale, zero = self.weight_quantizer.current()
                    self._fixed_weight = self.weight_quantizer.fake_quant(w, scale.to(w.dtype), zero.to(w.dtype))
        try:
            yield self
        finally:
            self._fixed_weight = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (fake-quantized unless frozen or kept FP)."""
        w = self.layer.weight
        if self.frozen or self.weight_quantizer is None or not self.weight_quantizer.enabled:
            return w
        if self._fixed_weight is not None:
            return self._fixed_weight
        if self.rounding is not None:
            return self.rounding(w, self.weight_quantizer)
        return self.weight_quantizer(w)

    def weight_int(self) -> torch.Tensor:
        """Integer codes of the weight as the quantizer (and rounding, if any) decide them."""
        wq = self.weight_quantizer
        if self.rounding is not None:
            return self.rounding.codes(self.layer.weight, wq)
        return wq.to_int(self.layer.weight.float())

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the integer weight codes and replace the FP weight by their dequantized value."""
        if self.frozen or self.weight_quantizer is None:
            self.frozen = True
            return
        codes = self.weight_int()
        w = self.weight_quantizer.dequantize(codes).to(self.layer.weight.dtype)
        self.set_codes(codes.to(torch.int16), w)
        self.rounding = None

    def set_codes(self, codes: torch.Tensor, weight: torch.Tensor) -> None:
        self.weight_codes = codes
        self.layer.weight = nn.Parameter(weight, requires_grad=False)
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        return "frozen" if self.frozen else ""


class AttentionQuantizers(nn.Module):
    """Quantizers of one diffusers ``Attention``: inputs of q·kᵀ (q, k), of softmax·v (the
    softmax output and v). Attached to the Attention module as ``attn.tfmq_attn``."""

    def __init__(self, abits: int, softmax_bits: int, symmetric: bool, n_sets: int = 1):
        super().__init__()
        self.q = UniformQuantizer(abits, symmetric, None, n_sets)
        self.k = UniformQuantizer(abits, symmetric, None, n_sets)
        self.v = UniformQuantizer(abits, symmetric, None, n_sets)
        # softmax output lies in [0, 1]: unsigned grid
        self.softmax = UniformQuantizer(softmax_bits, False, None, n_sets)

    def quantizers(self) -> dict[str, UniformQuantizer]:
        return {"q": self.q, "k": self.k, "v": self.v, "softmax": self.softmax}


class QuantAttnProcessor:
    """Attention processor with explicit matmuls so that their inputs and the softmax output can
    be quantized. Without ``attn.tfmq_attn`` (or with its quantizers disabled) it computes plain
    attention. Mirrors the computation of diffusers' default processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = (hidden_states.shape if encoder_hidden_states is None
                             else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = self.project(attn, hidden_states, encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states, out_dtype = self.attend(attn, query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states.to(out_dtype))
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def project(attn, hidden_states, encoder_hidden_states):
        """The query, key and value projections (keys and values of ``encoder_hidden_states``
        where given: cross-attention)."""
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

    @staticmethod
    def attend(attn, query, key, value, attention_mask):
        """``softmax(q kᵀ * scale + mask) v`` with q, k, v and the probabilities quantized by
        ``attn.tfmq_attn`` (when present). Returns the result and the dtype ``to_out`` reads."""
        quant = getattr(attn, "tfmq_attn", None)
        if quant is not None:
            query, key, value = quant.q(query), quant.k(key), quant.v(value)
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        if quant is not None:
            probs = quant.softmax(probs)
        return torch.matmul(probs, value), query.dtype
