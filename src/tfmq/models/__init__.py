"""Denoiser families behind one adapter protocol (:mod:`tfmq.models.base`)."""
from .adapter import (ADAPTERS, SUPPORTED_DENOISERS, adapter_for, denoiser_kind, get_denoiser,
                      load_pipeline, quantizable_layers)

__all__ = ["ADAPTERS", "SUPPORTED_DENOISERS", "adapter_for", "denoiser_kind", "get_denoiser",
           "load_pipeline", "quantizable_layers"]
