"""Triton kernels and autograd functions behind :mod:`tfmq.quant.fused` (imported lazily: needs
Triton, which PyTorch's CUDA builds ship): AdaRound's soft weight and regulariser, and per-tensor
activation fake-quant, each one kernel forward and one backward (plus a fixed-order sum of
per-block partial sums where a gradient or value is a sum)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024


@triton.jit
def _h(a, ZETA: tl.constexpr, GAMMA: tl.constexpr):
    """Sigmoid, the rectified sigmoid's pre-clamp value and the clamp's pass mask."""
    s = 1.0 / (1.0 + libdevice.exp(-a))
    x = s * (ZETA - GAMMA) + GAMMA
    inside = (x >= 0.0) & (x <= 1.0)
    return s, tl.minimum(tl.maximum(x, 0.0), 1.0), inside


@triton.jit
def _weight_block(alpha_ptr, floor_ptr, scale_ptr, zero_ptr, offs, m, inner):
    """One block of alpha and floor(W / s) with each value's channel scale and zero-point."""
    ch = offs // inner
    a = tl.load(alpha_ptr + offs, mask=m, other=0.0)
    f = tl.load(floor_ptr + offs, mask=m, other=0.0)
    sc = tl.load(scale_ptr + ch, mask=m, other=1.0)
    z = tl.load(zero_ptr + ch, mask=m, other=0.0)
    return a, f, sc, z


