"""Triton kernel behind :mod:`tfmq.runtime.kernels.attention` (imported lazily: needs Triton).

``_quant_attention_kernel``: ``out = Q_p(softmax(q kᵀ * scale)) v`` for one (batch, head) and a
block of query rows, where ``Q_p`` rounds every probability to the calibrated static grid of the
softmax quantizer (``(clamp(rint(p / s) + z, QMIN, QMAX) - z) * s``). With ``ROUND_QKV`` q, k and
v arrive unrounded and are rounded to their own grids (``AMIN``..``AMAX``) as their tiles are
loaded, which saves the separate passes over them. Rounding needs the
normalised probability, so the kernel makes two passes over the keys: the first finds each
row's maximum and exponential sum (online, as flash attention does), the second recomputes the
scores, normalises, rounds and multiplies by ``v``. The score and probability matrices are never
written to memory.

With ``ROUND_IO`` (a 16-bit model dtype) every intermediate the reference computes in the model
dtype (the probabilities, each step of the quantizer; with ``ROUND_S`` also the scores and the
scaled scores, i.e. unless the attention upcasts them to float32) is rounded to it here too, so
the kernel follows the reference's arithmetic operation for operation; only the order of the dot
products' and the exponential sum's additions differs. (The softmax itself runs in float32 either
way, as PyTorch's does for 16-bit inputs: ``upcast_softmax`` changes nothing here.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._int8_triton import _MAGIC, _param, autotuned


@triton.jit
def _io(x, IO_DTYPE: tl.constexpr, ROUND_IO: tl.constexpr):
    """``x`` rounded to the model dtype and back to float32 (where that dtype is 16-bit)."""
    if ROUND_IO:
        return x.to(IO_DTYPE).to(tl.float32)
    else:
        return x


@triton.jit
def _scores(q, k, scale, col_ok, IO_DTYPE: tl.constexpr, ROUND_S: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = _io(_io(s, IO_DTYPE, ROUND_S) * scale, IO_DTYPE, ROUND_S)
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _grid_params(s_ptr, z_ptr, sel_ptr, HAS_SEL: tl.constexpr, IO_DTYPE: tl.constexpr, ROUND_IO: tl.constexpr):
    """A quantizer's scale and zero-point at the step (in the model dtype, as float32)."""
    sc = _io(_param(s_ptr, sel_ptr, HAS_SEL).to(tl.float32), IO_DTYPE, ROUND_IO)
    zc = _io(_param(z_ptr, sel_ptr, HAS_SEL).to(tl.float32), IO_DTYPE, ROUND_IO)
    return sc, zc


@triton.jit
def _fake_quant(x, sc, zc, QMIN: tl.constexpr, QMAX: tl.constexpr, IO_DTYPE: tl.constexpr,
                ROUND_IO: tl.constexpr):
    """``(clamp(round(x / s) + z, QMIN, QMAX) - z) * s`` of a float32 block, each operation
    rounded to the model dtype as the runtime's ``ActQuant`` computes it there."""
    t = _io(tl.math.div_rn(x, sc), IO_DTYPE, ROUND_IO)
    t = tl.minimum(tl.maximum(t, QMIN - zc - 1.0), QMAX - zc + 1.0)   # keeps the rounding trick exact
    c = _io(((t + _MAGIC) - _MAGIC) + zc, IO_DTYPE, ROUND_IO)
    c = tl.minimum(tl.maximum(c, QMIN * 1.0), QMAX * 1.0)
    return _io(_io(c - zc, IO_DTYPE, ROUND_IO) * sc, IO_DTYPE, ROUND_IO)


@triton.jit
def _quant_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, sp_ptr, zp_ptr, sel_ptr,
                            qs_ptr, qz_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                            sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                            H, NQ, NK, D, DV, scale,
                            QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_SEL: tl.constexpr,
                            ROUND_QKV: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr,
                            ROUND_IO: tl.constexpr, ROUND_S: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    io = q_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    row_ok = rm < NQ
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rm[:, None].to(tl.int64) * sqm + rd[None, :],
                mask=row_ok[:, None] & (rd < D)[None, :], other=0.0)
    if ROUND_QKV:          # q, k, v rounded to their own grids here, as they are loaded
        qs, qz = _grid_params(qs_ptr, qz_ptr, sel_ptr, HAS_SEL, io, ROUND_IO)
        ks, kz = _grid_params(ks_ptr, kz_ptr, sel_ptr, HAS_SEL, io, ROUND_IO)
        vs, vz = _grid_params(vs_ptr, vz_ptr, sel_ptr, HAS_SEL, io, ROUND_IO)
        q = _fake_quant(q.to(tl.float32), qs, qz, AMIN, AMAX, io, ROUND_IO).to(io)
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    # pass 1: each row's maximum score and the sum of exp(score - maximum)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < NK
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + rd[None, :],
                    mask=col_ok[:, None] & (rd < D)[None, :], other=0.0)
        if ROUND_QKV:
            k = _fake_quant(k.to(tl.float32), ks, kz, AMIN, AMAX, io, ROUND_IO).to(io)
        s = _scores(q, k, scale, col_ok, io, ROUND_S, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    # pass 2: normalised probabilities, rounded to the softmax grid, times v
    sp, zp = _grid_params(sp_ptr, zp_ptr, sel_ptr, HAS_SEL, io, ROUND_IO)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + rn
        col_ok = cols < NK
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + rd[None, :],
                    mask=col_ok[:, None] & (rd < D)[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + rdv[None, :],
                    mask=col_ok[:, None] & (rdv < DV)[None, :], other=0.0)
        if ROUND_QKV:
            k = _fake_quant(k.to(tl.float32), ks, kz, AMIN, AMAX, io, ROUND_IO).to(io)
            v = _fake_quant(v.to(tl.float32), vs, vz, AMIN, AMAX, io, ROUND_IO).to(io)
        s = _scores(q, k, scale, col_ok, io, ROUND_S, IEEE)
        p = _io(tl.exp(s - m_i[:, None]) / l_i[:, None], io, ROUND_IO)
        pq = _fake_quant(p, sp, zp, QMIN, QMAX, io, ROUND_IO)
        pq = tl.where(col_ok[None, :], pq, 0.0)
        if IEEE:
            acc = tl.dot(pq.to(io), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(pq.to(io), v, acc)
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + rm[:, None].to(tl.int64) * som + rdv[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (rdv < DV)[None, :])


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (32, 64, 4, 2),
                                  (64, 128, 8, 2)]]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose query block and accumulator would not fit in registers for wide heads."""
    width = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * width <= 128 * 128
            and c.kwargs["BLOCK_N"] * width <= 128 * 128]
    return keep or configs[:1]


quant_attention_tuned = autotuned(_quant_attention_kernel, _configs(),
                                  ["NQ", "NK", "D", "DV", "ROUND_IO", "ROUND_S", "IEEE", "HAS_SEL", "ROUND_QKV"],
                                  _prune)
