"""The W8A8 kernels as PyTorch custom operators, for compiled graphs.

``torch.compile`` traces a plain call of a user Triton kernel into its own generated code, and
Inductor's handling of ``triton.autotune`` keys there has been unreliable (in torch releases
before the fix of pytorch/pytorch#164124, a keyed user autotuner kept ONE configuration for
every shape the graph launches it with). Registered as custom operators (``torch.library``),
the GEMMs are opaque calls inside the graph: Inductor fuses everything around them (the
activation quantizers into their producers) and calls them as they are, so each launch goes
through Triton's own per-shape autotuner, exactly as in eager mode, and the graph still
captures in a CUDA graph.

``tfmq::int8_linear`` and ``tfmq::int8_conv2d_padded`` compute what
:func:`~tfmq.runtime.kernels.int8.int8_linear` and ``int8_conv2d(..., padded=True)`` compute,
``tfmq::quant_attention`` what :func:`~tfmq.runtime.kernels.attention.quant_attention` computes; the
fake (meta) implementations give the same shapes, dtypes and strides.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import attention, int8

if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"compiling a w8a8 denoiser needs torch >= 2.4 (torch.library.custom_op); this is torch "
                      f"{torch.__version__}: upgrade torch, or run the w8a8 backend uncompiled")


@torch.library.custom_op("tfmq::int8_linear", mutates_args=())
def int8_linear(a: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, ca: torch.Tensor, sw: torch.Tensor,
                cb: Optional[torch.Tensor], bsum: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                asum: Optional[torch.Tensor], step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`tfmq.runtime.kernels.int8.int8_linear` with precomputed row sums ``asum`` (None with
    ``cb=None``, symmetric weights), and, with ``step``, per-step ``sx`` / ``ca`` tables read in
    the kernel."""
    return int8.int8_linear(a, w, sx, ca, sw, cb, bsum, bias, out_dtype, asum=asum, step=step)


@int8_linear.register_fake
def _int8_linear_fake(a, w, sx, ca, sw, cb, bsum, bias, out_dtype, asum, step=None):
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("tfmq::int8_conv2d_padded", mutates_args=())
def int8_conv2d_padded(a: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                       sx: torch.Tensor, ca: torch.Tensor, sw: torch.Tensor, cb: Optional[torch.Tensor],
                       bsum: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                       asum: Optional[torch.Tensor], step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``int8_conv2d(..., padded=True)``: ``a`` and ``asum`` from
    ``quantize_act(x, ..., nhwc=True, return_sums=True, pad=padding)`` (no sums: ``asum`` and
    ``cb`` None, symmetric weights)."""
    return int8.int8_conv2d(a, w, tuple(stride), tuple(padding), sx, ca, sw, cb, bsum, bias, out_dtype,
                            asum=asum, padded=True, step=step)


@int8_conv2d_padded.register_fake
def _int8_conv2d_padded_fake(a, w, stride, padding, sx, ca, sw, cb, bsum, bias, out_dtype, asum, step=None):
    bsz, hp, wp, _ = a.shape                       # already padded by ``padding``
    cout, kh, kw, _ = w.shape
    ho = (hp - kh) // stride[0] + 1
    wo = (wp - kw) // stride[1] + 1
    return a.new_empty((bsz, ho, wo, cout), dtype=out_dtype).permute(0, 3, 1, 2)   # channels_last


@torch.library.custom_op("tfmq::quant_attention", mutates_args=())
def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, scale_tab: torch.Tensor,
                    zero_tab: torch.Tensor, qmin: int, qmax: int, step: Optional[torch.Tensor],
                    upcast_scores: bool, qkv: Sequence[torch.Tensor], amin: int, amax: int) -> torch.Tensor:
    """:func:`tfmq.runtime.kernels.attention.quant_attention`: attention whose probabilities (and,
    with the six ``qkv`` tables, its inputs; empty: inputs already rounded) are rounded to their
    calibrated grids, one fused kernel."""
    return attention.quant_attention(q, k, v, scale, scale_tab, zero_tab, qmin, qmax, step, upcast_scores,
                                     qkv, amin, amax)


@quant_attention.register_fake
def _quant_attention_fake(q, k, v, scale, scale_tab, zero_tab, qmin, qmax, step, upcast_scores, qkv, amin, amax):
    bsz, heads, nq, _ = q.shape
    return q.new_empty((bsz, nq, heads, v.shape[-1])).permute(0, 2, 1, 3)
