"""Attention with probabilities rounded to a static grid, in one fused kernel (Triton; CUDA, or
Triton's CPU interpreter when ``TRITON_INTERPRET=1``), and its reference.

TFMQ, Q-Diffusion and the naive baseline quantize the attention probabilities (the softmax output)
with ``softmax_bits`` (by default the activation bits). Below 16 bits the probabilities cannot be
left to a flash-attention kernel, so the explicit computation writes the score matrix and the
probability matrix to memory (``[batch * heads, tokens, tokens]`` each). :func:`quant_attention`
computes the same thing without writing either: see :mod:`._attention_triton`.

Conventions: ``q`` ``[B, H, Nq, D]``, ``k`` ``[B, H, Nk, D]``, ``v`` ``[B, H, Nk, Dv]`` (any
strides with the last dimension contiguous; q, k, v rounded to their own grids already, or by the
kernel given their tables), one
dtype for all three (float16, bfloat16 or float32); the softmax grid's ``scale`` / ``zero_point``
are float32 ``[n_sets]`` tables, read at the 0-d long ``step`` tensor on the device (the
denoiser's step index) or at 0 without one. The result is ``[B, H, Nq, Dv]``, a view of a
``[B, Nq, H, Dv]`` buffer (what the attention's output projection reads after its transpose).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import int8

__all__ = ["quant_attention", "ref_quant_attention", "supports", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256          # q / k / v tiles of one block of rows stay in registers up to here
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`quant_attention` takes these inputs (dtype, rank, head dims <= 256)."""
    return (q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == v.dim() == 4
            and q.shape[-1] == k.shape[-1] and k.shape[:-1] == v.shape[:-1] and q.shape[:2] == k.shape[:2]
            and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM)


def _check_grid(lo, hi, what: str) -> None:
    if not (isinstance(lo, int) and isinstance(hi, int) and lo < hi and hi - lo <= 65535):
        raise ValueError(f"quant_attention: bad {what} grid [{lo!r}, {hi!r}]")


def _check_qkv(qkv, scale_tab, amin, amax):
    if len(qkv) != 6:
        raise ValueError(f"quant_attention: qkv takes 6 tables (q scale, q zero-point, k scale, k zero-point, "
                         f"v scale, v zero-point), got {len(qkv)}")
    for t in qkv:
        if t.dtype != torch.float32 or t.shape != scale_tab.shape or t.device != scale_tab.device:
            raise ValueError(f"quant_attention: each q / k / v table must be float32 of the softmax table's "
                             f"shape {tuple(scale_tab.shape)} on its device, got {tuple(t.shape)} {t.dtype}")
    _check_grid(amin, amax, "q / k / v")


