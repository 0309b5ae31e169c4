"""AdaRound: learned rounding of a quantized weight (Nagel et al., 2020).

Instead of rounding ``w / s`` to the nearest integer, every weight gets a continuous variable
``alpha`` and is rounded *down* plus ``h(alpha)`` in [0, 1], where ``h`` is the rectified
sigmoid ``clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` with ``zeta = 1.1`` and
``gamma = -0.1``. ``alpha`` starts where ``h(alpha)`` equals the fractional part of ``w / s``,
so the soft-rounded weight initially equals the FP weight (before clamping to the grid). A
regulariser ``sum(1 - |2 h - 1|^beta)`` pushes every ``h`` to 0 or 1 as ``beta`` anneals; at the
end rounding is hard: up where ``alpha >= 0``, down elsewhere.

The module is attached to a :class:`tfmq.quant.layers.QuantLayer` as ``layer.rounding``; the
layer calls ``rounding(weight, weight_quantizer)`` for its fake-quantized weight and
``rounding.codes(weight, weight_quantizer)`` when it freezes its integer codes. The weight
quantizer's scale and zero-point stay fixed: only ``alpha`` is learned.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from . import fused

ZETA = 1.1
GAMMA = -0.1

def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``alpha`` with ``h(alpha) = h`` for ``h`` in [0, 1) (finite everywhere on that range)."""
    p = (h - GAMMA) / (ZETA - GAMMA)          # in [1/12, 11/12) for h in [0, 1)
    return torch.log(p) - torch.log1p(-p)


class AdaRound(nn.Module):
    """Learned rounding of one weight tensor on its (per-channel) quantizer grid.

    Args:
        weight: the FP weight the rounding is learned for.
        quantizer: its :class:`~tfmq.quant.quantizer.UniformQuantizer` (ranges already set).

    Attributes:
        alpha: the learned variable, same shape as ``weight``.
        hard: when True, rounding is hard (``alpha >= 0`` rounds up) in ``forward`` too.
    """

    def __init__(self, weight: torch.Tensor, quantizer):
        super().__init__()
        if quantizer.scale.numel() == 0:
            raise RuntimeError("AdaRound needs a weight quantizer whose range is initialised")
        scale, _ = quantizer.current()
        x = weight.detach().float() / scale.float()
        frac = x - torch.floor(x)
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(frac))
        self.hard = False
        self._fixed = None      # (floor(w / s), s, z) while the weight and its grid are fixed

    @contextmanager
    def fixed_grid(self, weight: torch.Tensor, quantizer):
        """Within the block, ``floor(w / s)``, the scale and the zero-point are computed once
        instead of on every call (the weight and its quantizer must not change meanwhile; the
        results are the same as without it). Used by the optimisation loops."""
        scale, zero = quantizer.current()
        scale, zero = scale.detach().float(), zero.detach().float()
        self._fixed = (torch.floor(weight.detach().float() / scale), scale, zero)
        try:
            yield self
        finally:
            self._fixed = None

    def h(self) -> torch.Tensor:
        """The soft rounding offsets ``h(alpha)`` in [0, 1]."""
        return rectified_sigmoid(self.alpha)

    def offsets(self) -> torch.Tensor:
        """0/1 (hard) or the soft offsets, depending on ``self.hard``."""
        return (self.alpha >= 0).to(self.alpha.dtype) if self.hard else self.h()

    def _grid(self, weight: torch.Tensor, quantizer, offsets: torch.Tensor):
        if self._fixed is not None:
            w_floor, scale, zero = self._fixed
        else:
            scale, zero = quantizer.current()
            scale, zero = scale.detach().float(), zero.detach().float()
            w_floor = torch.floor(weight.detach().float() / scale)
        q = torch.clamp(w_floor + offsets + zero, quantizer.qmin, quantizer.qmax)
        return q, scale, zero

    def forward(self, weight: torch.Tensor, quantizer) -> torch.Tensor:
        """The fake-quantized weight (differentiable in ``alpha`` while soft)."""
        if self._fixed is not None and not self.hard and fused.applies(self.alpha):
            w_floor, scale, zero = self._fixed
            w = fused.soft_weight(self.alpha, w_floor, scale, zero, quantizer.qmin, quantizer.qmax, ZETA, GAMMA)
            return w.to(weight.dtype)
        q, scale, zero = self._grid(weight, quantizer, self.offsets())
        return ((q - zero) * scale).to(weight.dtype)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor, quantizer) -> torch.Tensor:
        """Integer codes (a float tensor of integers in ``[qmin, qmax]``) with hard rounding."""
        up = (self.alpha >= 0).float()
        q, _, _ = self._grid(weight, quantizer, up)
        return q

    def regularizer(self, beta: float | torch.Tensor) -> torch.Tensor:
        """``sum(1 - |2 h(alpha) - 1|^beta)``: zero only when every offset is exactly 0 or 1.
        ``beta`` may be a 0-d tensor (the loops' schedule on the device)."""
        if fused.applies(self.alpha) and isinstance(beta, torch.Tensor):
            return fused.regularizer(self.alpha, beta, ZETA, GAMMA)
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def set_hard_offsets(self, up: torch.Tensor) -> None:
        """Restore a hard rounding decision (``up``: bool per weight); used when resuming."""
        if up.shape != self.alpha.shape:
            raise ValueError(f"rounding state of shape {tuple(up.shape)} does not match the weight "
                             f"{tuple(self.alpha.shape)}")
        self.alpha.copy_(torch.where(up.to(self.alpha.device), 1.0, -1.0))
        self.hard = True

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, hard={self.hard}"


# ---- compact storage of hard rounding decisions (resume) ---------------------------------
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as packed bits (uint8, 8 values a byte)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().astype(np.uint8).ravel()))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy())[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
