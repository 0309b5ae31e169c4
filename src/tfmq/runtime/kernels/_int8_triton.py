"""Triton kernels behind :mod:`tfmq.runtime.kernels.int8` (imported lazily: needs Triton).

Kernels:

* ``_quant_kernel``: per-tensor static activation quantizer over a row-major ``[R, C]`` view
  (``C`` = features of a linear input, or channels of an NHWC conv input), optionally writing
  into a zero-padded NHWC buffer (the input of ``_int8_conv_padded_kernel``). Writes the int8
  codes ``a = clamp(rint(x / sx) + zx, QMIN, QMAX) - OX`` and, optionally, the int32 row (pixel)
  sums of ``a``.
* ``_int8_linear_kernel``: ``out[M, N] = sx * sw[n] * acc + bias[n]`` with
  ``acc = sum_k a*b + ca*bsum[n] + cb[n]*asum[m] + K*ca*cb[n]`` (int8 x int8 -> int32 dot).
* ``_int8_conv_padded_kernel``: the same epilogue over an implicit GEMM of a pre-padded NHWC
  activation and a ``[Cout, KH, KW, Cin]`` weight (``M = B*Ho*Wo``, ``K = KH*KW*Cin``): one
  scalar offset per K step, no bounds checks (the runtime's conv path; 1.17-1.27x cuDNN bf16 on an
  H200 at the SD UNet's 3x3 shapes, NOTES_int8.md).
* ``_int8_conv_kernel``: the same over an unpadded NHWC activation (bounds-checked gathers; padded
  positions read the code of a real zero, ``a = zx - OX = -ca``): the API's default input and the
  fused-quantize mode.

The linear and the unpadded conv kernel take either int8 activations (``A_FLOAT=False``) or the float activation itself
(``A_FLOAT=True``), quantizing each loaded tile in registers, which saves the separate quantize pass.
``asum`` comes either precomputed (``HAS_ASUM``: row sums for linear, per-pixel channel sums for
conv, both from the quantize kernel) or is summed from the loaded tiles; without ``HAS_CB``
(``cb = 0``: a symmetric weight grid, whose codes need no offset) the ``cb * asum`` term vanishes
and no sum is formed or read at all. With ``HAS_SEL`` the
scalar parameters (``sx``, ``zx`` / ``ca``) are per-step tables read at the index ``sel_ptr``
points to (the denoiser's step index), so a compiled graph launches no indexing kernel before
each GEMM.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


@triton.jit
def _quant_codes(x, sx, zx, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """int32 codes ``clamp(rint(x / sx) + zx, QMIN, QMAX) - OX`` of a float32 block (OX = QMIN + 128)."""
    v = tl.math.div_rn(x, sx)
    # clamp before rounding keeps |v| small for the magic-number rounding; the final clamp is unchanged
    v = tl.minimum(tl.maximum(v, QMIN - zx - 1.0), QMAX - zx + 1.0)
    q = ((v + _MAGIC) - _MAGIC) + zx
    q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0)
    return q.to(tl.int32) - (QMIN + 128)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, sum_ptr, sx_ptr, zx_ptr, H, W, HP, WP, RP, C, PH, PW,
                  QMIN: tl.constexpr, QMAX: tl.constexpr, WRITE_SUM: tl.constexpr, ATOMIC_SUM: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Codes of an NHWC ``[B, H, W, C]`` activation written into a zero-padded NHWC
    ``[B, HP, WP, C]`` buffer (``HP = H + 2*PH``; a plain ``[R, C]`` matrix is ``[1, R, 1, C]``
    with no padding). Every padded pixel holds the code of a real zero (a masked load of 0.0,
    quantized like any value: ``zx - OX``), so a convolution over the buffer needs no bounds
    checks. Optionally the int32 per-pixel (per-row) channel sums ``[B, HP, WP]``.

    2-D grid (row blocks x channel blocks): enough CTAs to keep the memory system busy at batch
    2 (one CTA per row block looping over the channels ran ~28 us at every SD UNet shape on an
    H200; this grid 4-9 us). With several channel blocks the sums are int32 atomic adds into a
    zeroed buffer: integer, so the result does not depend on their order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < RP
    wp = rows % WP
    t = rows // WP
    hp = t % HP
    b = t // HP
    h = hp - PH
    w = wp - PW
    inside = rmask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = ((b * H + h) * W + w).to(tl.int64)
    cmask = cols[None, :] < C
    sx = tl.load(sx_ptr).to(tl.float32)
    zx = tl.load(zx_ptr).to(tl.float32)
    x = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=inside[:, None] & cmask, other=0.0)
    a = _quant_codes(x.to(tl.float32), sx, zx, QMIN, QMAX)
    m = rmask[:, None] & cmask
    tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], a.to(tl.int8), mask=m)
    if WRITE_SUM:
        part = tl.sum(tl.where(m, a, 0), axis=1)
        if ATOMIC_SUM:
            tl.atomic_add(sum_ptr + rows, part, mask=rmask, sem="relaxed")
        else:
            tl.store(sum_ptr + rows, part, mask=rmask)


@triton.jit
def _out_pixels(rm, M, HO, WO):
    """(batch, output row, output column) of the output pixels ``rm`` of an implicit-GEMM conv,
    clamped to pixel ``M - 1`` (rows past ``M`` are computed on valid addresses, never stored)."""
    rmc = tl.minimum(rm, M - 1)
    t = rmc // WO
    return t // HO, t % HO, rmc % WO


@triton.jit
def _k_step(kk, nck, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """K step ``kk`` of an implicit-GEMM conv (taps x ``nck`` channel blocks): the tap, its first
    channel, and the tap's row and column in the kernel window."""
    tap = kk // nck
    r = tap // KW
    return tap, (kk - tap * nck) * BLOCK_K, r, tap - r * KW


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each column sweep (L2 reuse of the weight)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _param(ptr, sel_ptr, HAS_SEL: tl.constexpr):
    """``ptr[sel]`` with ``sel`` read from device memory (the denoiser's step index: per-step
    parameter tables are read in place, no indexing kernel before the GEMM), else ``ptr[0]``."""
    if HAS_SEL:
        return tl.load(ptr + tl.load(sel_ptr))
    else:
        return tl.load(ptr)


