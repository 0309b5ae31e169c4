"""Calling a compiled denoiser without re-checking Dynamo's guards on every call.

Before each call of a ``torch.compile``-d function, Dynamo checks its guards: the type, shape and
identity facts about every module, attribute and tensor the compiled code read. A converted
quantized denoiser reads several thousand small tensors (packed codes, scales, zero points, the
int8 kernels' tables) and Python attributes, so its guard tree is large: on the SD-v1.5-structured
UNet (naive W8A8, w8a8 tables, 2425 graph inputs) a compiled call spent 5.2 ms of host time
before its graph ran, against 0.45 ms for the full-precision UNet (689 inputs), on this project's
2-core CPU machine (``benchmarks/bench_host_overhead.py``, results/inference/host_overhead_cpu.json);
under CUDA graphs that host time is GPU idle time whenever it exceeds the graph's run time.
Skipping the check after a signature's first call: 0.36 ms (full precision: 0.09 ms).

A converted denoiser does not change after conversion: its tensors are updated in place (the step
index) and its attributes stay as they are. So once a call with a given *input signature* (the
shapes, dtypes, devices and strides of the tensor arguments, the other arguments' values, and the
global state Dynamo guards on: grad / inference mode, autocast, default dtype, deterministic
algorithms) has run with the guards checked, later calls with the same signature run under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: Dynamo then checks only the guards
that tell its cache entries apart. A new signature runs with the full check first (and compiles
if it must). What is NOT re-checked is the model itself: do not change a compiled denoiser's
attributes or replace its tensors; load it again instead.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Hashable

import torch
from torch import nn

#: whether this PyTorch has ``torch.compiler.set_stance(..., skip_guard_eval_unsafe=...)``
CAN_SKIP_GUARDS = (hasattr(torch.compiler, "set_stance")
                   and "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters)


class _Unhashable(Exception):
    pass


def _arg_key(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, value.device,
                value.requires_grad, value.is_inference())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_arg_key(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _arg_key(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, value)
    raise _Unhashable(type(value).__name__)


def _global_state() -> tuple:
    autocast = tuple((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                     for dev in ("cpu", "cuda"))
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


def call_signature(args: tuple, kwargs: dict) -> Hashable | None:
    """The input signature of a call (see the module docstring), or None where an argument is of a
    kind this does not describe (such calls always run with the full guard check)."""
    try:
        return (_arg_key(args), _arg_key(kwargs), _global_state())
    except _Unhashable:
        return None


class SkipGuardsAfterFirstCall:
    """Wrap a ``torch.compile``-d callable: each input signature's first call runs with Dynamo's
    full guard check, later calls with the same signature skip it (see the module docstring).

    ``seen`` holds the signatures that have run; ``skipped`` counts the calls that skipped the
    check. Without ``skip_guard_eval_unsafe`` in this PyTorch (``CAN_SKIP_GUARDS`` False) every call
    runs with the full check."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.seen: set = set()
        self.skipped = 0

    def __call__(self, *args, **kwargs):
        key = call_signature(args, kwargs) if CAN_SKIP_GUARDS else None
        if key is not None and key in self.seen:
            self.skipped += 1
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(*args, **kwargs)
        out = self.fn(*args, **kwargs)
        if key is not None:
            self.seen.add(key)
        return out


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` as a parameter that needs no gradient.

    The runtime keeps its tensors (codes, scales, zero points, kernel tables) as such parameters
    rather than buffers or plain tensors: Dynamo adds per-call checks for every tensor of a
    compiled model that is not an ``nn.Parameter`` (an aliasing check, and a tensor check it keeps
    even under ``skip_guard_eval_unsafe``). Measured on the SD-v1.5-structured UNet (naive W8A8,
    w8a8 tables, this project's CPU machine, ``benchmarks/bench_host_overhead.py``): a call that
    skips the guards took 13.3 ms of host time with buffers and 0.36 ms with parameters; one that
    checks them 7.8 and 5.2 ms."""
    return nn.Parameter(tensor, requires_grad=False)


def register_frozen(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` on ``module`` as a :func:`frozen` parameter named ``name``."""
    module.register_parameter(name, frozen(tensor))
