"""Bit packing of integer codes for the compact checkpoint.

Codes of ``b`` bits (``2 <= b <= 8``) are stored as a little-endian bit stream in a uint8
tensor: 8 bits -> one code a byte; 4 bits -> two codes a byte (low nibble first); 2 bits -> four;
odd widths (3, 5, 6, 7) straddle byte boundaries. ``ceil(n * b / 8)`` bytes for ``n`` codes.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # codes per chunk: bounds the temporary bit matrix to a few tens of MB


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes ``< 2**bits`` into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    out = torch.zeros(packed_nbytes(flat.numel(), bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (2 ** torch.arange(8, dtype=torch.int64))
    # chunks are multiples of 8 codes, so each chunk ends on a byte boundary
    step = _CHUNK - _CHUNK % 8
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        bitmat = ((chunk[:, None] >> shifts) & 1).reshape(-1)
        pad = (-bitmat.numel()) % 8
        if pad:
            bitmat = torch.cat([bitmat, bitmat.new_zeros(pad)])
        packed = (bitmat.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)
        b0 = start * bits // 8
        out[b0:b0 + packed.numel()] = packed
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as an int64 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only unpack 1..8-bit codes, got {bits}")
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed tensor has {packed.numel()} bytes of {packed.dtype}; "
                         f"{packed_nbytes(numel, bits)} uint8 bytes expected for {numel} {bits}-bit codes")
    data = packed.reshape(-1).to(torch.int64).cpu()
    if bits == 8:
        return data
    bitpos = torch.arange(8, dtype=torch.int64)
    weights = 2 ** torch.arange(bits, dtype=torch.int64)
    out = torch.empty(numel, dtype=torch.int64)
    step = _CHUNK - _CHUNK % 8
    for start in range(0, numel, step):
        n = min(step, numel - start)
        b0, b1 = start * bits // 8, packed_nbytes(start + n, bits)
        bitstream = ((data[b0:b1, None] >> bitpos) & 1).reshape(-1)[: n * bits]
        out[start:start + n] = (bitstream.reshape(n, bits) * weights).sum(dim=1)
    return out
