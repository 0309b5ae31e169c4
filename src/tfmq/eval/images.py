"""Image-batch conventions shared by the evaluation code.

The evaluation side of tfmq passes images around as ``uint8`` arrays laid out
NHWC (batch, height, width, channels), with 1 (grayscale) or 3 (RGB) channels:
the format real data sets are loaded in and the format generated samples are
written to disk in. Generated samples usually come out of a pipeline as floats;
:func:`to_uint8` quantises them exactly as saving them to PNG would.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "as_nhwc"]


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    return np.asarray(images)


def as_nhwc(images) -> np.ndarray:
    """Return ``images`` as a 4-d NHWC numpy array without changing its dtype.

    Accepts NHWC or NCHW batches with 1 or 3 channels (NCHW is recognised when
    the last axis is not a channel count but axis 1 is), and single HW / HWC
    images, which become a batch of one. A 3-d array is read as HWC when its
    last axis is 1 or 3, otherwise as a batch of grayscale NHW images.
    """
    arr = _to_numpy(images)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in (1, 3) else arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected an image batch (N,H,W,C) or (N,C,H,W), got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3):
        if arr.shape[1] in (1, 3):
            arr = np.transpose(arr, (0, 2, 3, 1))
        else:
            raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {arr.shape}")
    return arr


def to_uint8(images, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Convert an image batch to ``uint8`` NHWC, as saving it to PNG would.

    Args:
        images: numpy array or torch tensor, NHWC or NCHW (see :func:`as_nhwc`).
        value_range: the (low, high) range of float inputs, mapped linearly to
            0..255, then rounded and clipped. Required for float inputs (a wrong
            guess silently changes FID); must be omitted or ``(0, 255)`` for
            integer inputs.

    Returns:
        ``np.uint8`` array of shape (N, H, W, C).
    """
    arr = as_nhwc(images)
    if arr.dtype == np.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ValueError(f"uint8 images are 0..255; value_range={value_range} does not apply")
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ValueError("integer images must lie in 0..255")
        return np.ascontiguousarray(arr.astype(np.uint8))
    if value_range is None:
        raise ValueError(
            "float images need an explicit value_range, e.g. (0, 1) for diffusers "
            "output_type='np' or (-1, 1) for raw model samples"
        )
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
