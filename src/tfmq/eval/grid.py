"""Writing samples: one PNG per image, a grid PNG, and ``samples.npz`` (uint8 NHWC ``arr_0``,
the layout the guided-diffusion evaluator reads); the side-by-side grid of an evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: smallest side of one image in a comparison grid: small images are enlarged (nearest neighbour,
#: an integer factor) so that 32x32 samples are readable
MIN_CELL_PX = 96


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


def cell_title(name: str) -> str:
    """Compact label of an evaluation cell: ``fp`` -> ``FP``, ``tfmq-w4a8`` -> ``tfmq W4A8``."""
    if name == "fp":
        return "FP"
    method, sep, bits = name.rpartition("-")
    return f"{method} {bits.upper()}" if sep and bits.startswith("w") else name


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def comparison_grid(samples: dict[str, np.ndarray], min_cell: int = MIN_CELL_PX, pad: int = 2,
                    font_size: int = 14) -> np.ndarray:
    """One row per entry of ``samples`` (name -> uint8 NHWC images), the same number of images in
    each (the fewest), with the compact :func:`cell_title` in a band above its row. Images are
    enlarged by an integer factor to at least ``min_cell`` pixels. Returns an HWC uint8 image."""
    names = list(samples)
    if not names:
        raise ValueError("no cells to show")
    n = min(len(v) for v in samples.values())
    if n == 0:
        raise ValueError("a cell has no images")
    channels = max(v.shape[-1] for v in samples.values())
    first = next(iter(samples.values()))
    scale = max(1, math.ceil(min_cell / max(first.shape[1:3])))
    font = _font(font_size)
    band_h = font_size + 8
    parts = []
    for name in names:
        imgs = samples[name][:n]
        if imgs.shape[-1] != channels:
            imgs = np.repeat(imgs, channels, axis=-1)
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
        row = make_grid(imgs, ncols=n, pad=pad)
        band = Image.new("L", (row.shape[1], band_h), 255)
        ImageDraw.Draw(band).text((pad + 2, 3), cell_title(name), fill=0, font=font)
        band = np.asarray(band)[..., None].repeat(channels, axis=-1)
        parts += [band, row[pad:]]
    return np.concatenate(parts, axis=0)


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
