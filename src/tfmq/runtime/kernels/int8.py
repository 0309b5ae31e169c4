"""W8A8 integer kernels for CUDA (Triton, int8 tensor cores, int32 accumulation) and their references.

Quantization conventions (they match :mod:`tfmq.quant.quantizer`):

* Activations: one static scale ``sx`` and zero-point ``zx`` per tensor (0-d / 1-element float32
  device tensors, ``zx`` integer-valued). Codes ``xq = clamp(round(x / sx) + zx, qmin, qmax)``,
  computed in float32 (``x`` is upcast first), round half to even like ``torch.round``. The grid is
  8 bits: ``qmax - qmin <= 255``, typically ``[0, 255]`` (asymmetric) or ``[-128, 127]``
  (symmetric, ``zx = 0``), and ``qmin <= zx <= qmax`` (the project's quantizer widens every range
  to contain 0, which guarantees it).
* Weights: per output channel ``n``, codes ``wq`` with zero-point ``zw[n]``, scale ``sw[n]``.
* Stored int8 values: ``a = xq - ox`` and ``b = wq - ow`` with offset ``o = qmin + 128``
  (128 for ``[0, 255]``, 0 for ``[-128, 127]``). Then ``xq - zx = a + ca`` with ``ca = ox - zx`` and
  ``wq - zw[n] = b + cb[n]`` with ``cb[n] = ow - zw[n]``.
* ``acc[m, n] = sum_k a*b + ca*bsum[n] + cb[n]*asum[m] + K*ca*cb[n]`` (exact int32; ``bsum`` /
  ``asum`` are the sums of ``b`` over a weight row / of ``a`` over an input row) and
  ``out = sx * sw[n] * acc + bias[n]``. This equals ``F.linear((xq - zx)*sx, (wq - zw)*sw, bias)``
  up to the float32 rounding of the epilogue. int32 holds ``acc`` for ``K <= 32768``.
* Convolutions are implicit GEMMs over NHWC int8 activations and ``[Cout, kh, kw, Cin]`` weights;
  zero padding of the real input is the code ``xq = zx``, i.e. ``a = zx - ox = -ca`` at padded
  positions (so no separate pad value needs to be passed: it cannot disagree with ``ca``).

Every function takes device tensors only and makes no host synchronisation, so calls can be captured
in CUDA graphs (run each shape once before capture: the first call autotunes / compiles).

Set ``TFMQ_INT8_AUTOTUNE=0`` to use one heuristic tile config instead of Triton's autotuner (faster
compilation, e.g. in tests). ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors through Triton's
interpreter (a debugging aid, explicitly opted into; never used as a fallback).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["available", "quantize_act", "quantize_act_ops", "int8_linear", "int8_conv2d", "prepare_weight",
           "ref_quantize_act", "ref_linear", "ref_conv2d", "offset_for", "MAX_K"]

MAX_K = 32768  # |acc| <= 4 * K * 128 * 128 < 2**31

_triton_mod = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run: CUDA device of compute capability >= 8.0 and Triton importable."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _kernels():
    """The Triton module, or a RuntimeError saying why the kernels cannot run here."""
    global _triton_mod
    if not (available() or _interpreting()):
        raise RuntimeError("tfmq int8 kernels need a CUDA GPU of compute capability >= 8.0 and Triton "
                           f"(cuda available: {torch.cuda.is_available()}); there is no CPU fallback: "
                           "use ref_linear / ref_conv2d for reference numerics")
    if _triton_mod is None:
        from . import _int8_triton
        _triton_mod = _int8_triton
    return _triton_mod


def _autotune() -> bool:
    return os.environ.get("TFMQ_INT8_AUTOTUNE", "1") != "0" and not _interpreting()


def offset_for(qmin: int, qmax: int) -> int:
    """Offset ``o`` with ``int8 = code - o``: ``qmin + 128`` (128 for [0, 255], 0 for [-128, 127])."""
    if not (isinstance(qmin, int) and isinstance(qmax, int)) or qmax <= qmin or qmax - qmin > 255:
        raise ValueError(f"need an integer grid of at most 8 bits, got qmin={qmin}, qmax={qmax}")
    return qmin + 128


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError(f"int8 kernels run on CUDA tensors, got device {dev}")


def _check_scalar(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{name} must be a 1-element device tensor (no host sync), got {type(t).__name__}"
                         + (f" with {t.numel()} elements" if isinstance(t, torch.Tensor) else ""))


def _check_step(step: torch.Tensor, sx: torch.Tensor, c: torch.Tensor, cname: str) -> None:
    """``step`` selects one entry of the parameter tables ``sx`` and ``c`` (``ca`` or ``zx``)."""
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype not in (torch.int32, torch.int64):
        raise ValueError("step must be a 1-element int32 / int64 device tensor (the step index), got "
                         + (f"{step.dtype} with {step.numel()} elements" if isinstance(step, torch.Tensor)
                            else type(step).__name__))
    for t, name in ((sx, "sx"), (c, cname)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 1 or not t.is_contiguous():
            raise ValueError(f"with a step index, {name} must be a contiguous 1-d table of per-step values, got "
                             + (f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__))
    if sx.numel() != c.numel():
        raise ValueError(f"the sx and {cname} tables differ in length: {sx.numel()} vs {c.numel()}")


def _check_channel(t: torch.Tensor, n: int, name: str, dtypes: Sequence[torch.dtype]) -> None:
    if t.dim() != 1 or t.shape[0] != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [{n}] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {list(dtypes)}, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# activation quantizer
# ---------------------------------------------------------------------------------------------

def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quantize_act(x: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qmin: int, qmax: int, *,
                 nhwc: bool = False, return_sums: bool = False, pad=0):
    """int8 activation codes ``a = clamp(round(x / sx) + zx, qmin, qmax) - ox`` (one fused pass).

    Default layout: ``x`` of any shape ``[..., C]`` -> int8 of the same shape (row-major), and with
    ``return_sums`` also the int32 row sums of ``a`` over ``C`` (shape ``x.shape[:-1]``: the
    ``asum`` of :func:`int8_linear`).
    ``nhwc=True``: ``x`` is a 4-D ``[B, C, H, W]`` tensor (channels_last memory is read in place,
    any other layout is first copied to channels_last); returns NHWC int8 ``[B, H, W, C]`` and, with
    ``return_sums``, the per-pixel channel sums ``[B, H, W]`` int32 (the ``asum`` of
    :func:`int8_conv2d`).
    ``pad`` (int or pair, with ``nhwc=True``): write the codes into a zero-padded buffer
    ``[B, H + 2*ph, W + 2*pw, C]`` whose border holds the code of a real zero (and sums over the
    padded pixels): the input of ``int8_conv2d(..., padded=True)``, which then needs no bounds checks.
    """
    tm = _kernels()
    offset_for(qmin, qmax)
    _check_scalar(sx, "sx")
    _check_scalar(zx, "zx")
    _check_device(x, sx, zx)
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    ph, pw = _pair(pad, "pad")
    if ph < 0 or pw < 0:
        raise ValueError(f"pad must be >= 0, got {pad!r}")
    if nhwc:
        if x.dim() != 4:
            raise ValueError(f"nhwc=True needs a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        xr = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # contiguous NHWC
        return _launch_quantize(tm, xr, sx, zx, qmin, qmax, ph, pw, return_sums)
    if ph or pw:
        raise ValueError("pad is only used with nhwc=True (a convolution's input)")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    xr = x.contiguous()
    c = xr.shape[-1]
    out = _launch_quantize(tm, xr.reshape(1, math.prod(xr.shape[:-1]), 1, c), sx, zx, qmin, qmax, 0, 0, return_sums)
    if return_sums:                                       # [1, R, 1, C] -> x's shape
        return out[0].view(xr.shape), out[1].view(xr.shape[:-1])
    return out.view(xr.shape)


def quantize_act_ops(x: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qmin: int, qmax: int, *,
                     nhwc: bool = False, pad=0, return_sums: bool = True):
    """``quantize_act(..., return_sums=return_sums)`` written in torch operations: the same codes
    (and sums), bit for bit, on any device. Inside ``torch.compile`` the compiler fuses them into the
    kernel that produces ``x`` (a GroupNorm / SiLU / LayerNorm epilogue) instead of a separate
    quantize pass; without the sums that fusion is elementwise only (no extra reduction)."""
    ox = offset_for(qmin, qmax)
    ph, pw = _pair(pad, "pad")
    xf = x.float()
    if nhwc:
        if x.dim() != 4:
            raise ValueError(f"nhwc=True needs a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        if ph or pw:
            xf = F.pad(xf, (pw, pw, ph, ph))
        xf = xf.permute(0, 2, 3, 1)
    elif ph or pw:
        raise ValueError("pad is only used with nhwc=True (a convolution's input)")
    q = torch.clamp(torch.round(xf / sx.reshape(())) + zx.reshape(()), qmin, qmax) - ox
    if not return_sums:
        return q.to(torch.int8).contiguous()
    return q.to(torch.int8).contiguous(), q.sum(-1).to(torch.int32).contiguous()


def _launch_quantize(tm, xr, sx, zx, qmin, qmax, ph, pw, return_sums):
    """Codes of a contiguous NHWC ``xr`` ``[B, H, W, C]`` into a new zero-padded int8 NHWC tensor
    ``[B, H + 2*ph, W + 2*pw, C]`` (and its int32 per-pixel sums)."""
    bsz, h, w, c = xr.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    q = torch.empty((bsz, hp, wp, c), dtype=torch.int8, device=xr.device)
    rp = bsz * hp * wp
    block_c = min(64, triton_next_pow2(max(c, 1)))
    block_r = max(16, 1024 // block_c)
    grid = (triton_next_cdiv(rp, block_r), triton_next_cdiv(c, block_c))
    atomic = return_sums and grid[1] > 1
    alloc = torch.zeros if atomic or c == 0 else torch.empty     # c == 0: the sums of nothing
    sums = alloc((bsz, hp, wp), dtype=torch.int32, device=xr.device) if return_sums else q
    if q.numel():
        tm._quant_kernel[grid](xr, q, sums, sx, zx, h, w, hp, wp, rp, c, ph, pw, QMIN=qmin, QMAX=qmax,
                               WRITE_SUM=return_sums, ATOMIC_SUM=atomic, BLOCK_R=block_r, BLOCK_C=block_c,
                               num_warps=4)
    return (q, sums) if return_sums else q


def triton_next_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def prepare_weight(w_codes: torch.Tensor, zw: Union[torch.Tensor, float], ow: int):
    """Kernel-layout int8 weight and its per-channel constants from integer weight codes.

    ``w_codes``: ``[N, K]`` (linear) or ``[Cout, Cin, kh, kw]`` (conv, PyTorch layout) integer codes
    (any dtype holding integers) with ``ow - 128 <= code <= ow + 127``; ``zw``: per-channel zero-points
    (``[N]`` or broadcastable ``[N, 1, ...]``) or a scalar; ``ow``: 128 for a [0, 255] grid, 0 for
    [-128, 127]. Returns ``(w_int8, cb, bsum)``: ``w_int8 = w_codes - ow`` as ``[N, K]`` (linear)
    or ``[Cout, kh, kw, Cin]`` (conv), contiguous; ``cb = ow - zw`` and ``bsum = w_int8.sum(K)``,
    both int32 ``[N]``. Runs once per layer (it checks the codes, which syncs with the host).
    """
    if w_codes.dim() not in (2, 4):
        raise ValueError(f"w_codes must be [N, K] or [Cout, Cin, kh, kw], got shape {tuple(w_codes.shape)}")
    n = w_codes.shape[0]
    w = w_codes.to(torch.float64)
    if not torch.equal(w, torch.round(w)):
        raise ValueError("w_codes must hold integers")
    if w.numel() and (w.min() < ow - 128 or w.max() > ow + 127):
        raise ValueError(f"w_codes outside [{ow - 128}, {ow + 127}] for offset ow={ow}")
    if w_codes.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    b = (w - ow).to(torch.int8).contiguous()
    zw_t = torch.as_tensor(zw, dtype=torch.float64, device=w_codes.device)
    if zw_t.numel() == 1:
        zw_t = zw_t.reshape(1).expand(n)
    elif zw_t.numel() == n:
        zw_t = zw_t.reshape(n)
    else:
        raise ValueError(f"zw must be a scalar or have {n} elements, got {zw_t.numel()}")
    if not torch.equal(zw_t, torch.round(zw_t)):
        raise ValueError("zw must hold integers")
    cb = (ow - zw_t).to(torch.int32).contiguous()
    bsum = b.reshape(n, -1).to(torch.int64).sum(1).to(torch.int32).contiguous()
    return b, cb, bsum


# ---------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _heuristic(m: int, n: int) -> dict:
    bm = 128 if m >= 1024 else 64
    bn = 128 if n >= 128 else 64
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_stages=3, num_warps=4 if bm == 64 else 8)


def _grid(m: int, n: int, split: int):
    return lambda meta: (triton_next_cdiv(m, meta["BLOCK_M"]) * triton_next_cdiv(n, meta["BLOCK_N"]), split)


def _split_k(m: int, n: int, k: int, split_k: Optional[int]) -> int:
    """K-split count: explicit, or the default rule measured on an H100 (benchmarks/results/).

    Splitting helped there only with a moderate number of 128x128 output tiles (40..95) and long K
    (>= 1440 per split): 3x3 1280@16 (74 -> 53 us with 4 splits), 640@32, 320->640@32 (2 splits). It
    did not help, or hurt, with fewer tiles (3x3 @8, stride-2 640/1280: up to 1.8x slower) or short K
    (linears with K <= 2560), so those run unsplit.
    """
    if split_k is not None:
        if not isinstance(split_k, int) or not 1 <= split_k <= 16:
            raise ValueError(f"split_k must be an int in [1, 16], got {split_k!r}")
        return split_k
    tiles = triton_next_cdiv(m, 128) * triton_next_cdiv(n, 128)
    if not 40 <= tiles < 96 or k < 2880:
        return 1
    return max(1, min(8, triton_next_cdiv(132, tiles), k // 1440))


def _launch(tm, tuned, raw, args, flags, m, n, split, out, sx, sw, bias, sel):
    """Launch the GEMM kernel (autotuned or heuristic config), plus the split-K reduction if split > 1."""
    ws = torch.empty((split, m, n), dtype=torch.int32, device=out.device) if split > 1 else out
    args = args[:3] + (ws,) + args[3:]
    if _autotune():
        tuned[_grid(m, n, split)](*args, **flags, SPLIT_K=split)
    else:
        cfg = _heuristic(m, n)
        raw[_grid(m, n, split)(cfg)](*args, **flags, SPLIT_K=split, **cfg)
    if split > 1:
        grid = (triton_next_cdiv(m, 64), triton_next_cdiv(n, 128))
        tm._splitk_reduce_kernel[grid](ws, out, sx, sel if sel is not None else sx, sw,
                                       bias if bias is not None else sw, m, n, n, SPLIT_K=split,
                                       HAS_BIAS=bias is not None, HAS_SEL=sel is not None, BLOCK_M=64,
                                       BLOCK_N=128, num_warps=4)


def _check_gemm_args(w_int8, sx, ca, zx, sw, cb, bsum, bias, out_dtype, n, step=None):
    if w_int8.dtype != torch.int8 or not w_int8.is_contiguous():
        raise ValueError(f"w_int8 must be contiguous int8 (use prepare_weight), got {w_int8.dtype}")
    c, cname = (ca, "ca") if zx is None else (zx, "zx")
    if step is None:
        _check_scalar(sx, "sx")
        _check_scalar(c, cname)
    else:
        _check_step(step, sx, c, cname)
    _check_channel(sw, n, "sw", (torch.float32,))
    if cb is not None:
        _check_channel(cb, n, "cb", (torch.int32,))
    _check_channel(bsum, n, "bsum", (torch.int32,))
    if bias is not None:
        _check_channel(bias, n, "bias", _OUT_DTYPES)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def int8_linear(a_int8: torch.Tensor, w_int8: torch.Tensor, sx: torch.Tensor, ca: Optional[torch.Tensor],
                sw: torch.Tensor, cb: Optional[torch.Tensor], bsum: torch.Tensor, bias: Optional[torch.Tensor] = None,
                out_dtype: torch.dtype = torch.bfloat16, *, asum: Optional[torch.Tensor] = None,
                zx: Optional[torch.Tensor] = None, qmin: Optional[int] = None,
                qmax: Optional[int] = None, split_k: Optional[int] = None,
                step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 linear: ``out[M, N] = sx*sw[n]*(a @ b.T + ca*bsum[n] + cb[n]*asum[m] + K*ca*cb[n]) + bias[n]``.

    ``a_int8``: ``[..., K]`` int8 activations from :func:`quantize_act` (last dim contiguous);
    ``w_int8``: ``[N, K]`` int8 from :func:`prepare_weight`; ``sx``: 1-element float32 tensor;
    ``ca = ox - zx``: 1-element tensor (any dtype, integer value); ``sw`` ``[N]`` float32; ``cb``,
    ``bsum`` ``[N]`` int32; ``bias`` ``[N]`` or None. Returns ``[..., N]`` in ``out_dtype``.
    ``asum`` (optional, ``[...]`` int32 row sums of ``a``, from ``quantize_act(return_sums=True)``)
    skips the in-kernel row sums. ``cb=None`` means ``cb = 0`` (a symmetric weight grid: codes in
    ``[-128, 127]``, zero-points 0): the ``cb*asum`` terms vanish, so no row sum is formed or read
    (``asum`` must then be None).

    Fused-quantize mode: pass the float activation as ``a_int8`` together with ``zx``, ``qmin`` and
    ``qmax`` (and ``ca=None``): each tile is quantized in registers, bit-identical to
    :func:`quantize_act`, without writing the int8 tensor.

    ``split_k``: number of K splits (int32 partials summed exactly by a second small kernel);
    None picks one from the shape (more splits when there are too few output tiles to fill the GPU).

    ``step``: a 1-element integer device tensor (a denoiser's step index); ``sx`` and ``ca`` (or
    ``zx``) are then 1-d per-step tables, and the kernel reads entry ``step`` itself (no indexing
    kernel, no host sync; the caller keeps ``step`` in range, as :class:`~tfmq.runtime.steps.StepIndex` does).
    """
    tm = _kernels()
    fused = zx is not None
    if fused:
        if ca is not None or asum is not None or qmin is None or qmax is None:
            raise ValueError("fused-quantize mode takes zx, qmin, qmax and no ca / asum")
        offset_for(qmin, qmax)
        if not a_int8.is_floating_point():
            raise ValueError(f"fused-quantize mode needs a float activation, got {a_int8.dtype}")
    else:
        if qmin is not None or qmax is not None:
            raise ValueError("qmin / qmax are only used with zx (fused-quantize mode)")
        if a_int8.dtype != torch.int8:
            raise ValueError(f"a_int8 must be int8, got {a_int8.dtype}")
    if w_int8.dim() != 2 or a_int8.dim() < 1 or a_int8.shape[-1] != w_int8.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a_int8.shape)}, w {tuple(w_int8.shape)} (need [..., K], [N, K])")
    n, k = w_int8.shape
    if k > MAX_K:
        raise ValueError(f"K={k} > {MAX_K}: the int32 accumulator could overflow")
    _check_gemm_args(w_int8, sx, ca, zx, sw, cb, bsum, bias, out_dtype, n, step)
    if cb is None and asum is not None:
        raise ValueError("asum is only used with cb (cb=None: a symmetric weight grid needs no activation sums)")
    _check_device(a_int8, w_int8, sx, zx if fused else ca, sw, bsum,
                  *(t for t in (cb, bias, asum, step) if t is not None))
    lead = a_int8.shape[:-1]
    a2 = a_int8.reshape(-1, k)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m = a2.shape[0]
    if asum is not None:
        if asum.dtype != torch.int32 or tuple(asum.shape) != tuple(lead):
            raise ValueError(f"asum must be int32 of shape {tuple(lead)}, got {asum.dtype} {tuple(asum.shape)}")
        asum = asum.reshape(-1).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a_int8.device)
    if m == 0:
        return out.reshape(*lead, n)
    if k == 0:
        raise ValueError("K must be positive")
    args = (a2, w_int8, out, sx, zx if fused else sx, ca if not fused else sx, step if step is not None else sx,
            sw, cb if cb is not None else bsum, bsum, bias if bias is not None else sw,
            asum if asum is not None else bsum, m, n, k, a2.stride(0), w_int8.stride(0), out.stride(0))
    flags = dict(A_FLOAT=fused, QMIN=qmin if fused else 0, QMAX=qmax if fused else 255,
                 HAS_BIAS=bias is not None, HAS_ASUM=asum is not None, HAS_SEL=step is not None,
                 HAS_CB=cb is not None)
    _launch(tm, tm.int8_linear_tuned, tm._int8_linear_kernel, args, flags, m, n, _split_k(m, n, k, split_k),
            out, sx, sw, bias, step)
    return out.reshape(*lead, n)


