"""The fingerprint of a denoiser's architecture: what a checkpoint or a progress folder was made for."""

from __future__ import annotations

import hashlib
import json

from ..quant.quantizer import UniformQuantizer


def denoiser_fingerprint(denoiser) -> str:
    """Hash of the denoiser's class, config and parameter shapes (of its FP structure: a denoiser
    whose temporal block was replaced by a feature cache keeps the hash it had before)."""
    fixed = getattr(denoiser, "tfmq_fp_fingerprint", None)
    if fixed is not None:
        return fixed
    cfg = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    shapes = []
    for mod_name, m in denoiser.named_modules():
        if isinstance(m, UniformQuantizer):
            continue
        for p_name, p in m.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}".replace(".layer.", ".")
            shapes.append((name, tuple(p.shape)))
    blob = json.dumps([type(denoiser).__name__, cfg, sorted(shapes)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