@triton.jit
def _finish(acc, asum, rm, rn, M, N, K, ca, sx, pid_k, out_ptr, ws_ptr, stride_om, sw_ptr, cb_ptr,
            bsum_ptr, bias_ptr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_CB: tl.constexpr):
    """Add this K-split's integer corrections, then write ``out`` (one split) or the int32 partial.

    All correction terms are linear in the sums, so each split adds ``cb[n] * asum_split[m]`` and
    split 0 also adds ``ca*bsum[n] + K*ca*cb[n]``; the partials add up to the exact ``acc``.
    ``asum`` passed here is already this split's share. Without ``HAS_CB`` (``cb = 0``: a
    symmetric weight grid) only ``ca*bsum[n]`` is added and ``asum`` is not read.
    """
    nmask = rn < N
    bsum = tl.load(bsum_ptr + rn, mask=nmask, other=0)
    if HAS_CB:
        cb = tl.load(cb_ptr + rn, mask=nmask, other=0)
        col = (ca * bsum + (K * ca) * cb) * (pid_k == 0).to(tl.int32)
        acc = acc + col[None, :] + cb[None, :] * asum[:, None]
    else:
        acc = acc + (ca * bsum * (pid_k == 0).to(tl.int32))[None, :]
    mask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT_K == 1:
        sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        out = acc.to(tl.float32) * (sx * sw)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            out = out + bias[None, :]
        ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ptrs = ws_ptr + (pid_k.to(tl.int64) * M + rm[:, None]) * N + rn[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, out_ptr, sx_ptr, sel_ptr, sw_ptr, bias_ptr, M, N, stride_om,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out = sx * sw[n] * sum_s ws[s, m, n] + bias[n]`` (exact int32 sum of the K-split partials)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    mask = (rm[:, None] < M) & nmask[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for sidx in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + sidx * M * N + offs, mask=mask, other=0)
    sx = _param(sx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
    sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * (sx * sw)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _int8_linear_kernel(a_ptr, b_ptr, out_ptr, ws_ptr, sx_ptr, zx_ptr, ca_ptr, sel_ptr, sw_ptr, cb_ptr,
                        bsum_ptr, bias_ptr, asum_ptr, M, N, K, stride_am, stride_bn, stride_om,
                        A_FLOAT: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, HAS_ASUM: tl.constexpr, SPLIT_K: tl.constexpr,
                        HAS_CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # clamp row indices for the loads (rows >= M are never stored), so loads need only a K mask
    ram = tl.minimum(rm, M - 1).to(tl.int64)
    rbn = tl.minimum(rn, N - 1).to(tl.int64)
    a_rows = a_ptr + ram[:, None] * stride_am + rk[None, :]
    b_rows = b_ptr + rbn[:, None] * stride_bn + rk[None, :]
    pid_k = tl.program_id(1)
    nk = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nk, SPLIT_K)
    k_lo = pid_k * per
    k_hi = tl.minimum(nk, k_lo + per)
    sx = _param(sx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
    if A_FLOAT:
        zx = _param(zx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
        ca = (QMIN + 128) - zx.to(tl.int32)
    else:
        ca = _param(ca_ptr, sel_ptr, HAS_SEL).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    asum_acc = tl.zeros([BLOCK_M], dtype=tl.int32)
    for kc in range(k_lo, k_hi):
        k0 = kc * BLOCK_K
        kmask = (k0 + rk) < K
        a_ptrs = a_rows + k0
        b = tl.load(b_rows + k0, mask=kmask[None, :], other=0)
        if A_FLOAT:
            x = tl.load(a_ptrs, mask=kmask[None, :], other=0.0).to(tl.float32)
            a32 = tl.where(kmask[None, :], _quant_codes(x, sx, zx, QMIN, QMAX), 0)
            a = a32.to(tl.int8)
            if HAS_CB:
                asum_acc += tl.sum(a32, axis=1)
        else:
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            if HAS_CB and not HAS_ASUM:
                asum_acc += tl.sum(a.to(tl.int32), axis=1)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    if HAS_CB and HAS_ASUM and not A_FLOAT:
        asum = tl.load(asum_ptr + ram) * (pid_k == 0).to(tl.int32)
    else:
        asum = asum_acc
    _finish(acc, asum, rm, rn, M, N, K, ca, sx, pid_k, out_ptr, ws_ptr, stride_om, sw_ptr, cb_ptr,
            bsum_ptr, bias_ptr, HAS_BIAS, SPLIT_K, HAS_CB)


@triton.jit
def _int8_conv_kernel(a_ptr, b_ptr, out_ptr, ws_ptr, sx_ptr, zx_ptr, ca_ptr, sel_ptr, sw_ptr, cb_ptr,
                      bsum_ptr, bias_ptr, psum_ptr, Bsz, H, W, CIN, HO, WO, N,
                      KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr,
                      STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                      A_FLOAT: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, HAS_ASUM: tl.constexpr, SPLIT_K: tl.constexpr,
                      HAS_CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    sx = _param(sx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
    if A_FLOAT:
        zx = _param(zx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
        ca = (QMIN + 128) - zx.to(tl.int32)
    else:
        ca = _param(ca_ptr, sel_ptr, HAS_SEL).to(tl.int32)
    pad = (-ca).to(tl.int8)  # code of a real zero: a = zx - OX
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    asum_acc = tl.zeros([BLOCK_M], dtype=tl.int32)
    nck = tl.cdiv(CIN, BLOCK_K)
    pid_k = tl.program_id(1)
    nk = KH * KW * nck
    per = tl.cdiv(nk, SPLIT_K)
    k_lo = pid_k * per
    k_hi = tl.minimum(nk, k_lo + per)
    for kk in range(k_lo, k_hi):
        tap, c0, r, s = _k_step(kk, nck, KW, BLOCK_K)
        hi = hbase + r
        wi = wbase + s
        inb = mmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        pix = ((bb * H + hi) * W + wi).to(tl.int64)
        ck = c0 + rk
        cmask = ck < CIN
        lmask = inb[:, None] & cmask[None, :]
        a_ptrs = a_ptr + pix[:, None] * CIN + ck[None, :]
        b = tl.load(b_rows + (tap * CIN + c0), mask=cmask[None, :], other=0)
        if A_FLOAT:
            # a padded real zero quantizes to zx, i.e. a = -ca, exactly as the int8 path pads
            x = tl.load(a_ptrs, mask=lmask, other=0.0).to(tl.float32)
            a32 = tl.where(cmask[None, :], _quant_codes(x, sx, zx, QMIN, QMAX), 0)
            a = a32.to(tl.int8)
            if HAS_CB:
                asum_acc += tl.sum(a32, axis=1)
        else:
            a = tl.load(a_ptrs, mask=lmask, other=pad)
            if HAS_CB and not HAS_ASUM:
                asum_acc += tl.sum(tl.where(cmask[None, :], a.to(tl.int32), 0), axis=1)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    if HAS_CB and HAS_ASUM and not A_FLOAT:
        # window sums of the per-pixel channel sums; padded taps contribute CIN * pad each
        asum = tl.zeros([BLOCK_M], dtype=tl.int32)
        for tap in tl.static_range(KH * KW):
            hi = hbase + tap // KW
            wi = wbase + tap % KW
            inb = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pix = ((bb * H + hi) * W + wi).to(tl.int64)
            ps = tl.load(psum_ptr + pix, mask=inb & mmask, other=0)
            asum += tl.where(inb, ps, CIN * (-ca))
        asum = asum * (pid_k == 0).to(tl.int32)
    else:
        asum = asum_acc
    _finish(acc, asum, rm, rn, M, N, K, ca, sx, pid_k, out_ptr, ws_ptr, N, sw_ptr, cb_ptr, bsum_ptr,
            bias_ptr, HAS_BIAS, SPLIT_K, HAS_CB)


@triton.jit
def _int8_conv_padded_kernel(a_ptr, b_ptr, out_ptr, ws_ptr, sx_ptr, ca_ptr, sel_ptr, sw_ptr, cb_ptr,
                             bsum_ptr, bias_ptr, psum_ptr, Bsz, HP, WP, CIN, HO, WO, N,
                             KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr,
                             STRIDE_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, SPLIT_K: tl.constexpr,
                             HAS_CB: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Implicit-GEMM conv over an already padded NHWC int8 input ``[B, HP, WP, CIN]`` (padding in
    the buffer: see ``_quant_kernel``) and its padded per-pixel sums ``psum``. Output pixel
    ``m`` reads, at tap ``(r, s)``, pixel ``base[m] + r*WP + s``: one scalar offset per K step for
    the whole tile, so the A loads need no index arithmetic or bounds masks (rows past ``M`` are
    clamped and never stored); with ``EVEN_K`` (``CIN % BLOCK_K == 0``) no channel mask either.
    Without ``HAS_CB`` (symmetric weights) the sums are not read (``psum`` may be any tensor)."""
    M = Bsz * HO * WO
    K = KH * KW * CIN
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    bb, ho, wo = _out_pixels(rm, M, HO, WO)
    base = ((bb * HP + ho * STRIDE_H) * WP + wo * STRIDE_W).to(tl.int64)
    a_rows = a_ptr + base[:, None] * CIN + rk[None, :]
    rbn = tl.minimum(rn, N - 1).to(tl.int64)
    b_rows = b_ptr + rbn[:, None] * K + rk[None, :]
    sx = _param(sx_ptr, sel_ptr, HAS_SEL).to(tl.float32)
    ca = _param(ca_ptr, sel_ptr, HAS_SEL).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    nck = tl.cdiv(CIN, BLOCK_K)
    pid_k = tl.program_id(1)
    nk = KH * KW * nck
    per = tl.cdiv(nk, SPLIT_K)
    k_lo = pid_k * per
    k_hi = tl.minimum(nk, k_lo + per)
    for kk in range(k_lo, k_hi):
        tap, c0, r, s = _k_step(kk, nck, KW, BLOCK_K)
        a_off = (r * WP + s).to(tl.int64) * CIN + c0
        b_off = tap * CIN + c0
        if EVEN_K:
            a = tl.load(a_rows + a_off)
            b = tl.load(b_rows + b_off)
        else:
            cmask = (c0 + rk) < CIN
            a = tl.load(a_rows + a_off, mask=cmask[None, :], other=0)
            b = tl.load(b_rows + b_off, mask=cmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    # window sums of the padded per-pixel sums (padded pixels hold CIN codes of a real zero)
    asum = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_CB:
        for tap in tl.static_range(KH * KW):
            asum += tl.load(psum_ptr + base + (tap // KW) * WP + tap % KW)
        asum = asum * (pid_k == 0).to(tl.int32)
    _finish(acc, asum, rm, rn, M, N, K, ca, sx, pid_k, out_ptr, ws_ptr, N, sw_ptr, cb_ptr, bsum_ptr,
            bias_ptr, HAS_BIAS, SPLIT_K, HAS_CB)


def _configs():
    cfgs = []
    for bm, bn, bk, stages, warps in [
        (128, 256, 128, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 128, 4, 8),
        (128, 128, 64, 5, 4),
        (128, 128, 128, 3, 8),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        # K blocks of 32 channels: no masked half-empty K steps for 32 / 96 / 160-channel inputs
        # (small UNets such as the bundled model); added after the last GPU timing, not yet measured
        (128, 64, 32, 4, 4),
        (128, 128, 32, 4, 4),
        # narrow outputs (N = 64) over 64-channel inputs (K steps of one 3x3 tap, none masked): the
        # bundled model's convolutions, where the session-16 H200 profile had the int8 conv kernels
        # slower than cuDNN bf16 on the same layers (0.74 vs 0.69 ms a call) with only BLOCK_K = 128 / 32
        # on offer for BLOCK_N = 64. Not yet measured
        (128, 64, 64, 4, 4),
        (256, 64, 64, 3, 8),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_stages=stages, num_warps=warps))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than the problem in N (output channels), in K (the reduction: a linear's K,
    a convolution's input channels per tap) or in a linear's M: their extra part is masked work
    only, so no better tile is lost, and the autotuner compiles and times fewer (the bundled
    model's 64-channel convolutions keep 3 of 12)."""
    def arg(name):
        v = named_args.get(name, kwargs.get(name))
        return None if v is None else int(v)
    n, m = arg("N"), arg("M")
    k = arg("CIN") if arg("CIN") is not None else arg("K")
    keep = [c for c in configs
            if (n is None or c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n)))
            and (k is None or c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(k)))
            and (m is None or c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m)))]
    return keep or configs


def autotuned(fn, configs: list, key: list[str], prune):
    """``triton.autotune`` over ``configs`` less those ``prune(configs, named_args, **kwargs)`` drops
    for the shape, per ``key``. Where this Triton supports it (``cache_results``), each shape's
    timings are kept in Triton's cache directory, so a later process loads the chosen configuration
    instead of compiling and timing all of them again (the first compile of the SD-v1.5-config
    UNet's w8a8 graph took ~310 s on an H200)."""
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **extra)(fn)


def _tuned(fn, key: list[str]):
    """:func:`autotuned` over the GEMM tiles (:func:`_configs`, pruned by :func:`_prune`)."""
    return autotuned(fn, _configs(), key, _prune)


int8_linear_tuned = _tuned(_int8_linear_kernel, ["M", "N", "K", "A_FLOAT", "HAS_ASUM", "SPLIT_K", "HAS_CB"])
int8_conv_tuned = _tuned(_int8_conv_kernel, ["Bsz", "H", "W", "CIN", "N", "KH", "KW", "STRIDE_H", "A_FLOAT",
                                             "HAS_ASUM", "SPLIT_K", "HAS_CB"])
int8_conv_padded = triton.heuristics({"EVEN_K": lambda a: a["CIN"] % a["BLOCK_K"] == 0})(_int8_conv_padded_kernel)
int8_conv_padded_tuned = _tuned(int8_conv_padded, ["Bsz", "HP", "WP", "CIN", "N", "KH", "KW", "STRIDE_H", "SPLIT_K",
                                                   "HAS_CB"])
