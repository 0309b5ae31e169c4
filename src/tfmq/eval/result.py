"""A metric value that may be unavailable, with the reason said instead of a number."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MetricResult"]


@dataclass(frozen=True)
class MetricResult:
    """Outcome of a metric: ``value`` (None when it cannot be computed here) and why not.

    Attributes:
        name: metric name, e.g. ``"IS"``.
        value: the number, or None when the metric is not available.
        reason: why it is not available (None when it is).
        n: number of images it was computed on (or would have been).
        extra: further numbers, e.g. ``{"std": ...}`` for Inception Score.
    """

    name: str
    value: float | None
    reason: str | None = None
    n: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """True when ``value`` holds a number."""
        return self.value is not None

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.name}: not available ({self.reason})"
        return f"{self.name}: {self.value:.4g}" + (f" (N={self.n})" if self.n is not None else "")
