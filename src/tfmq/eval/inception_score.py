"""Inception Score (IS), reported as unavailable when no classifier is at hand.

IS needs the Inception classifier's class probabilities. The offline FID
network (see :mod:`tfmq.eval.inception`) ends at the pool3 features and holds
no classifier, so :func:`inception_score` returns a :class:`MetricResult`
with ``value=None`` and the reason rather than a number. The formula itself is
in :func:`inception_score_from_logits`, ready for a network that has logits.
"""

from __future__ import annotations

import numpy as np

from .inception import InceptionFeatures
from .result import MetricResult

__all__ = ["inception_score", "inception_score_from_logits"]


def inception_score_from_logits(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits: ``exp(E_x KL(p(y|x) || p(y)))``.

    The N images are cut into ``splits`` consecutive groups (as the original
    code does); each gives one score, with p(y) the group's mean prediction.

    Args:
        logits: (N, classes) array of unnormalised log-probabilities.
        splits: number of groups (1 for a single score over all N).

    Returns:
        ``(mean, std)`` over the groups.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) < splits or splits < 1:
        raise ValueError(f"need (N, classes) logits with N >= splits >= 1, got {z.shape} and splits={splits}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for part_log_p, part_p in zip(np.array_split(log_p, splits), np.array_split(p, splits)):
        log_marginal = np.log(part_p.mean(axis=0))
        kl = (part_p * (part_log_p - log_marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(images=None, network: InceptionFeatures | None = None, splits: int = 10) -> MetricResult:
    """Inception Score of an image set, or why it cannot be computed.

    With the offline FID network (no classifier layer) this always returns
    ``MetricResult("IS", None, reason=...)``; it never makes up a number.
    A network with ``has_logits = True`` and a ``logits(images)`` method
    returning (N, classes) gets the score, with ``extra["std"]`` over the splits.
    """
    n = None if images is None else len(images)
    has_logits = getattr(network, "has_logits", InceptionFeatures.has_logits)
    if not has_logits:
        reason = getattr(network, "no_logits_reason", InceptionFeatures.no_logits_reason)
        return MetricResult("IS", None, reason=reason, n=n)
    if images is None:
        raise ValueError("images are needed to compute the Inception Score")
    mean, std = inception_score_from_logits(network.logits(images), splits=splits)
    return MetricResult("IS", mean, n=n, extra={"std": std, "splits": splits})