def _check(q, k, v, scale_tab, zero_tab, qmin, qmax, step):
    if not supports(q, k, v):
        raise ValueError(f"quant_attention takes q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] of one "
                         f"float dtype with D, Dv <= {MAX_HEAD_DIM}; got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if not (q.device == k.device == v.device == scale_tab.device == zero_tab.device):
        raise ValueError("quant_attention: q, k, v and the softmax grid tables must be on one device")
    for t, name in ((scale_tab, "scale"), (zero_tab, "zero_point")):
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"quant_attention: the softmax {name} must be a 1-d float32 table, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if scale_tab.shape != zero_tab.shape:
        raise ValueError("quant_attention: scale and zero_point tables differ in length")
    _check_grid(qmin, qmax, "softmax")
    if step is not None and (step.dtype != torch.long or step.numel() != 1 or step.device != q.device):
        raise ValueError("quant_attention: step must be a one-element long tensor on the inputs' device")
    if step is None and scale_tab.numel() != 1:
        raise ValueError(f"quant_attention: {scale_tab.numel()} softmax parameter sets need a step tensor")


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, scale_tab: torch.Tensor,
                    zero_tab: torch.Tensor, qmin: int, qmax: int, step: Optional[torch.Tensor] = None,
                    upcast_scores: bool = False, qkv: Optional[Sequence[torch.Tensor]] = None,
                    amin: int = 0, amax: int = 255) -> torch.Tensor:
    """``(clamp(round(p / s) + z, qmin, qmax) - z) * s`` applied to ``p = softmax(q kᵀ * scale)``,
    times ``v``, with ``s`` / ``z`` the tables' entries at ``step``: the explicit computation of
    :func:`ref_quant_attention` (in the inputs' dtype, step by step; the scores in float32 with
    ``upcast_scores``, as diffusers' ``upcast_attention``) without the score and probability
    matrices in memory. With ``qkv`` (six tables like the softmax's: q scale, q zero-point, k ...,
    v ...; None or empty: they arrive rounded) q, k and v are first rounded to their grids
    ``[amin, amax]`` inside the kernel. No host synchronisation (capturable in CUDA graphs)."""
    int8._kernels()                        # the device check and its error
    from . import _attention_triton as ta
    _check(q, k, v, scale_tab, zero_tab, qmin, qmax, step)
    qkv = list(qkv) if qkv else None
    if qkv is not None:
        _check_qkv(qkv, scale_tab, amin, amax)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bsz, heads, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    out = torch.empty((bsz, nq, heads, dv), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    bd, bdv = max(16, int8.triton_next_pow2(d)), max(16, int8.triton_next_pow2(dv))   # tl.dot: >= 16
    args = (q, k, v, out, scale_tab, zero_tab, step if step is not None else scale_tab,
            *(qkv if qkv is not None else (scale_tab,) * 6),
            *(t.stride(i) for t in (q, k, v, out) for i in range(3)),
            heads, nq, nk, d, dv, float(scale))
    flags = dict(QMIN=qmin, QMAX=qmax, HAS_SEL=step is not None, ROUND_QKV=qkv is not None, AMIN=amin, AMAX=amax,
                 ROUND_IO=q.dtype != torch.float32,
                 ROUND_S=q.dtype != torch.float32 and not upcast_scores, IEEE=q.dtype == torch.float32,
                 BLOCK_D=bd, BLOCK_DV=bdv)
    if int8._autotune():                   # per shape, timed at the first call (before any graph capture)
        ta.quant_attention_tuned[lambda meta: (int8.triton_next_cdiv(nq, meta["BLOCK_M"]), bsz * heads)](
            *args, **flags)
    else:
        bm = 64 if max(bd, bdv) <= 128 else 32
        bn = 64 if bd <= 64 else 32
        ta._quant_attention_kernel[(int8.triton_next_cdiv(nq, bm), bsz * heads)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out


def ref_quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, scale_tab: torch.Tensor,
                        zero_tab: torch.Tensor, qmin: int, qmax: int, step: Optional[torch.Tensor] = None,
                        upcast_scores: bool = False, qkv: Optional[Sequence[torch.Tensor]] = None,
                        amin: int = 0, amax: int = 255) -> torch.Tensor:
    """What :func:`quant_attention` computes, as the fake-quant attention computes it: q, k, v
    rounded to their grids (with ``qkv``), scores, softmax and the probabilities'
    quantize-dequantize in the inputs' dtype, one operation at a time."""
    i = step.reshape(1) if step is not None else torch.zeros(1, dtype=torch.long, device=scale_tab.device)

    def fake_quant(x, s_tab, z_tab, lo, hi):
        s, z = s_tab.index_select(0, i).to(x.dtype), z_tab.index_select(0, i).to(x.dtype)
        return (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s
    if qkv is not None:
        q, k, v = (fake_quant(x, qkv[2 * j], qkv[2 * j + 1], amin, amax) for j, x in enumerate((q, k, v)))
    qs, ks = (q.float(), k.float()) if upcast_scores else (q, k)
    probs = (torch.matmul(qs, ks.transpose(-1, -2)) * scale).softmax(dim=-1).to(q.dtype)
    return torch.matmul(fake_quant(probs, scale_tab, zero_tab, qmin, qmax), v)
