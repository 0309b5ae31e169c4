"""Quantization configuration: one dataclass for every method.

Methods are recipes (see :mod:`tfmq.recipes`): a list of shared stages plus the defaults the
method's paper uses. ``QuantConfig.for_method(name, **overrides)`` gives a config filled with a
method's defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from .policy import POLICIES
from .quant.quantizer import check_bits
from .sampling import SamplerConfig

RANGE_METHODS = ("minmax", "mse", "percentile")


@dataclass
class QuantConfig:
    """How to quantize a pipeline's denoiser.

    Bits: ``wbits`` / ``abits`` in 2..8, or 32 to keep weights / activations in full precision;
    ``softmax_bits`` (default: ``abits``) for the attention probabilities, 2..8 or 16.
    Calibration data: ``calib_size`` trajectories of ``sampler`` collected in one pass.
    """
    method: str = "naive"
    wbits: int = 8
    abits: int = 8
    softmax_bits: int | None = None
    layer_policy: str = "tfmq-official"
    weight_init: str = "mse"
    act_init: str = "mse"
    weight_symmetric: bool = False
    act_symmetric: bool = False
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calib_size: int = 256
    calib_batch_size: int = 32
    act_rows_per_step: int | None = None
    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    seed: int = 0
    memory_budget_gb: float = 4.0

    @classmethod
    def for_method(cls, method: str, **overrides) -> "QuantConfig":
        """A config with ``method``'s recipe defaults, then ``overrides``."""
        from .recipes import get_recipe
        recipe = get_recipe(method)
        values = {**recipe.defaults, **overrides, "method": method}
        if isinstance(values.get("sampler"), dict):
            values["sampler"] = SamplerConfig(**values["sampler"])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return cls(**values).validate()

    @property
    def effective_softmax_bits(self) -> int:
        return self.softmax_bits if self.softmax_bits is not None else self.abits

    def validate(self) -> "QuantConfig":
        """Check every value; raises ValueError naming the bad one."""
        from .recipes import get_recipe
        get_recipe(self.method)
        check_bits(self.wbits, "weight bits (wbits)")
        check_bits(self.abits, "activation bits (abits)")
        if self.softmax_bits is not None and self.softmax_bits != 16:
            check_bits(self.softmax_bits, "softmax bits", allow_fp=False)
        if self.layer_policy not in POLICIES:
            raise ValueError(f"unknown layer policy {self.layer_policy!r}; choose from {', '.join(POLICIES)}")
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in RANGE_METHODS:
                raise ValueError(f"{name} must be one of {', '.join(RANGE_METHODS)}")
        if self.calib_size < 1 or self.calib_batch_size < 1:
            raise ValueError("calibration size and batch size must be >= 1")
        if self.memory_budget_gb <= 0:
            raise ValueError("memory budget must be > 0")
        self.sampler.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        d["sampler"] = SamplerConfig(**d.get("sampler", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
