"""TIAR: temporal information aware reconstruction of the TIB's weights.

The TIB (see :mod:`tfmq.models.temporal`) is reconstructed as ONE unit whose output is the tuple
of all temporal features. AdaRound (the shared :func:`tfmq.calib.reconstruction.optimize_rounding`)
learns the rounding of every quantized TIB linear layer under the loss

    L_TIAR = sum_i || g_i(h(t)) - g^_i(h^(t)) ||_F^2

(summed over the features' channels, averaged over rows) over the finite set of the sampler's
timesteps (x every class of a class-conditional model): the targets are exact, there is no
calibration data to overfit. It runs before every other unit; the other units' reconstruction
then leaves these layers alone (``tib_layer_names``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.temporal import (TemporalBlock, find_temporal_block, finite_set, model_classes,
                               temporal_features, tib_layer_names)
from ..quant.layers import QuantLayer
from ..quant.model import quant_state
from .data import CalibrationData
from .loop import at, batch_indices

#: Rows of the finite set per TIAR iteration (all of them when there are fewer).
DEFAULT_BATCH = 1024


def tib_quant_layers(denoiser: nn.Module) -> dict[str, QuantLayer]:
    """The TIB's layers with a quantized weight (what TIAR optimises)."""
    out = {}
    for name in tib_layer_names(denoiser):
        m = denoiser.get_submodule(name)
        if isinstance(m, QuantLayer) and m.weight_quantizer is not None and not m.frozen:
            out[name] = m
    return out


