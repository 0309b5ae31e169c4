"""Triton kernel of :mod:`tfmq.runtime.kernels.w8a16` (imported only where Triton can run).

``_w8_conv_kernel``: implicit-GEMM conv of a float NHWC activation ``[B, H, W, CIN]`` (bf16 or
fp16) with an int8 weight ``[N, KH, KW, CIN]`` holding ``code - OW``. Each weight tile is
dequantized in registers exactly as the reference backend dequantizes the whole weight,
``((code - OW) - (zw - OW)) * sw`` in float32, then cast to the activation's dtype, and multiplied
on the tensor cores with float32 accumulation; out-of-image taps read 0.0 (zero padding).

The product is computed transposed, ``acc[n, m] = w[n, :] . x[m, :]``: the dequantized weight
tile lives in registers, and on Hopper only the first operand of a tensor-core MMA may come from
registers (the second is read from shared memory, where the loaded activation tile goes). With the
weight as the second operand every K step stored it to shared memory first: measured on an H200,
0.2-0.46x cuDNN bf16 at the SD conv1 shapes (``benchmarks/results/w8a16/``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._int8_triton import _k_step, _out_pixels, _tile_ids


@triton.jit
def _w8_conv_kernel(x_ptr, b_ptr, zo_ptr, sw_ptr, bias_ptr, out_ptr, Bsz, H, W, CIN, HO, WO, N,
                    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                    PAD_H: tl.constexpr, PAD_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    M = Bsz * HO * WO
    K = KH * KW * CIN
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    bb, ho, wo = _out_pixels(rm, M, HO, WO)
    hbase = ho * STRIDE_H - PAD_H
    wbase = wo * STRIDE_W - PAD_W
    rbn = tl.minimum(rn, N - 1).to(tl.int64)
    b_rows = b_ptr + rbn[:, None] * K + rk[None, :]
    zo = tl.load(zo_ptr + rbn)
    sw = tl.load(sw_ptr + rbn)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    nck = tl.cdiv(CIN, BLOCK_K)
    for kk in range(0, KH * KW * nck):
        tap, c0, r, s = _k_step(kk, nck, KW, BLOCK_K)
        hi = hbase + r
        wi = wbase + s
        inb = mmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        pix = ((bb * H + hi) * W + wi).to(tl.int64)
        ck = c0 + rk
        cmask = ck < CIN
        x = tl.load(x_ptr + pix[:, None] * CIN + ck[None, :], mask=inb[:, None] & cmask[None, :], other=0.0)
        b = tl.load(b_rows + (tap * CIN + c0), mask=cmask[None, :], other=0)
        acc = tl.dot(_dequant(b, zo, sw, x.dtype), tl.trans(x), acc)
    _finish(acc, rm, rn, M, N, rbn, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def _dequant(b, zo, sw, dtype: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_K]`` weight tile: ``((code - OW) - (zw - OW)) * sw`` in float32 -> dtype."""
    return ((b.to(tl.float32) - zo[:, None]) * sw[:, None]).to(dtype)


@triton.jit
def _finish(acc, rm, rn, M, N, rbn, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """Bias and the store of the transposed accumulator ``acc[n, m]`` into NHWC ``out[m, n]``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rbn).to(tl.float32)[:, None]
    out = out_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
            for bm, bn, bk, st, wp in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 64, 64, 4, 4),
                                       (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)]]


w8_conv = _w8_conv_kernel
w8_conv_tuned = triton.autotune(configs=_configs(), key=["Bsz", "H", "W", "CIN", "N", "KH", "KW", "STRIDE_H"])(
    _w8_conv_kernel)
