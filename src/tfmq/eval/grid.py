"""Writing samples: one PNG per image, a grid PNG, and ``samples.npz`` (uint8 NHWC ``arr_0``,
the layout the guided-diffusion evaluator reads)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, ``ncols`` per row (default: about square)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    """HWC uint8 (1 or 3 channels) -> PIL image."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_samples(images: np.ndarray, out_dir: str | Path, ncols: int | None = None) -> dict[str, Path]:
    """Write ``images`` as ``000000.png`` ..., ``grid.png`` and ``samples.npz``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        to_pil(img).save(out_dir / f"{i:06d}.png")
    grid_path = out_dir / "grid.png"
    to_pil(make_grid(images, ncols)).save(grid_path)
    npz_path = out_dir / "samples.npz"
    np.savez(npz_path, arr_0=images)
    return {"grid": grid_path, "npz": npz_path}
