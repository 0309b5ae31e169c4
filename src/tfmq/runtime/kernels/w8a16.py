"""W8A16 convolution on CUDA (Triton): 8-bit weight codes, full-precision (bf16 / fp16) input.

For the layers of a W8A8 model whose input the layer policy keeps in full precision (under
``tfmq-official`` the ``conv1`` of every resnet, the largest convolutions of a UNet): without this
kernel the ``w8a8`` backend expanded their packed codes to a full weight on every call and ran
cuDNN. Here the int8 codes are read by an implicit-GEMM kernel that dequantizes each weight tile in
registers with the reference's own formula, ``(code - zw) * sw`` in float32 cast to the input's
dtype, and multiplies on the tensor cores with float32 accumulation: the reference's numbers up to
the order of the float sums, and no full-precision weight anywhere.

``TFMQ_INT8_AUTOTUNE=0`` and ``TRITON_INTERPRET=1`` apply as in :mod:`tfmq.runtime.kernels.int8`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import int8

__all__ = ["prepare_weight", "w8a16_conv2d", "ref_w8a16_conv2d", "IN_DTYPES"]

#: input (and output) dtypes of the kernel; float32 layers keep the reference path
IN_DTYPES = (torch.bfloat16, torch.float16)

_mod = None


def _kernels():
    global _mod
    int8._kernels()                                   # same requirements, same error
    if _mod is None:
        from . import _w8a16_triton
        _mod = _w8a16_triton
    return _mod


def prepare_weight(w_codes: torch.Tensor, zw, ow: int):
    """``(w_int8, zo)`` from a conv's integer weight codes ``[Cout, Cin, kh, kw]`` (PyTorch layout):
    ``w_int8 = code - ow`` as contiguous ``[Cout, kh, kw, Cin]`` int8 and ``zo = zw - ow`` float32
    ``[Cout]``, so that the weight is ``(w_int8 - zo) * sw``. Checks as
    :func:`tfmq.runtime.kernels.int8.prepare_weight` (once per layer)."""
    if w_codes.dim() != 4:
        raise ValueError(f"w_codes must be [Cout, Cin, kh, kw], got shape {tuple(w_codes.shape)}")
    b, cb, _ = int8.prepare_weight(w_codes, zw, ow)
    return b, (-cb).to(torch.float32).contiguous()


def w8a16_conv2d(x: torch.Tensor, w_int8: torch.Tensor, zo: torch.Tensor, sw: torch.Tensor,
                 bias: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """``conv2d(x, (w_int8 - zo) * sw, bias)`` (groups 1, dilation 1, zero padding).

    ``x``: ``[B, Cin, H, W]`` bf16 / fp16 (channels_last memory is read in place; other layouts
    are copied to it); ``w_int8``, ``zo`` from :func:`prepare_weight`; ``sw`` float32 ``[Cout]``;
    ``bias`` ``[Cout]`` or None. Returns ``[B, Cout, Ho, Wo]`` in ``x.dtype``, channels_last memory.
    The input is gathered with bounds-checked loads (a variant over a zero-padded copy, the int8
    path's layout, measured slower on an H200: 6.08 vs 5.33 ms for the SD UNet's 22 conv1, and was
    removed; benchmarks/results/w8a16/h200_v3_and_padded.txt).
    """
    tm = _kernels()
    if x.dtype not in IN_DTYPES or x.dim() != 4:
        raise ValueError(f"x must be a [B, C, H, W] tensor of dtype {IN_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 4 or not w_int8.is_contiguous():
        raise ValueError(f"w_int8 must be contiguous int8 [Cout, kh, kw, Cin] (prepare_weight), got "
                         f"{w_int8.dtype} {tuple(w_int8.shape)}")
    cout, kh, kw, cin = w_int8.shape
    if x.shape[1] != cin:
        raise ValueError(f"x has {x.shape[1]} channels, the weight {cin}")
    int8._check_channel(zo, cout, "zo", (torch.float32,))
    int8._check_channel(sw, cout, "sw", (torch.float32,))
    if bias is not None:
        int8._check_channel(bias, cout, "bias", int8._OUT_DTYPES)
    int8._check_device(x, w_int8, zo, sw, *([bias] if bias is not None else []))
    sh, sw_ = int8._pair(stride, "stride")
    ph, pw = int8._pair(padding, "padding")
    if sh < 1 or sw_ < 1 or ph < 0 or pw < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    bsz, _, h, w = x.shape
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw_ + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"empty output for input {h}x{w}, kernel {kh}x{kw}, stride {stride}, padding {padding}")
    xn = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)   # NHWC view, no copy if CL
    out = torch.empty((bsz, ho, wo, cout), dtype=x.dtype, device=x.device)
    m = bsz * ho * wo
    if not m:
        return out.permute(0, 3, 1, 2)
    bias_arg = bias if bias is not None else sw
    args = (xn, w_int8, zo, sw, bias_arg, out, bsz, h, w, cin, ho, wo, cout)
    flags = dict(KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw_, PAD_H=ph, PAD_W=pw, HAS_BIAS=bias is not None)
    tuned, raw = tm.w8_conv_tuned, tm.w8_conv
    grid = int8._grid(m, cout, 1)                       # no K split: the second grid axis is 1
    if int8._autotune():
        tuned[grid](*args, **flags)
    else:
        cfg = dict(int8._heuristic(m, cout), BLOCK_K=64)  # the int8 tiles, a bf16 / fp16 K block
        raw[grid(cfg)](*args, **flags, **cfg)
    return out.permute(0, 3, 1, 2)


def ref_w8a16_conv2d(x: torch.Tensor, w_int8: torch.Tensor, zo: torch.Tensor, sw: torch.Tensor,
                     bias: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """The same in PyTorch (any device): the weight dequantized as the reference backend does it."""
    wt = ((w_int8.to(torch.float32) - zo.view(-1, 1, 1, 1)) * sw.view(-1, 1, 1, 1)).to(x.dtype)
    return F.conv2d(x, wt.permute(0, 3, 1, 2), bias, stride, padding)
