"""Load diffusers pipelines, find their denoiser and list its quantizable layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

SUPPORTED_DENOISERS = (UNet2DModel, UNet2DConditionModel)


class UnsupportedModelError(ValueError):
    """The pipeline or denoiser is not one tfmq can quantize."""


def _supported_names() -> str:
    return ", ".join(c.__name__ for c in SUPPORTED_DENOISERS)


def load_pipeline(model: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a diffusers pipeline from a hub id or a local folder, in ``dtype`` on ``device``."""
    model = str(model)
    path = Path(model).expanduser()
    if not path.exists() and looks_like_path(model):
        raise ValueError(f"could not load a diffusers pipeline from {model!r}: no such local folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, dtype=dtype)
    except Exception as exc:  # diffusers raises many types: name the model in one clear error
        where = "local folder" if path.exists() else "hub id (no network access?)"
        raise ValueError(f"could not load a diffusers pipeline from {model!r} ({where}): {exc}") from exc
    get_denoiser(pipe)  # fail early on unsupported pipelines
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def denoiser_component(pipe) -> str:
    """The name of the pipeline component that is the denoiser (after checking it is supported)."""
    get_denoiser(pipe)
    return "unet"


def looks_like_path(model: str) -> bool:
    """Whether ``model`` is written as a file-system path rather than a hub id (``org/name``)."""
    return (Path(model).expanduser().is_absolute() or model.startswith((".", "~"))
            or model.count("/") > 1 or "\\" in model)


def get_denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser (``pipe.unet``); a clear error for anything unsupported."""
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        other = getattr(pipe, "transformer", None)
        what = type(other).__name__ if other is not None else "no denoiser"
        raise UnsupportedModelError(f"unsupported pipeline {type(pipe).__name__} ({what}); "
                        f"supported denoisers: {_supported_names()}")
    if not isinstance(denoiser, SUPPORTED_DENOISERS):
        raise UnsupportedModelError(f"unsupported denoiser {type(denoiser).__name__}; "
                        f"supported denoisers: {_supported_names()}")
    return denoiser


def denoiser_kind(denoiser: nn.Module) -> str:
    """``unet2d`` (pixel / latent UNet, optionally class-conditional) or ``unet2d-cond``
    (cross-attention UNet of Stable Diffusion)."""
    if isinstance(denoiser, UNet2DConditionModel):
        return "unet2d-cond"
    if isinstance(denoiser, UNet2DModel):
        return "unet2d"
    raise UnsupportedModelError(f"unsupported denoiser {type(denoiser).__name__}; supported: {_supported_names()}")


@dataclass
class LayerInfo:
    """A quantizable layer: ``kind`` is ``conv``, ``linear`` or ``attention`` (the two matmuls
    and the softmax output of a diffusers Attention)."""
    name: str
    module: nn.Module
    kind: str


def quantizable_layers(denoiser: nn.Module) -> list[LayerInfo]:
    """Every Conv2d, Linear and Attention of the denoiser, in module order."""
    out = []
    for name, m in denoiser.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append(LayerInfo(name, m, "conv"))
        elif isinstance(m, nn.Linear):
            out.append(LayerInfo(name, m, "linear"))
        elif isinstance(m, Attention):
            out.append(LayerInfo(name, m, "attention"))
    return out


def has_class_labels(denoiser: nn.Module) -> bool:
    """Whether the denoiser takes class labels (a class embedding)."""
    return getattr(denoiser, "class_embedding", None) is not None and \
        getattr(denoiser.config, "num_class_embeds", None) is not None
