"""Inception statistics of real data sets, computed once and cached on disk.

Real-data statistics are the expensive, never-changing half of FID: they are
kept in ``$TFMQ_CACHE/fid-stats/`` (default ``~/.cache/tfmq/fid-stats/``), one
``.npz`` per (data set, N, subset seed, padding, network file SHA-1), holding
the pool3 (FID) and spatial (sFID) means and covariances. A file for another
network or another subset never matches, so stale statistics cannot be reused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .datasets import DATASETS, load_dataset
from .fid import FeatureStats, ImageStats, default_network, image_stats
from .inception import InceptionFeatures

__all__ = ["cache_dir", "reference_cache_path", "reference_stats", "save_stats", "load_stats"]

_FORMAT = 1


def cache_dir() -> Path:
    """The tfmq cache folder: ``$TFMQ_CACHE`` or ``~/.cache/tfmq`` (not created here)."""
    env = os.environ.get("TFMQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tfmq"


def reference_cache_path(name: str, n: int | None, network_sha1: str, *, seed: int | None = 0,
                         pad: int | None = 32) -> Path:
    """Where :func:`reference_stats` keeps the statistics for these settings."""
    parts = [
        name,
        f"n{'all' if n is None else int(n)}",
        f"seed{'none' if seed is None else int(seed)}",
        f"pad{int(pad) if pad else 0}",
        network_sha1[:16],
        f"v{_FORMAT}",
    ]
    return cache_dir() / "fid-stats" / ("_".join(parts) + ".npz")


def save_stats(path: str | os.PathLike, stats: ImageStats, meta: dict | None = None) -> None:
    """Write :class:`ImageStats` to an ``.npz`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"pool_mu": stats.pool.mu, "pool_sigma": stats.pool.sigma, "pool_n": np.int64(stats.pool.n)}
    if stats.spatial is not None:
        arrays.update(spatial_mu=stats.spatial.mu, spatial_sigma=stats.spatial.sigma,
                      spatial_n=np.int64(stats.spatial.n))
    arrays["meta"] = np.array(json.dumps(meta or {}, sort_keys=True))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: str | os.PathLike) -> tuple[ImageStats, dict]:
    """Read what :func:`save_stats` wrote: ``(stats, meta)``."""
    with np.load(path, allow_pickle=False) as z:
        pool = FeatureStats(z["pool_mu"], z["pool_sigma"], int(z["pool_n"]))
        spatial = None
        if "spatial_mu" in z.files:
            spatial = FeatureStats(z["spatial_mu"], z["spatial_sigma"], int(z["spatial_n"]))
        meta = json.loads(str(z["meta"]))
    return ImageStats(pool, spatial), meta


def _compute_reference(name: str, n: int | None, seed: int | None, pad: int | None,
                       network: InceptionFeatures) -> ImageStats:
    images = load_dataset(name, n, seed=seed, pad=pad)
    return image_stats(images, network, spatial=True)


def reference_stats(name: str = "fashion-mnist-test", n: int | None = None, *, seed: int | None = 0,
                    pad: int | None = 32, network: InceptionFeatures | None = None, cache: bool = True,
                    refresh: bool = False) -> ImageStats:
    """FID / sFID statistics of a real data set, from the cache when present.

    Args:
        name: a data set of :data:`tfmq.eval.datasets.DATASETS`, e.g. ``"fashion-mnist-test"``.
        n: number of real images (None: the whole set; 10,000 for the test split,
            about 10 minutes on 2 CPU cores, once).
        seed: subset seed (see :mod:`tfmq.eval.datasets`).
        pad: pad the 28x28 images to this size first (32 matches the bundled
            model's samples); None or 0 keeps 28x28.
        network: feature extractor; default the shared CPU one.
        cache: read and write the cache; False always computes and writes nothing.
        refresh: recompute and overwrite the cached file.

    Returns:
        :class:`ImageStats` with both ``pool`` and ``spatial`` statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    net = network or default_network()
    if not cache:
        return _compute_reference(name, n, seed, pad, net)
    sha1 = net.sha1
    path = reference_cache_path(name, n, sha1, seed=seed, pad=pad)
    meta = {"dataset": name, "n": n, "seed": seed, "pad": pad or 0, "network_sha1": sha1, "format": _FORMAT}
    if path.is_file() and not refresh:
        try:
            stats, found = load_stats(path)
            if found == meta:
                return stats
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign file: recompute and overwrite it
    stats = _compute_reference(name, n, seed, pad, net)
    save_stats(path, stats, meta)
    return stats
