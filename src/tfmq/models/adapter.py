"""Load diffusers pipelines, find their denoiser and list its quantizable layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention
from torch import nn

from .base import DenoiserAdapter, UnsupportedModelError
from .dit import DiTAdapter
from .pixart import PixArtAdapter
from .unet import UNetAdapter

#: One adapter per denoiser family (see :mod:`tfmq.models.base`).
ADAPTERS: tuple[DenoiserAdapter, ...] = (UNetAdapter(), DiTAdapter(), PixArtAdapter())
SUPPORTED_DENOISERS = tuple(t for a in ADAPTERS for t in a.model_types)
#: Pipeline attributes that may hold the denoiser.
DENOISER_COMPONENTS = tuple(dict.fromkeys(a.component for a in ADAPTERS))


def _supported_names() -> str:
    return ", ".join(c.__name__ for c in SUPPORTED_DENOISERS)


def adapter_for(denoiser: nn.Module) -> DenoiserAdapter:
    """The adapter of ``denoiser``'s family; :class:`UnsupportedModelError` naming what is
    supported for anything else."""
    for adapter in ADAPTERS:
        if adapter.matches(denoiser):
            return adapter
    raise UnsupportedModelError(f"unsupported denoiser {type(denoiser).__name__}; "
                                f"supported denoisers: {_supported_names()}")


def load_pipeline(model: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a diffusers pipeline from a hub id or a local folder, in ``dtype`` on ``device``."""
    model = str(model)
    path = Path(model).expanduser()
    if not path.exists() and looks_like_path(model):
        raise ValueError(f"could not load a diffusers pipeline from {model!r}: no such local folder")
    absent = absent_components(path) if path.exists() else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, dtype=dtype, **absent)
    except Exception as exc:  # diffusers raises many types: name the model in one clear error
        where = "local folder" if path.exists() else "hub id (no network access?)"
        raise ValueError(f"could not load a diffusers pipeline from {model!r} ({where}): {exc}") from exc
    get_denoiser(pipe)  # fail early on unsupported pipelines
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def absent_components(folder: str | Path) -> dict[str, None]:
    """``{name: None}`` for every component a pipeline folder's ``model_index.json`` stores as
    absent (e.g. the VAE of a pixel-space DiT), so that ``from_pretrained`` accepts the folder."""
    import json
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    return {name: None for name, spec in json.loads(index.read_text()).items()
            if isinstance(spec, list) and spec and spec[0] is None}


def denoiser_component(pipe) -> str:
    """The name of the pipeline component that is the denoiser (``unet`` / ``transformer``),
    after checking it is supported."""
    return adapter_for(get_denoiser(pipe)).component


def looks_like_path(model: str) -> bool:
    """Whether ``model`` is written as a file-system path rather than a hub id (``org/name``)."""
    return (Path(model).expanduser().is_absolute() or model.startswith((".", "~"))
            or model.count("/") > 1 or "\\" in model)


def get_denoiser(pipe) -> nn.Module:
    """The pipeline's denoiser (its ``unet`` or ``transformer``); a clear error for anything
    unsupported."""
    for name in DENOISER_COMPONENTS:
        denoiser = getattr(pipe, name, None)
        if denoiser is not None:
            adapter_for(denoiser)
            return denoiser
    raise UnsupportedModelError(f"unsupported pipeline {type(pipe).__name__} (no denoiser among "
                                f"{', '.join(DENOISER_COMPONENTS)}); supported denoisers: {_supported_names()}")


def pipeline_adapter(pipe) -> DenoiserAdapter:
    """The adapter of ``pipe``'s denoiser."""
    return adapter_for(get_denoiser(pipe))


def denoiser_kind(denoiser: nn.Module) -> str:
    """The family of ``denoiser`` (``unet``, ``dit``, ``pixart``)."""
    return adapter_for(denoiser).family


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
    """Whether the denoiser takes class labels."""
    return adapter_for(denoiser).class_labels_apply(denoiser)


def call_denoiser(denoiser: nn.Module, row: dict[str, torch.Tensor]):
    """Run ``denoiser`` on a flat row (``sample``, ``timestep`` and conditioning inputs, as
    sampling conditions it and calibration data record it); returns the model's output."""
    kwargs = adapter_for(denoiser).forward_kwargs(
        {k: v for k, v in row.items() if k not in ("sample", "timestep")})
    return denoiser(row["sample"], timestep=row["timestep"], **kwargs)
