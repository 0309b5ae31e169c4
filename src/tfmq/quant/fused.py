"""Fused CUDA kernels for the calibration loops' elementwise work, and the switch that turns them
off.

In the reconstruction and activation-step loops (:mod:`tfmq.calib.loop`) an iteration of a small
unit is a few convolutions and a long tail of elementwise operations: AdaRound's soft weight and
regulariser (about 35 kernels a layer, forward and backward) and every activation fake-quant
(about 20). On a GPU the loop is bound by their number, not by arithmetic. On CUDA tensors
(float32) these three computations run as one Triton kernel forward and one backward each
(:mod:`tfmq.quant._fused_triton`; reductions are per-block partial sums added in a fixed order, so
results do not depend on thread scheduling):

* :func:`soft_weight` / :func:`regularizer`: :class:`~tfmq.quant.adaround.AdaRound` inside
  ``fixed_grid`` (the loops);
* :func:`fake_quant`: :class:`~tfmq.quant.quantizer.UniformQuantizer` with one scale and
  zero-point (per-tensor activations). Its forward is bit for bit the torch expression
  (correctly rounded division, round half to even).

Gradients agree with the torch code to float32 rounding (operation order differs; the sigmoid
and the power come from CUDA's libdevice). The CPU always runs the torch code, which is the
numerics reference; ``tests/test_fused_calibration.py`` compares the two on a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_STATE = {"enabled": True}


@contextmanager
def fused_kernels(enabled: bool):
    """Within the block the fused CUDA kernels are used (``True``, the default) or not
    (``False``: the torch code everywhere, for comparisons and for ruling the kernels out)."""
    old = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _STATE["enabled"] = old


def applies(t: torch.Tensor) -> bool:
    """Whether the fused kernels handle a computation on ``t`` (float32 on CUDA, switch on)."""
    return _STATE["enabled"] and t.is_cuda and t.dtype == torch.float32


def soft_weight(alpha, w_floor, scale, zero, qmin, qmax, zeta, gamma) -> torch.Tensor:
    """AdaRound's soft-rounded weight ``(clamp(w_floor + h(alpha) + zero, qmin, qmax) - zero) * scale``."""
    from ._fused_triton import SoftWeight
    return SoftWeight.apply(alpha, w_floor, scale, zero, qmin, qmax, zeta, gamma)


def regularizer(alpha, beta, zeta, gamma) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2 h(alpha) - 1|^beta)`` (``beta`` a 0-d device tensor)."""
    from ._fused_triton import Regularizer
    return Regularizer.apply(alpha, beta, zeta, gamma)


def fake_quant(x, scale, zero, qmin, qmax) -> torch.Tensor:
    """Per-tensor fake quantization with straight-through rounding (0-d ``scale`` / ``zero``)."""
    from ._fused_triton import FakeQuant
    return FakeQuant.apply(x, scale, zero, qmin, qmax)