@triton.jit
def _soft_weight_fwd(alpha_ptr, floor_ptr, scale_ptr, zero_ptr, out_ptr, n, inner, qmin, qmax,
                     ZETA: tl.constexpr, GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a, f, sc, z = _weight_block(alpha_ptr, floor_ptr, scale_ptr, zero_ptr, offs, m, inner)
    _, h, _ = _h(a, ZETA, GAMMA)
    q = tl.minimum(tl.maximum(f + h + z, qmin), qmax)
    tl.store(out_ptr + offs, (q - z) * sc, mask=m)


@triton.jit
def _soft_weight_bwd(grad_ptr, alpha_ptr, floor_ptr, scale_ptr, zero_ptr, out_ptr, n, inner, qmin, qmax,
                     ZETA: tl.constexpr, GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(grad_ptr + offs, mask=m, other=0.0)
    a, f, sc, z = _weight_block(alpha_ptr, floor_ptr, scale_ptr, zero_ptr, offs, m, inner)
    s, h, inside = _h(a, ZETA, GAMMA)
    v = f + h + z
    gq = tl.where((v >= qmin) & (v <= qmax), g * sc, 0.0)
    ga = tl.where(inside, gq * (ZETA - GAMMA), 0.0) * ((1.0 - s) * s)
    tl.store(out_ptr + offs, ga, mask=m)


@triton.jit
def _reg_fwd(alpha_ptr, beta_ptr, part_ptr, n, ZETA: tl.constexpr, GAMMA: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(alpha_ptr + offs, mask=m, other=0.0)
    beta = tl.load(beta_ptr)
    _, h, _ = _h(a, ZETA, GAMMA)
    r = 1.0 - libdevice.pow(tl.abs(2.0 * h - 1.0), beta)
    tl.store(part_ptr + pid, tl.sum(tl.where(m, r, 0.0), axis=0))


@triton.jit
def _reg_bwd(grad_ptr, alpha_ptr, beta_ptr, out_ptr, n, ZETA: tl.constexpr, GAMMA: tl.constexpr,
             BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(grad_ptr)
    a = tl.load(alpha_ptr + offs, mask=m, other=0.0)
    beta = tl.load(beta_ptr)
    s, h, inside = _h(a, ZETA, GAMMA)
    d = 2.0 * h - 1.0
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    gd = -g * beta * libdevice.pow(tl.abs(d), beta - 1.0) * sign      # d/d(2h - 1)
    ga = tl.where(inside, 2.0 * gd * (ZETA - GAMMA), 0.0) * ((1.0 - s) * s)
    tl.store(out_ptr + offs, ga, mask=m)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def _channel_layout(alpha: torch.Tensor, scale: torch.Tensor) -> int:
    """Values of ``alpha`` per scale entry (per-channel: one output channel's weights)."""
    if scale.numel() == 1:
        return alpha.numel()
    if scale.numel() != alpha.shape[0] or any(d != 1 for d in scale.shape[1:]):
        raise ValueError(f"fused AdaRound needs one scale per output channel or one in all; got "
                         f"{scale.numel()} scales for a weight of shape {tuple(alpha.shape)}")
    return alpha.numel() // alpha.shape[0]


class SoftWeight(torch.autograd.Function):
    """``(clamp(w_floor + h(alpha) + zero, qmin, qmax) - zero) * scale`` (float32, alpha's shape);
    differentiable in ``alpha`` only."""

    @staticmethod
    def forward(ctx, alpha, w_floor, scale, zero, qmin: float, qmax: float, zeta: float, gamma: float):
        scale, zero = torch.broadcast_tensors(scale.float(), zero.float())
        inner = _channel_layout(alpha, scale)
        alpha, w_floor = alpha.contiguous(), w_floor.contiguous()
        scale, zero = scale.contiguous().reshape(-1), zero.contiguous().reshape(-1)
        out = torch.empty_like(alpha, dtype=torch.float32)
        n = alpha.numel()
        _soft_weight_fwd[_grid(n)](alpha, w_floor, scale, zero, out, n, inner, float(qmin), float(qmax),
                                   ZETA=zeta, GAMMA=gamma, BLOCK=BLOCK)
        ctx.save_for_backward(alpha, w_floor, scale, zero)
        ctx.consts = (inner, float(qmin), float(qmax), zeta, gamma)
        return out

    @staticmethod
    def backward(ctx, grad):
        alpha, w_floor, scale, zero = ctx.saved_tensors
        inner, qmin, qmax, zeta, gamma = ctx.consts
        grad = grad.contiguous().float()
        out = torch.empty_like(alpha)
        n = alpha.numel()
        _soft_weight_bwd[_grid(n)](grad, alpha, w_floor, scale, zero, out, n, inner, qmin, qmax,
                                   ZETA=zeta, GAMMA=gamma, BLOCK=BLOCK)
        return out, None, None, None, None, None, None, None


class Regularizer(torch.autograd.Function):
    """``sum(1 - |2 h(alpha) - 1|^beta)`` (``beta``: a 0-d float32 device tensor); differentiable
    in ``alpha`` only."""

    @staticmethod
    def forward(ctx, alpha, beta, zeta: float, gamma: float):
        alpha = alpha.contiguous()
        beta = beta.reshape(()).float()
        n = alpha.numel()
        parts = torch.empty(_grid(n)[0], dtype=torch.float32, device=alpha.device)
        _reg_fwd[_grid(n)](alpha, beta, parts, n, ZETA=zeta, GAMMA=gamma, BLOCK=BLOCK)
        ctx.save_for_backward(alpha, beta)
        ctx.consts = (zeta, gamma)
        return parts.sum()

    @staticmethod
    def backward(ctx, grad):
        alpha, beta = ctx.saved_tensors
        zeta, gamma = ctx.consts
        out = torch.empty_like(alpha)
        n = alpha.numel()
        _reg_bwd[_grid(n)](grad.reshape(()).float().contiguous(), alpha, beta, out, n,
                           ZETA=zeta, GAMMA=gamma, BLOCK=BLOCK)
        return out, None, None, None


# ---- activation fake-quant (per-tensor scale / zero-point, straight-through rounding) -------------
@triton.jit
def _fake_quant_fwd(x_ptr, s_ptr, z_ptr, out_ptr, n, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    s = tl.load(s_ptr)
    z = tl.load(z_ptr)
    q = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(x, s)) + z, qmin), qmax)
    tl.store(out_ptr + offs, (q - z) * s, mask=m)


@triton.jit
def _fake_quant_bwd(g_ptr, x_ptr, s_ptr, z_ptr, gx_ptr, part_ptr, n, qmin, qmax,
                    SCALE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    s = tl.load(s_ptr)
    z = tl.load(z_ptr)
    v = tl.math.div_rn(x, s)
    u = libdevice.rint(v) + z
    inside = (u >= qmin) & (u <= qmax)
    gv = tl.where(inside, g * s, 0.0)             # through the clamp and the rounding (STE)
    tl.store(gx_ptr + offs, tl.math.div_rn(gv, s), mask=m)
    if SCALE_GRAD:
        q = tl.minimum(tl.maximum(u, qmin), qmax)
        # d out / d s = (q - z) + s * dq/ds, dq/ds = -x / s^2 inside the grid (LSQ)
        gs = g * (q - z) - tl.math.div_rn(gv * x, s * s)
        tl.store(part_ptr + pid, tl.sum(tl.where(m, gs, 0.0), axis=0))


class FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with one (0-d) scale and zero-point,
    rounding passed straight through; the gradient reaches ``x`` and ``s``."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: float, qmax: float):
        x = x.contiguous()
        s, z = scale.reshape(()).contiguous(), zero.reshape(()).float().contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        _fake_quant_fwd[_grid(n)](x, s, z, out, n, float(qmin), float(qmax), BLOCK=BLOCK)
        ctx.save_for_backward(x, s, z)
        ctx.consts = (float(qmin), float(qmax))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.consts
        grad = grad.contiguous()
        gx = torch.empty_like(x)
        n = x.numel()
        want_s = ctx.needs_input_grad[1]
        parts = torch.empty(_grid(n)[0] if want_s else 1, dtype=torch.float32, device=x.device)
        _fake_quant_bwd[_grid(n)](grad, x, s, z, gx, parts, n, qmin, qmax, SCALE_GRAD=want_s, BLOCK=BLOCK)
        gs = parts.sum().reshape(s.shape) if want_s else None
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None
