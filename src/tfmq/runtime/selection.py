"""Choosing the backend of a converted denoiser, and saying how its layers compute.

:func:`set_backend` checks that the backend can run where the model is, then lets it prepare each
quantized layer (its own weight layouts, from the packed codes; ``w8a8`` also fuses attention
projections of one input, :mod:`.projections`); :func:`backend_summary` counts the layers that run
the backend's own kernels and those on the reference math, and the fused projection groups.
"""

from __future__ import annotations

import itertools

from torch import nn

from .backends import BackendUnavailable, get_backend
from .layers import runtime_layers
from .projections import fuse_attention_projections, unfuse_attention_projections


def set_backend(denoiser: nn.Module, name: str) -> nn.Module:
    """Run every quantized layer of a converted denoiser with backend ``name`` (in place).
    Raises :class:`BackendUnavailable` before changing anything when it cannot run here."""
    backend = get_backend(name)
    layers = runtime_layers(denoiser)
    if not layers:
        raise ValueError("this denoiser has no quantized runtime layers: convert it first "
                         "(tfmq.runtime.convert) or load a checkpoint with tfmq.load")
    first = next(iter(layers.values()))
    device = next(itertools.chain(first.parameters(), first.buffers(), denoiser.parameters())).device
    reason = backend.available(device)
    if reason is not None:
        raise BackendUnavailable(reason)
    unfuse_attention_projections(denoiser)
    for layer in layers.values():
        backend.prepare(layer)
        layer.backend = name
    if name == "w8a8" and backend.fuse_projections:
        fuse_attention_projections(denoiser, backend)
    for m in denoiser.modules():
        if hasattr(m, "quantizers") and hasattr(m, "softmax") and hasattr(m, "backend"):
            m.backend = name                                  # attention parameters
    denoiser.tfmq_backend = name
    return denoiser


def backend_summary(denoiser: nn.Module) -> dict:
    """How the layers of a converted denoiser compute: the backend, how many of its layers run the
    backend's own kernels vs the reference math, how many attention projection groups run as one
    GEMM, and how many attentions run each path (``flash``, ``fused`` quantized-probability kernel,
    ``explicit`` matmuls; see :class:`tfmq.runtime.layers.RuntimeAttnProcessor`)."""
    layers = runtime_layers(denoiser)
    name = getattr(denoiser, "tfmq_backend", "reference")
    backend = get_backend(name)
    own = sum(1 for l in layers.values() if backend.handles(l))
    fused = sum(1 for m in denoiser.modules() if getattr(m, "_tfmq_fused", None) is not None)
    attention = {"flash": 0, "fused": 0, "explicit": 0}
    for m in denoiser.modules():
        if getattr(m, "tfmq_attn", None) is not None and hasattr(m.processor, "path"):
            attention[m.processor.path(m)] += 1
    return {"backend": name, "layers": len(layers), "backend_kernels": own,
            "reference_math": len(layers) - own, "fused_projection_groups": fused, "attention": attention}