def _pair(v, name) -> tuple:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def int8_conv2d(a_int8: torch.Tensor, w_int8: torch.Tensor, stride, padding, sx: torch.Tensor,
                ca: Optional[torch.Tensor], sw: torch.Tensor, cb: Optional[torch.Tensor], bsum: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16, *,
                asum: Optional[torch.Tensor] = None, zx: Optional[torch.Tensor] = None,
                qmin: Optional[int] = None, qmax: Optional[int] = None,
                split_k: Optional[int] = None, padded: bool = False,
                step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 conv2d (groups=1, dilation 1) as an implicit GEMM on int8 tensor cores.

    ``a_int8``: NHWC int8 ``[B, H, W, Cin]`` (contiguous) from ``quantize_act(..., nhwc=True)``;
    ``w_int8``: ``[Cout, kh, kw, Cin]`` from :func:`prepare_weight`; ``stride``/``padding``: int or
    pair; zero padding of the real input uses the code of 0, ``a = -ca``. Scalars / per-channel
    tensors as in :func:`int8_linear`; ``asum`` (optional): per-pixel channel sums ``[B, H, W]``
    int32 from ``quantize_act(..., nhwc=True, return_sums=True)`` (window sums are formed in the
    epilogue). Returns ``[B, Cout, Ho, Wo]`` in ``out_dtype`` with channels_last memory (the NHWC
    buffer ``[B, Ho, Wo, Cout]`` permuted).

    Fused-quantize mode: pass the float activation ``[B, Cin, H, W]`` (channels_last memory) as
    ``a_int8`` with ``zx``, ``qmin``, ``qmax`` and ``ca=None``; tiles are quantized in registers
    (a padded real zero quantizes to ``zx``, the same pad code). ``split_k`` as in :func:`int8_linear`.

    ``padded=True`` (the runtime's path, fastest): ``a_int8`` is already padded by ``padding``,
    ``[B, H + 2*ph, W + 2*pw, Cin]``, and ``asum`` (required) its padded per-pixel sums, both from
    ``quantize_act(x, ..., nhwc=True, return_sums=True, pad=padding)``; the kernel then reads the
    input with one offset per K step and no bounds checks. ``cb=None`` (symmetric weights) as in
    :func:`int8_linear`: no sums, so ``asum`` is None, padded or not.

    ``step``: per-step parameter tables read in the kernel, as in :func:`int8_linear`.
    """
    tm = _kernels()
    fused = zx is not None
    sh, sw_ = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if sh < 1 or sw_ < 1 or ph < 0 or pw < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    if cb is None and asum is not None:
        raise ValueError("asum is only used with cb (cb=None: a symmetric weight grid needs no activation sums)")
    if padded and (fused or (asum is None and cb is not None)):
        raise ValueError("padded=True takes int8 codes padded by quantize_act(..., pad=padding) and their "
                         "sums as asum (no fused-quantize mode)")
    if fused:
        if ca is not None or asum is not None or qmin is None or qmax is None:
            raise ValueError("fused-quantize mode takes zx, qmin, qmax and no ca / asum")
        offset_for(qmin, qmax)
        if not a_int8.is_floating_point() or a_int8.dim() != 4:
            raise ValueError(f"fused-quantize mode needs a float [B, C, H, W] activation, got {a_int8.dtype} "
                             f"{tuple(a_int8.shape)}")
        if not a_int8.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("fused-quantize mode needs the activation in channels_last memory")
        a = a_int8.permute(0, 2, 3, 1)
    else:
        if qmin is not None or qmax is not None:
            raise ValueError("qmin / qmax are only used with zx (fused-quantize mode)")
        if a_int8.dtype != torch.int8 or a_int8.dim() != 4 or not a_int8.is_contiguous():
            raise ValueError(f"a_int8 must be a contiguous NHWC int8 [B, H, W, Cin] tensor, got {a_int8.dtype} "
                             f"{tuple(a_int8.shape)}")
        a = a_int8
    if w_int8.dim() != 4 or w_int8.shape[3] != a.shape[3]:
        raise ValueError(f"shape mismatch: a NHWC {tuple(a.shape)}, w {tuple(w_int8.shape)} "
                         "(need [B, H, W, Cin], [Cout, kh, kw, Cin])")
    bsz, h, w, cin = a.shape
    hp, wp = h, w
    if padded:
        h, w = hp - 2 * ph, wp - 2 * pw
        if h < 1 or w < 1:
            raise ValueError(f"padded input {hp}x{wp} is smaller than its padding {ph}, {pw}")
    cout, kh, kw, _ = w_int8.shape
    if kh * kw * cin > MAX_K:
        raise ValueError(f"K={kh * kw * cin} > {MAX_K}: the int32 accumulator could overflow")
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw_ + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"empty output for input {h}x{w}, kernel {kh}x{kw}, stride {stride}, padding {padding}")
    _check_gemm_args(w_int8, sx, ca, zx, sw, cb, bsum, bias, out_dtype, cout, step)
    _check_device(a, w_int8, sx, zx if fused else ca, sw, bsum,
                  *(t for t in (cb, bias, asum, step) if t is not None))
    sel = step if step is not None else sx
    if asum is not None:
        if asum.dtype != torch.int32 or tuple(asum.shape) != (bsz, hp, wp) or not asum.is_contiguous():
            raise ValueError(f"asum must be contiguous int32 [B, H, W] = {(bsz, hp, wp)}, got {asum.dtype} "
                             f"{tuple(asum.shape)}")
    out = torch.empty((bsz, ho, wo, cout), dtype=out_dtype, device=a.device)
    m = bsz * ho * wo
    if m and padded:
        args = (a, w_int8, out, sx, ca, sel, sw, cb if cb is not None else bsum, bsum,
                bias if bias is not None else sw, asum if asum is not None else bsum,
                bsz, hp, wp, cin, ho, wo, cout)
        flags = dict(KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw_, HAS_BIAS=bias is not None,
                     HAS_SEL=step is not None, HAS_CB=cb is not None)
        _launch(tm, tm.int8_conv_padded_tuned, tm.int8_conv_padded, args, flags, m, cout,
                _split_k(m, cout, kh * kw * cin, split_k), out, sx, sw, bias, step)
    elif m:
        args = (a, w_int8, out, sx, zx if fused else sx, ca if not fused else sx, sel, sw,
                cb if cb is not None else bsum, bsum, bias if bias is not None else sw,
                asum if asum is not None else bsum, bsz, h, w, cin, ho, wo, cout)
        flags = dict(KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw_, PAD_H=ph, PAD_W=pw, A_FLOAT=fused,
                     QMIN=qmin if fused else 0, QMAX=qmax if fused else 255,
                     HAS_BIAS=bias is not None, HAS_ASUM=asum is not None, HAS_SEL=step is not None,
                     HAS_CB=cb is not None)
        _launch(tm, tm.int8_conv_tuned, tm._int8_conv_kernel, args, flags, m, cout,
                _split_k(m, cout, kh * kw * cin, split_k), out, sx, sw, bias, step)
    return out.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# pure-torch references (any device; float64 / int64, exact integer part)
# ---------------------------------------------------------------------------------------------

def ref_quantize_act(x: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Reference codes ``clamp(round(x.float() / sx) + zx, qmin, qmax) - ox`` as int8 (same layout as x)."""
    ox = offset_for(qmin, qmax)
    q = torch.clamp(torch.round(x.float() / sx.float().reshape(())) + zx.float().reshape(()), qmin, qmax)
    return (q - ox).to(torch.int8)


def _ref_epilogue(acc, sx, sw, bias):
    out = acc.to(torch.float64) * (sx.double().reshape(()) * sw.double())
    if bias is not None:
        out = out + bias.double()
    return out


def ref_linear(a_int8: torch.Tensor, w_int8: torch.Tensor, sx: torch.Tensor, ca: torch.Tensor,
               sw: torch.Tensor, cb: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 reference of :func:`int8_linear`, through the same integer decomposition (int64 exact).

    ``acc = a @ b.T + ca*bsum + cb*asum + K*ca*cb`` with ``bsum``/``asum`` summed here; returns
    ``sx*sw*acc + bias`` as float64 ``[..., N]``.
    """
    k = a_int8.shape[-1]
    a = a_int8.reshape(-1, k).to(torch.int64)
    b = w_int8.reshape(w_int8.shape[0], -1).to(torch.int64)
    c = ca.to(torch.int64).reshape(())
    cbl = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device) if cb is None else cb.to(torch.int64)
    # exact: the int64 values stay far below 2**53, so the float64 matmul is exact too
    dot = (a.double() @ b.double().T).to(torch.int64)
    acc = dot + c * b.sum(1)[None, :] + cbl[None, :] * a.sum(1)[:, None] + k * c * cbl[None, :]
    return _ref_epilogue(acc, sx, sw, bias).reshape(*a_int8.shape[:-1], b.shape[0])


def ref_conv2d(a_int8: torch.Tensor, w_int8: torch.Tensor, stride, padding, sx: torch.Tensor,
               ca: torch.Tensor, sw: torch.Tensor, cb: Optional[torch.Tensor],
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 reference of :func:`int8_conv2d` (NHWC int8 input, ``[Cout, kh, kw, Cin]`` weight).

    Pads the int8 codes with ``-ca`` (the code of a real zero), forms im2col patches and applies the
    integer decomposition of :func:`ref_linear`. Returns float64 ``[B, Cout, Ho, Wo]``.
    """
    sh, sw_ = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    cout, kh, kw, cin = w_int8.shape
    c = ca.to(torch.int64).reshape(())
    x = a_int8.permute(0, 3, 1, 2).double()
    x = F.pad(x, (pw, pw, ph, ph), value=float(-c))
    bsz = x.shape[0]
    cols = F.unfold(x, (kh, kw), stride=(sh, sw_))          # [B, Cin*kh*kw, L], order (cin, r, s)
    ho = (a_int8.shape[1] + 2 * ph - kh) // sh + 1
    wo = (a_int8.shape[2] + 2 * pw - kw) // sw_ + 1
    cols = cols.reshape(bsz, cin, kh, kw, -1).permute(0, 4, 2, 3, 1).reshape(bsz * ho * wo, kh * kw * cin)
    out = ref_linear(cols.to(torch.int64), w_int8.reshape(cout, -1), sx, ca, sw, cb, bias)
    return out.reshape(bsz, ho, wo, cout).permute(0, 3, 1, 2)
