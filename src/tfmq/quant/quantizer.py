"""Uniform affine fake quantizer and its range initialisation.

``q = clamp(round(x / s) + z, lo, hi)`` and ``x_hat = (q - z) * s``. Rounding uses the
straight-through estimator so that scales (and the inputs) receive gradients.

A quantizer is per output channel (``channel_axis=0``, used for weights) or per tensor
(``channel_axis=None``, used for activations). It can hold several *parameter sets*
(``n_sets > 1``): one scale / zero-point per sampling step, selected by ``set_index``. That is
how finite set calibration (FSC) is represented; with one set it is an ordinary quantizer.
``set_index`` is an int (one set for the whole call, as while sampling) or, for per-tensor
quantizers, a LongTensor with one set per row of the batch (calibration batches that mix steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import fused

#: Number of shrink candidates of the MSE range search (the reference code's value).
MSE_CANDIDATES = 80
#: Norm of the MSE range search's error (the reference code's value).
MSE_P = 2.4
from ..choices import SUPPORTED_BITS  # noqa: E402  (2..8; torch-free for the CLI)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return (x.round() - x).detach() + x


def check_bits(bits: int, what: str = "bits", allow_fp: bool = True) -> int:
    """Validate a bit width: 2..8 for quantization, 32 (= full precision) where allowed."""
    if allow_fp and bits == 32:
        return bits
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        allowed = "2..8" + (" or 32 (full precision)" if allow_fp else "")
        raise ValueError(f"unsupported {what}: {bits!r}; use {allowed}")
    return bits


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantizer.

    Args:
        bits: bit width, 2..8 (16 is also accepted for softmax outputs).
        symmetric: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` with zero-point 0; otherwise an
            unsigned grid ``[0, 2^b - 1]`` with a learned-free integer zero-point.
        channel_axis: axis with one scale per index (weights: 0), or None for per tensor.
        n_sets: number of parameter sets (FSC: one per sampling step).
    """

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = None,
                 n_sets: int = 1):
        super().__init__()
        if bits not in SUPPORTED_BITS and bits != 16:
            raise ValueError(f"unsupported quantizer bit width {bits}; use 2..8 or 16")
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        self.n_sets = n_sets
        self.set_index = 0
        self.enabled = True
        # scale and zero-point are created lazily once the channel count is known
        self.scale = nn.Parameter(torch.empty(0), requires_grad=False)
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("initialized", torch.zeros(n_sets, dtype=torch.bool))

    # ---- grid -----------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def _param_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.channel_axis is None:
            return ()
        shape = [1] * x.dim()
        shape[self.channel_axis] = x.shape[self.channel_axis]
        return tuple(shape)

    def _ensure_params(self, x: torch.Tensor) -> None:
        shape = (self.n_sets,) + self._param_shape(x)
        if tuple(self.scale.shape) != shape:    # on the quantizer's device, wherever x was observed
            device = self.initialized.device
            self.scale.data = torch.ones(shape, device=device, dtype=torch.float32)
            self.zero_point = torch.zeros(shape, device=device, dtype=torch.float32)

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point of the active parameter set."""
        i = self.set_index if self.n_sets > 1 else 0
        if torch.is_tensor(i):
            i = i.to(self.scale.device)
        return self.scale[i], self.zero_point[i]

    # ---- ranges ---------------------------------------------------------------
    def params_from_range(self, x_min: torch.Tensor, x_max: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point that map ``[x_min, x_max]`` (widened to contain 0) on the grid."""
        x_min = torch.minimum(x_min, torch.zeros_like(x_min))
        x_max = torch.maximum(x_max, torch.zeros_like(x_max))
        if self.symmetric:
            bound = torch.maximum(x_min.abs(), x_max)
            scale = bound / ((self.qmax - self.qmin) / 2)
            scale = torch.clamp(scale, min=1e-8)
            zero = torch.zeros_like(scale)
        else:
            scale = torch.clamp((x_max - x_min) / (self.qmax - self.qmin), min=1e-8)
            zero = torch.round(-x_min / scale)
        return scale, zero

    def set_range(self, x_min: torch.Tensor, x_max: torch.Tensor, like: torch.Tensor,
                  set_index: int | None = None) -> None:
        """Set the parameters of one set (or all sets when ``set_index`` is None) from a range."""
        self._ensure_params(like)
        scale, zero = self.params_from_range(x_min.float(), x_max.float())
        shape = self._param_shape(like)
        idx = slice(None) if set_index is None else set_index
        self.scale.data[idx] = scale.reshape(shape).to(self.scale.device)
        self.zero_point[idx] = zero.reshape(shape).to(self.zero_point.device)
        self.initialized[idx] = True

    # ---- quantization ----------------------------------------------------------
    def to_int(self, x: torch.Tensor, scale=None, zero=None) -> torch.Tensor:
        """Integer codes of ``x`` (float tensor holding integers, no gradient)."""
        if scale is None:
            scale, zero = self.current()
        return torch.clamp(torch.round(x / scale) + zero, self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor, scale=None, zero=None) -> torch.Tensor:
        if scale is None:
            scale, zero = self.current()
        return (q - zero) * scale

    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if scale.numel() == 1 and zero.numel() == 1 and fused.applies(x) and scale.dtype == x.dtype:
            return fused.fake_quant(x, scale, zero, self.qmin, self.qmax)
        q = torch.clamp(round_ste(x / scale) + zero, self.qmin, self.qmax)
        return (q - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.scale.numel() == 0:
            raise RuntimeError("quantizer used before its range was initialised")
        scale, zero = self.current()
        if self.n_sets > 1 and torch.is_tensor(self.set_index) and self.set_index.dim() == 1:
            scale, zero = self._per_row(x, scale, zero)
        return self.fake_quant(x, scale.to(x.dtype), zero.to(x.dtype))

    def _per_row(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """Broadcast per-row parameters (one set per batch row) over ``x``'s other dimensions."""
        rows = self.set_index.shape[0]
        if self.channel_axis is not None or x.dim() == 0 or x.shape[0] != rows:
            raise RuntimeError(
                f"per-row parameter sets ({rows} rows) need a per-tensor quantizer whose input has the "
                f"batch first; got input shape {tuple(x.shape)}")
        shape = (rows,) + (1,) * (x.dim() - 1)
        return scale.reshape(shape), zero.reshape(shape)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        sym = "sym" if self.symmetric else "asym"
        sets = f", sets={self.n_sets}" if self.n_sets > 1 else ""
        return f"bits={self.bits}, {sym}, {kind}{sets}"


# ---- range search -----------------------------------------------------------------
def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if d != channel_axis] if channel_axis is not None else list(range(x.dim()))


def minmax_range(x: torch.Tensor, channel_axis: int | None = None):
    """Per-channel (or per-tensor) minimum and maximum."""
    if channel_axis is None:
        return x.min().reshape(1), x.max().reshape(1)
    flat = x.transpose(0, channel_axis).reshape(x.shape[channel_axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def mse_range(quantizer: UniformQuantizer, x: torch.Tensor, channel_axis: int | None = None,
              candidates: int = MSE_CANDIDATES, p: float = MSE_P, chunk: int = 10):
    """Shrink min and max together by ``1 - 0.01 i`` (i < candidates) and keep, per channel,
    the range with the lowest ``L_p`` reconstruction error. Vectorised over channels and over
    chunks of candidates."""
    x = x.detach().float()
    if channel_axis is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, channel_axis).reshape(x.shape[channel_axis], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for start in range(0, candidates, chunk):
        f = 1.0 - 0.01 * torch.arange(start, min(start + chunk, candidates), device=x.device)
        c_lo = lo[None, :] * f[:, None]                      # [k, C]
        c_hi = hi[None, :] * f[:, None]
        scale, zero = quantizer.params_from_range(c_lo, c_hi)  # [k, C]
        s, z = scale[..., None], zero[..., None]
        q = torch.clamp(torch.round(flat[None] / s) + z, quantizer.qmin, quantizer.qmax)
        err = ((q - z) * s - flat[None]).abs().pow(p).mean(dim=-1)   # [k, C]
        e_min, arg = err.min(dim=0)
        better = e_min < best_err
        best_err = torch.where(better, e_min, best_err)
        best_lo = torch.where(better, c_lo.gather(0, arg[None]).squeeze(0), best_lo)
        best_hi = torch.where(better, c_hi.gather(0, arg[None]).squeeze(0), best_hi)
    return best_lo, best_hi


def percentile_range(x: torch.Tensor, channel_axis: int | None = None, percentile: float = 99.99,
                     max_samples: int = 1 << 22):
    """Range from the lower and upper percentiles (per channel or per tensor)."""
    x = x.detach().float()
    flat = x.reshape(1, -1) if channel_axis is None else x.transpose(0, channel_axis).reshape(x.shape[channel_axis], -1)
    if flat.shape[1] > max_samples:  # torch.quantile's input limit; a fixed stride keeps it deterministic
        flat = flat[:, :: math.ceil(flat.shape[1] / max_samples)]
    q = torch.tensor([1 - percentile / 100, percentile / 100], device=flat.device)
    lo_hi = torch.quantile(flat, q, dim=1)
    return lo_hi[0], lo_hi[1]


def init_range(quantizer: UniformQuantizer, x: torch.Tensor, method: str = "mse",
               set_index: int | None = None, percentile: float = 99.99) -> None:
    """Initialise ``quantizer`` from data ``x`` by ``minmax``, ``mse`` or ``percentile``."""
    axis = quantizer.channel_axis
    if method == "minmax":
        lo, hi = minmax_range(x, axis)
    elif method == "mse":
        lo, hi = mse_range(quantizer, x, axis)
    elif method == "percentile":
        lo, hi = percentile_range(x, axis, percentile)
    else:
        raise ValueError(f"unknown range method {method!r}; use minmax, mse or percentile")
    quantizer.set_range(lo, hi, x, set_index=set_index)