def temporal_inputs(denoiser: nn.Module, timesteps: list[int], data: CalibrationData | None = None,
                    classes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The finite set the TIB is reconstructed / evaluated on: ``timestep`` (and ``class_labels``,
    or for blocks that also read other inputs, e.g. SDXL's ``text_embeds`` / ``time_ids``, the
    calibration data's recorded conditioning rows).
    ``step`` gives each row's step index."""
    block = find_temporal_block(denoiser)
    if block.needs_conditioning:
        if data is None:
            raise ValueError("this model's time embedding also reads its conditioning: calibration data needed")
        rows = [dict(data.step(s), step=torch.full((data.rows(s),), s)) for s in range(len(data))]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k != "sample"}
    if block.class_conditional and classes is None:
        classes = model_classes(denoiser)
        if classes is None:
            if data is None:
                raise ValueError("class labels of this model are not a finite table: calibration data needed")
            classes = sorted({int(c) for s in range(len(data)) for c in data.step(s)["class_labels"]})
    t, labels, step = finite_set(timesteps, classes if block.class_conditional else None)
    out = {"timestep": t, "step": step}
    if labels is not None:
        out["class_labels"] = labels
    return out


def _features(denoiser, inputs: dict, idx, block: TemporalBlock, device) -> list[torch.Tensor]:
    sel = {k: (v.index_select(0, idx.to(v.device)) if idx is not None else v).to(device)
           for k, v in inputs.items() if k != "step"}
    return temporal_features(denoiser, sel["timestep"], sel.get("class_labels"), sel, block=block)


@torch.no_grad()
def fp_temporal_features(denoiser: nn.Module, inputs: dict, block: TemporalBlock | None = None,
                         chunk: int = 4096) -> list[torch.Tensor]:
    """Temporal features with every quantizer of the denoiser turned off (the FP targets)."""
    block = block or find_temporal_block(denoiser)
    device = next(denoiser.parameters()).device
    with quant_state(denoiser, weight=False, act=False):
        n = inputs["timestep"].shape[0]
        parts = [_features(denoiser, inputs, torch.arange(a, min(a + chunk, n)), block, device)
                 for a in range(0, n, chunk)]
    return [torch.cat([p[i] for p in parts]).detach() for i in range(len(block))]


def temporal_error(features: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||g_i - g^_i||^2`` summed over channels, averaged over rows."""
    return sum(((f.float() - t.float()) ** 2).sum(dim=1).mean() for f, t in zip(features, targets))


def temporal_cosine(features: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean (over features and rows) cosine similarity between quantized and FP features."""
    sims = [torch.nn.functional.cosine_similarity(f.float(), t.float(), dim=1).mean()
            for f, t in zip(features, targets)]
    return torch.stack(sims).mean()


@torch.no_grad()
def evaluate_tib(denoiser: nn.Module, inputs: dict, targets: list[torch.Tensor],
                 block: TemporalBlock | None = None, chunk: int = 4096) -> dict:
    """Temporal-feature error and cosine of the denoiser's TIB as it is now (weights quantized,
    activations off) against FP targets."""
    block = block or find_temporal_block(denoiser)
    device = next(denoiser.parameters()).device
    n = inputs["timestep"].shape[0]
    err, cos = 0.0, 0.0
    for a in range(0, n, chunk):
        idx = torch.arange(a, min(a + chunk, n))
        feats = _features(denoiser, inputs, idx, block, device)
        tg = [t[idx.to(t.device)] for t in targets]
        w = len(idx) / n
        err += float(temporal_error(feats, tg)) * w
        cos += float(temporal_cosine(feats, tg)) * w
    return {"error": err, "cosine": cos}


def tiar(denoiser: nn.Module, timesteps: list[int], data: CalibrationData | None = None,
         iters: int = 20000, lr: float = 1e-3, reg_weight: float = 0.01, warmup: float = 0.2,
         beta: tuple[float, float] = (20, 2), batch_size: int = DEFAULT_BATCH, seed: int = 0,
         classes: list[int] | None = None, progress: bool = True, graphs: bool | None = False) -> dict:
    """Reconstruct the TIB's quantized linear layers with AdaRound under the TIAR loss.

    The weight quantizers' ranges must be initialised. Activation quantizers are off while it
    runs (FSC calibrates them afterwards); quantizer states are restored at the end. Returns a
    summary with the temporal-feature error and cosine before (nearest rounding) and after.

    The finite set lives on the model's device for the whole run; when it has more than
    ``batch_size`` rows, every iteration's rows are drawn up front (the same seeded draws as one
    ``torch.randperm`` an iteration). ``graphs``: capture the iteration in a CUDA graph (None:
    on CUDA; see :mod:`tfmq.calib.loop`).
    """
    layers = tib_quant_layers(denoiser)
    if not layers:
        return {"layers": [], "skipped": "no quantized weight in the temporal information block"}
    block = find_temporal_block(denoiser)
    device = next(denoiser.parameters()).device
    inputs = temporal_inputs(denoiser, timesteps, data, classes)
    targets = [t.to(device) for t in fp_temporal_features(denoiser, inputs, block)]
    n = inputs["timestep"].shape[0]
    with quant_state(denoiser, weight=False, act=False):
        for layer in layers.values():
            layer.weight_quantizer.enabled = True
        before = evaluate_tib(denoiser, inputs, targets, block)
        gen = torch.Generator().manual_seed(seed)
        rows = min(batch_size, n)
        resident = {k: v.to(device) for k, v in inputs.items() if k != "step"}   # sent once
        table = None if rows == n else batch_indices(n, rows, iters, gen).to(device)

        def loss_fn(it: torch.Tensor) -> torch.Tensor:
            idx = None if table is None else at(table, it)
            feats = _features(denoiser, resident, idx, block, device)
            tg = targets if idx is None else [t.index_select(0, idx) for t in targets]
            return temporal_error(feats, tg)

        opt = {}
        if iters > 0:                                   # 0: nearest rounding (no reconstruction)
            from .reconstruction import optimize_rounding      # the shared AdaRound loop
            with torch.enable_grad():
                opt = optimize_rounding(list(layers.values()), loss_fn, iters, lr=lr,
                                        reg_weight=reg_weight, warmup=warmup, beta=beta, desc="TIAR",
                                        progress=progress, graphs=graphs)
        after = evaluate_tib(denoiser, inputs, targets, block)
    return {"layers": list(layers), "rows": n, "iters": iters, "batch_rows": rows,
            "error_nearest": before["error"], "error_tiar": after["error"],
            "cosine_nearest": before["cosine"], "cosine_tiar": after["cosine"],
            "optimizer": {k: v for k, v in (opt or {}).items() if _jsonable(v)}}


def _jsonable(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, (int, str, bool, list, dict, type(None)))
