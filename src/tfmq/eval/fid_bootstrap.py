"""How much an FID moves when the generated images are resampled: a bootstrap interval.

FID at a few hundred or thousand images is noisy: two methods a few points apart may not differ at
all. The bootstrap redraws the N generated feature vectors with replacement ``resamples`` times
(seeded) and recomputes the FID against the same reference statistics each time. The reference
set is held fixed: it is common to every cell, so it shifts every FID alike and does not change
which method ranks first.

Two read-outs:

* :func:`bootstrap_interval`: the spread of one cell's FID. Drawing with replacement duplicates
  images, which by itself raises the FID, so the raw percentiles sit above the measured value; the
  interval is the 2.5 / 97.5 percentiles (for ``level`` 0.95) shifted so that the bootstrap median
  falls on the measured FID.
* :func:`paired_difference`: two cells sampled from the same seeds (FP and a quantized model in
  ``tfmq evaluate``) are resampled with the SAME indices (same seed, same N), so resample b of
  both draws the same noise seeds; the interval of FID_b(cell) - FID_b(FP) says whether the FID
  separates them at all. This is sharper than comparing the two intervals.

Cost: with N <= D (2048 for the pool features) everything is done on N x N Gram matrices: the
non-zero eigenvalues of ``S_ref S_b`` are those of ``X S_ref X^T / (N-1)`` (X the centred
resampled features), so one resample is an N x N double centring and one ``eigvalsh`` of N x N;
the N x D x D product is computed once. With N > D each resample is a D x D covariance and one
``eigvalsh`` of D x D against the precomputed root of the reference covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .fid import FeatureStats

__all__ = ["DEFAULT_RESAMPLES", "DEFAULT_LEVEL", "bootstrap_indices", "bootstrap_fids", "fid_and_bootstrap",
           "bootstrap_interval", "paired_difference", "PairedDifference"]

#: resamples per cell. Cost measured at N = 1000, D = 2048 on the project's 2-core CPU machine
#: (shared, load average ~5): 0.4 s once, then 0.5-1 s a resample (an N x N ``eigvalsh``), so
#: 30-50 s a cell at B = 50, less than the cell's Inception features (~0.12 s an image); one scipy
#: ``sqrtm`` FID at D = 2048 took 68 s there and the D x D ``eigh`` route 7-20 s, too slow per resample
DEFAULT_RESAMPLES = 50
DEFAULT_LEVEL = 0.95


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices drawn with replacement by ``numpy.random.default_rng(seed)``; the
    same (n, resamples, seed) gives the same draws, which is what pairs two cells."""
    if resamples < 1 or n < 2:
        raise ValueError(f"need resamples >= 1 and n >= 2, got {resamples}, {n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _double_centre(m: np.ndarray) -> np.ndarray:
    return m - m.mean(axis=0, keepdims=True) - m.mean(axis=1, keepdims=True) + m.mean()


def _sqrt_sum(eigs: np.ndarray) -> float:
    return float(np.sqrt(np.clip(eigs, 0.0, None)).sum())


class _Gram:
    """Frechet distances of index subsets of F (N <= D) to fixed reference statistics."""

    def __init__(self, feats: np.ndarray, ref: FeatureStats):
        self.gs = feats @ ref.sigma @ feats.T          # F S_ref F^T, N x N
        self.k = feats @ feats.T                        # F F^T
        self.v = feats @ ref.mu                         # F mu_ref
        self.const = float(ref.mu @ ref.mu + np.trace(ref.sigma))

    def __call__(self, idx: np.ndarray) -> float:
        n = len(idx)
        k = self.k[np.ix_(idx, idx)]
        mean_sq = float(k.sum()) / n**2                 # ||mu_b||^2
        trace_b = (float(np.trace(k)) - float(k.sum()) / n) / (n - 1)
        cross = float(self.v[idx].mean())               # mu_b . mu_ref
        m = _double_centre(self.gs[np.ix_(idx, idx)]) / (n - 1)
        tr_root = _sqrt_sum(np.linalg.eigvalsh((m + m.T) / 2.0))
        return mean_sq - 2.0 * cross + trace_b + self.const - 2.0 * tr_root


class _Cov:
    """The same for N > D: a D x D covariance per subset."""

    def __init__(self, feats: np.ndarray, ref: FeatureStats):
        self.feats, self.ref = feats, ref
        w, v = scipy.linalg.eigh(ref.sigma)
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    def __call__(self, idx: np.ndarray) -> float:
        x = self.feats[idx]
        mu = x.mean(axis=0)
        xc = x - mu
        sigma = xc.T @ xc / (len(idx) - 1)
        inner = self.root @ sigma @ self.root
        tr_root = _sqrt_sum(np.linalg.eigvalsh((inner + inner.T) / 2.0))
        d = mu - self.ref.mu
        return float(d @ d + np.trace(sigma) + np.trace(self.ref.sigma) - 2.0 * tr_root)


def _engine(feats: np.ndarray, ref: FeatureStats):
    if feats.ndim != 2 or feats.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"features {feats.shape} do not match reference dimension {ref.mu.shape[0]}")
    return _Gram(feats, ref) if feats.shape[0] <= feats.shape[1] else _Cov(feats, ref)


def fid_and_bootstrap(features, ref: FeatureStats, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> tuple[float, np.ndarray]:
    """The FID of ``features`` (N, D) against ``ref`` and its ``resamples`` bootstrap values.

    The FID equals :func:`tfmq.eval.fid.fid_from_stats` (``method="eigh"``) up to rounding."""
    feats = np.asarray(features, dtype=np.float64)
    engine = _engine(feats, ref)
    point = engine(np.arange(len(feats)))
    boot = np.array([engine(idx) for idx in bootstrap_indices(len(feats), resamples, seed)])
    return point, boot


def bootstrap_fids(features, ref: FeatureStats, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Only the ``resamples`` bootstrap FIDs (see :func:`fid_and_bootstrap`)."""
    return fid_and_bootstrap(features, ref, resamples, seed)[1]


def bootstrap_interval(point: float, samples, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """``level`` interval around ``point`` from bootstrap ``samples``: their percentiles, shifted
    so that their median sits on ``point`` (see the module doc)."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size < 2:
        raise ValueError("need at least 2 bootstrap samples")
    lo, med, hi = np.percentile(s, [50 * (1 - level), 50, 50 * (1 + level)])
    return float(point - (med - lo)), float(point + (hi - med))


@dataclass(frozen=True)
class PairedDifference:
    """FID(a) - FID(b) and its bootstrap interval; ``separable`` when the interval excludes 0."""
    difference: float
    low: float
    high: float

    @property
    def separable(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(point_a: float, samples_a, point_b: float, samples_b,
                      level: float = DEFAULT_LEVEL) -> PairedDifference:
    """Interval of FID(a) - FID(b) from bootstrap samples drawn with the same indices for both."""
    a, b = np.asarray(samples_a, np.float64), np.asarray(samples_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.shape} and {b.shape}")
    diff = point_a - point_b
    lo, hi = bootstrap_interval(diff, a - b, level)
    return PairedDifference(float(diff), lo, hi)
