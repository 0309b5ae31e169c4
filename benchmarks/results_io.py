"""What the benchmark scripts share: writing a result file, and the PSNR of two image sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_results(out: dict, path: Path, quiet: bool = False) -> None:
    """Write ``out`` as indented JSON to ``path`` (its folder made if needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    if not quiet:
        print("written", path)


def pooled_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image sets from their pooled mean squared error (inf if equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
