"""Adapters for diffusers denoisers."""
from .adapter import (SUPPORTED_DENOISERS, denoiser_kind, get_denoiser, load_pipeline,
                      quantizable_layers)

__all__ = ["SUPPORTED_DENOISERS", "denoiser_kind", "get_denoiser", "load_pipeline", "quantizable_layers"]
