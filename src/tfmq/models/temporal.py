"""The temporal information block (TIB) of a denoiser and its temporal features, for every family.

In a diffusion model the time step reaches the network through a path that depends on ``t``
(and the class label, where the model has one) alone: a UNet's time embedding and every resnet's
``time_emb_proj``, a DiT's adaLN-Zero embedders and modulation linears, PixArt's adaLN-single.
The adapter of each family (:mod:`tfmq.models.unet`, :mod:`tfmq.models.dit`,
:mod:`tfmq.models.pixart`) names the block's modules (:class:`TemporalBlock`) and computes the
temporal features; this module is the family-independent entry point. TFMQ-DM reconstructs the
block as one unit (TIAR), calibrates its activations per step (FSC) and may replace it by a
table of its FP outputs (the temporal cache); every other unit's reconstruction leaves its
layers alone (:func:`tib_layer_names`).

Helpers here work on FP and on quantized (wrapped) denoisers alike: the block's modules are
looked up by name, so a wrapped layer runs with its quantizers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.layers import QuantLayer
from ..runtime.steps import call_arguments, timestep_key  # noqa: F401  (re-exported)
from .adapter import adapter_for
from .base import TemporalBlock, UnsupportedModelError  # noqa: F401  (re-exported)


def find_temporal_block(denoiser: nn.Module) -> TemporalBlock:
    """The TIB of ``denoiser`` (FP or quantized), from its family's adapter."""
    return adapter_for(denoiser).temporal_block(denoiser)


def _layers_under(root: nn.Module, prefix: str) -> list[str]:
    """Conv2d / Linear layers (wrapped or not) inside ``root``, by full name."""
    out = []

    def walk(m: nn.Module, name: str) -> None:
        if isinstance(m, (QuantLayer, nn.Linear, nn.Conv2d)):
            out.append(name)
            return                                  # a QuantLayer's inner layer is the same layer
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(root, prefix)
    return out


def tib_layer_names(denoiser: nn.Module) -> list[str]:
    """Names of the TIB's Conv2d / Linear layers (as ``quantizable_layers`` names them).

    These are reconstructed by TIAR and must be excluded from every other unit's
    reconstruction. Embedding tables (``nn.Embedding``) are not quantizable layers."""
    block = find_temporal_block(denoiser)
    names = []
    for root in block.roots:
        names.extend(_layers_under(denoiser.get_submodule(root), root))
    return names


def step_layer_names(denoiser: nn.Module) -> list[str]:
    """The TIB layers whose inputs depend on the step: the ones finite set calibration gives one
    activation parameter set per step (the block's ``step_free`` modules excluded)."""
    free = tuple(n + "." for n in find_temporal_block(denoiser).step_free)
    return [n for n in tib_layer_names(denoiser) if not n.startswith(free)]


# ---- computing the temporal features ----------------------------------------------------------
def _as_timesteps(timesteps, batch: int | None, device) -> torch.Tensor:
    t = timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)
    if t.dim() == 0:
        t = t[None]
    if batch is not None and t.shape[0] == 1 and batch > 1:
        t = t.expand(batch)
    return t.to(device)


def temporal_features(denoiser: nn.Module, timesteps, class_labels: torch.Tensor | None = None,
                      cond: dict[str, torch.Tensor] | None = None, block: TemporalBlock | None = None,
                      step_index: int | None = None) -> list[torch.Tensor]:
    """All temporal features ``[g_0, ..., g_n]`` (each ``[B, C_i]``) for a batch of timesteps
    (and class labels, and for blocks that also read them the other conditioning rows ``cond``:
    ``encoder_hidden_states``, ``text_embeds``, ``time_ids``, ``resolution``, ...).

    Works on FP, quantized and feature-cached denoisers. ``step_index`` selects the per-step
    activation parameters (FSC) of a quantized denoiser; a cached denoiser answers from its cache.
    """
    cache = getattr(denoiser, "tfmq_temporal_cache", None)
    if cache is not None:
        return cache.features_for(timesteps, class_labels)
    if step_index is not None:
        from ..quant.model import set_step
        set_step(denoiser, step_index)
    adapter = adapter_for(denoiser)
    block = block or adapter.temporal_block(denoiser)
    device = next(denoiser.parameters()).device
    cond = {k: v.to(device) for k, v in (cond or {}).items()
            if k not in ("sample", "timestep", "class_labels", "step")}
    batch = class_labels.shape[0] if class_labels is not None else None
    if batch is None and cond:
        batch = next(iter(cond.values())).shape[0]
    t = _as_timesteps(timesteps, batch, device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    return adapter.temporal_features(denoiser, t, class_labels, cond, block)


# ---- the finite set of temporal inputs ------------------------------------------------------------
def model_classes(denoiser: nn.Module) -> list[int] | None:
    """Every class id of a class-conditional model with an embedding table (null class
    included), or None when the model takes no finite set of class labels."""
    return adapter_for(denoiser).class_table(denoiser)


def finite_set(timesteps: list[int], classes: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Every (timestep, class) pair of the finite set, step-major.

    Returns ``(t, labels, step)``: long tensors of length ``len(timesteps) * len(classes)``
    (``labels`` None for unconditional models), ``step[j]`` being the index of ``t[j]`` in
    ``timesteps``."""
    n_c = len(classes) if classes else 1
    step = torch.arange(len(timesteps)).repeat_interleave(n_c)
    t = torch.tensor([int(x) for x in timesteps], dtype=torch.long)[step]
    labels = torch.tensor(classes, dtype=torch.long).repeat(len(timesteps)) if classes else None
    return t, labels, step
