"""The temporal feature table an exported graph is fed with.

The table is a :class:`~tfmq.runtime.temporal_cache.TemporalFeatureCache` (the runtime's own
representation of "every temporal feature of the finite set"): ``feature_i[step, class]`` for
the sampler's timesteps and, for a class-conditional model, every class of its embedding table
(the null class of guidance included).

* a checkpoint made with ``--temporal cache`` already holds it: it is used as stored;
* otherwise it is computed here with the denoiser itself (the runtime's quantized temporal block
  for a quantized model, step by step so that per-step (FSC) parameters of the block apply; the FP
  block for an FP model), so the exported graph fed with the table computes what the runtime does.

Stored next to the ONNX file as safetensors (the cache's buffers) with its description in the
export's json.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.temporal import find_temporal_block, model_classes
from ..runtime.steps import step_index_of
from ..runtime.temporal_cache import TemporalFeatureCache, compute_table, info_features
from .qdq import ExportError


def _copy(cache: TemporalFeatureCache) -> TemporalFeatureCache:
    out = TemporalFeatureCache(cache.timesteps.tolist(),
                               None if cache.classes is None else cache.classes.tolist(),
                               cache.dims, cache.features, cache.sampler)
    for i in range(len(cache.dims)):
        out.feature_table(i).copy_(cache.feature_table(i).float().cpu())
    return out


@torch.no_grad()
def feature_table(denoiser: nn.Module, timesteps: list[int], sampler: dict | None = None
                  ) -> TemporalFeatureCache:
    """Every temporal feature of ``denoiser`` for ``timesteps`` (x every class), on the CPU."""
    timesteps = [int(t) for t in timesteps]
    cache = getattr(denoiser, "tfmq_temporal_cache", None)
    if cache is not None:
        if cache.timesteps.tolist() != timesteps:
            raise ExportError("the checkpoint's temporal feature cache holds other timesteps than the "
                              "requested sampler's; export with the calibrated sampler")
        return _copy(cache)
    block = find_temporal_block(denoiser)
    if block.needs_conditioning:
        raise ExportError("this model's time embedding also reads other inputs (added conditioning, "
                          "e.g. SDXL): its temporal features are not a finite table (export_onnx keeps "
                          "such a block in the graph instead)")
    classes = None
    if block.class_conditional:
        classes = model_classes(denoiser)
        if classes is None:
            raise ExportError("the class embedding is not a finite table: cannot tabulate its features")
    return compute_table(denoiser, block, timesteps, classes, sampler, step_index_of(denoiser))


def save_table(table: TemporalFeatureCache, path: str | Path) -> None:
    """The table's tensors (``feature_<i>``, ``timesteps``, ``classes``) as safetensors."""
    tensors = {k: v.contiguous().cpu() for k, v in table.state_dict().items() if v is not None}
    save_file(tensors, str(path))


def load_table(path: str | Path, description: dict) -> TemporalFeatureCache:
    """A table written by :func:`save_table`; ``description``: the export json's ``temporal``
    entry (timesteps, classes, dims, features, sampler), checked against the tensors."""
    tensors = load_file(str(path))
    table = TemporalFeatureCache(description["timesteps"], description["classes"], description["dims"],
                                 info_features(description), description.get("sampler"))
    want = {k: v.shape for k, v in table.state_dict().items() if v is not None}
    have = {k: v.shape for k, v in tensors.items()}
    if want != have:
        raise ValueError(f"{path} does not match its description (tensors {sorted(have)} vs {sorted(want)})")
    table.load_state_dict(tensors)
    if table.timesteps.tolist() != [int(t) for t in description["timesteps"]]:
        raise ValueError(f"{path}: timesteps differ from the export's description")
    return table
