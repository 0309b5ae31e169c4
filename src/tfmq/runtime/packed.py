"""Packed integer weights: the codes of a quantized weight as stored in the checkpoint, kept
packed in memory and expanded on the weight's device when a layer runs.

Storage is the checkpoint's (:mod:`tfmq.quant.packing`): a flat uint8 tensor, codes shifted to
start at 0 (``code - qmin``), 8-bit codes one a byte, 4-bit two a byte (low nibble first),
other widths a little-endian bit stream. Per output channel a float32 scale and zero-point.
Dequantization is ``(code - zero) * scale`` in float32, exactly what the fake-quant layer froze.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.packing import packed_nbytes
from .guards import register_frozen


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Codes (``0 .. 2**bits - 1``, uint8) of a packed stream, on ``packed``'s device; tensor
    operations only, so it runs inside compiled code."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed tensor has {packed.numel()} bytes of {packed.dtype}; "
                         f"{packed_nbytes(numel, bits)} uint8 bytes expected for {numel} {bits}-bit codes")
    if bits == 8:
        return packed
    if 8 % bits == 0:                            # 1, 2, 4 bits: whole codes per byte, low first
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel]
    # odd widths straddle bytes: expand to bits, regroup
    bitpos = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[:, None] >> bitpos) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


class PackedWeight(nn.Module):
    """A quantized weight: packed codes + per-output-channel scale / zero-point, no FP copy.

    Tensors (frozen parameters, :func:`~tfmq.runtime.guards.frozen`): ``packed`` (uint8), ``scale``
    and ``zero_point`` (float32, one per output channel).
    ``qmin`` is the grid's lowest code (0 for unsigned grids, ``-2**(bits-1)`` for symmetric
    ones): a stored byte value ``u`` stands for the code ``u + qmin``.
    """

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 shape: tuple[int, ...], bits: int, qmin: int):
        super().__init__()
        numel = math.prod(shape)
        if packed.numel() != packed_nbytes(numel, bits):
            raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} {bits}-bit codes")
        if scale.numel() != shape[0] or zero_point.numel() != shape[0]:
            raise ValueError(f"need one scale / zero-point per output channel ({shape[0]}), got "
                             f"{scale.numel()} / {zero_point.numel()}")
        self.shape = tuple(int(s) for s in shape)
        self.bits = int(bits)
        self.qmin = int(qmin)
        register_frozen(self, "packed", packed.reshape(-1).to(torch.uint8))
        register_frozen(self, "scale", scale.reshape(-1).float())
        register_frozen(self, "zero_point", zero_point.reshape(-1).float())

    @property
    def qmax(self) -> int:
        return self.qmin + (1 << self.bits) - 1

    def codes(self) -> torch.Tensor:
        """The integer codes in the weight's shape (int16, on the buffer's device)."""
        u = unpack_codes(self.packed, self.bits, math.prod(self.shape))
        return (u.to(torch.int16) + self.qmin).reshape(self.shape)

    def _channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((self.shape[0],) + (1,) * (len(self.shape) - 1))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(code - zero) * scale`` computed in float32 (as the frozen fake-quant weight was),
        then cast to ``dtype``."""
        w = (self.codes().float() - self._channel(self.zero_point)) * self._channel(self.scale)
        return w if dtype is None else w.to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, packed={self.packed.numel()} B"
