"""Trajectory-deviation metrics: how far a quantized model's outputs drift from FP.

With the same initial noise and a deterministic sampler (DDIM, eta = 0) the FP
and quantized models should end on nearly the same image; MSE and PSNR measure
the gap per image, and the cosine similarity compares feature vectors (e.g. the
temporal features ``g_i(h(t))`` of each step) row by row.

Data range: uint8 inputs are taken as 0..255. Float inputs carry no range, so
PSNR needs ``data_range`` given explicitly (1.0 for [0, 1] images, 2.0 for
[-1, 1] model samples); MSE is reported in the inputs' own units.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["mse", "psnr", "cosine_similarity"]


def _pair(a, b) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both batches as float64 numpy, and whether they were uint8."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"need a non-empty batch, got shape {a.shape}")
    a_u8, b_u8 = a.dtype == np.uint8, b.dtype == np.uint8
    if a_u8 != b_u8:
        raise ValueError(f"both batches must be uint8 or both float, got {a.dtype} and {b.dtype}")
    return a.astype(np.float64), b.astype(np.float64), a_u8


def _per_image_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def mse(a, b, reduction: str = "mean"):
    """Mean squared error between two image batches, per image (axis 0 = images).

    Args:
        a, b: batches of the same shape, both uint8 (0..255 units) or both float
            (their own units), numpy or torch.
        reduction: ``"mean"`` (mean of the per-image MSEs, a float) or
            ``"none"`` (array of N per-image values).
    """
    a, b, _ = _pair(a, b)
    per = _per_image_mse(a, b)
    if reduction == "none":
        return per
    if reduction == "mean":
        return float(per.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(a, b, data_range: float | None = None, reduction: str = "mean"):
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, per image.

    Args:
        a, b: batches of the same shape, both uint8 or both float.
        data_range: peak-to-peak range of the data: 255 for uint8 (the default
            there); required for float inputs (1.0 for [0, 1], 2.0 for [-1, 1]).
        reduction: ``"mean"`` (mean of per-image PSNRs, a float) or ``"none"``.
            Identical images give ``inf`` (and so does a mean that includes one).
    """
    a, b, is_u8 = _pair(a, b)
    if data_range is None:
        if not is_u8:
            raise ValueError("float images need data_range (1.0 for [0, 1], 2.0 for [-1, 1])")
        data_range = 255.0
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    per = _per_image_mse(a, b)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(float(data_range) ** 2 / per)
    if reduction == "none":
        return values
    if reduction == "mean":
        return float(values.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def cosine_similarity(a, b) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``.

    Rows are axis 0; everything after it is flattened. Two all-zero rows count as
    identical (1.0); one all-zero row against a non-zero one gives 0.0.

    Returns:
        float64 array of N values in [-1, 1].
    """
    a, b, _ = _pair(a, b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    denom = na * nb
    out = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    out[(na == 0) & (nb == 0)] = 1.0
    return np.clip(out, -1.0, 1.0)
