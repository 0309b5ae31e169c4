"""Temporal feature caching: the TIB replaced by a table of its full-precision outputs.

Every temporal feature ``g_i(h(t, c))`` depends only on the timestep and the class, both taken
from finite sets (the sampler's timesteps, the model's classes). They are computed once at full
precision, stored (in the checkpoint, as buffers of ``denoiser.tfmq_temporal_cache``) and looked
up at run time, so the time projection, the time-embedding MLP, the class embedding and every
resnet's ``time_emb_proj`` leave the runtime path: their weights are neither quantized nor stored,
and the temporal features are exact.

This module builds the table (calibration); the runtime module that serves it is
:mod:`tfmq.runtime.temporal_cache`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.temporal_cache import (CacheMissError, CachedProjection, RemovedEmbedding,  # noqa: F401
                                      TemporalFeatureCache, _check_cacheable, install_cache,
                                      install_from_info)
from .temporal import find_temporal_block, finite_set, model_classes, temporal_features

CHUNK_ROWS = 4096


def _cache_classes(denoiser: nn.Module, block, classes: list[int] | None) -> list[int] | None:
    if not block.class_conditional:
        return None
    if classes is not None:
        return sorted(set(int(c) for c in classes))
    table = model_classes(denoiser)
    if table is None:
        raise ValueError("this model's class labels are not a finite table: give the classes to cache")
    return table


@torch.no_grad()
def build_cache(denoiser: nn.Module, timesteps: list[int], classes: list[int] | None = None,
                sampler: dict | None = None, progress: bool = True) -> TemporalFeatureCache:
    """Compute every temporal feature of the finite set with ``denoiser``'s TIB as it is now
    (full precision where its layers are unquantized). ``classes``: the class ids to cache for a
    class-conditional model (default: every row of its embedding table, null class included)."""
    block = _check_cacheable(denoiser)
    classes = _cache_classes(denoiser, block, classes)
    cache = TemporalFeatureCache(timesteps, classes, block.feature_dims, block.projections, sampler)
    device = next(denoiser.parameters()).device
    t, labels, _ = finite_set(timesteps, classes)
    parts: list[list[torch.Tensor]] = [[] for _ in block.projections]
    for a in tqdm(range(0, len(t), CHUNK_ROWS), desc="temporal cache", disable=not progress, leave=False):
        feats = temporal_features(denoiser, t[a:a + CHUNK_ROWS].to(device),
                                  None if labels is None else labels[a:a + CHUNK_ROWS].to(device), block=block)
        for i, f in enumerate(feats):
            parts[i].append(f.float().cpu())
    n_c = 1 if classes is None else len(classes)
    for i, p in enumerate(parts):
        cache.feature_table(i).copy_(torch.cat(p).reshape(len(timesteps), n_c, -1))
    return cache.to(device)


def cache_info(cache: TemporalFeatureCache) -> dict:
    """What a checkpoint stores to rebuild the cache's structure (its tensors are in the state)."""
    return {"mode": "cache", "timesteps": cache.timesteps.tolist(),
            "classes": None if cache.classes is None else cache.classes.tolist(),
            "dims": list(cache.dims), "features": list(cache.features), "sampler": cache.sampler,
            "bytes": cache.nbytes()}


def keep_tib_full_precision(denoiser: nn.Module) -> list[str]:
    """Unwrap the TIB's quantized layers back to their FP modules (in place), so that nothing
    quantizes or reconstructs them before the cache replaces them. Returns their names."""
    from ..quant.layers import QuantLayer
    from .temporal import tib_layer_names
    names = []
    for name in tib_layer_names(denoiser):
        m = denoiser.get_submodule(name)
        if isinstance(m, QuantLayer):
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            setattr(parent, child, m.layer)
            names.append(name)
    return names
