"""Quantization configuration: one dataclass for every method.

Methods are recipes (see :mod:`tfmq.recipes`): a list of shared stages plus the defaults the
method's paper uses. ``QuantConfig.for_method(name, **overrides)`` gives a config filled with a
method's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from .policy import POLICIES
from .quant.quantizer import check_bits
from .sampling import SamplerConfig

RANGE_METHODS = ("minmax", "mse", "percentile")
from .choices import FSC_MODES, RECON_PARALLEL_MODES, TEMPORAL_MODES  # noqa: E402,F401  (re-exported)


@dataclass
class QuantConfig:
    """How to quantize a pipeline's denoiser.

    Bits: ``wbits`` / ``abits`` in 2..8, or 32 to keep weights / activations in full precision;
    ``softmax_bits`` (default: ``abits``) for the attention probabilities, 2..8 or 16.
    Calibration data: ``calib_size`` trajectories of ``sampler`` collected in one pass.
    Reconstruction (``recon_*``, ``act_learn_*``): see :mod:`tfmq.calib.reconstruction`;
    ``for_method(name, preset="reference")`` applies the reference implementations' values.
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
    # TFMQ-DM (see tfmq.calib.fsc / tfmq.calib.tiar / tfmq.models.temporal_cache)
    interval_length: int = 1             # weight reconstruction uses every k-th step's data
    fsc: str = "none"                    # finite set calibration: none, tib or all
    fsc_momentum: float = 0.95           # running-statistics momentum of fsc='all'
    temporal: str | None = None          # temporal block: tiar (reconstruct) or cache (FP table)
    tiar_iters: int | None = None        # AdaRound iterations of TIAR (None: recon_iters; tfmq: 2000)
    # Q-Diffusion / block reconstruction (see tfmq.calib.reconstruction, tfmq.calib.act_learning)
    calib_steps: int | None = None       # steps, spread uniformly, feeding reconstruction (--cali_st)
    split_shortcut: bool = False         # separate input ranges for the two halves of up-block concats
    act_ema: float | None = None         # running-statistics momentum of activation ranges (0.95 ref.)
    recon_iters: int = 2000              # AdaRound iterations per unit (reference: 20000)
    recon_batch_size: int = 32           # rows per iteration (reference: 32; 8 for SD)
    recon_lr: float = 5e-3               # Adam lr of AdaRound's alpha (reference: 1e-3 at 20000 it)
    recon_reg_weight: float = 0.01       # weight of the rounding regulariser
    recon_warmup: float = 0.2            # fraction of iterations without the rounding regulariser
    recon_beta: tuple[float, float] = (20.0, 2.0)   # regulariser exponent, decays start -> end
    recon_units: list[str] | None = None # shell patterns of the units to reconstruct (None = all)
    recon_rows: int | None = None        # at most this many calibration rows per unit (None = all)
    recon_bf16: bool = False             # bf16 autocast of unit forwards (CUDA only)
    recon_cache_gb: float | None = None  # GPU memory for cached unit inputs + targets (None: half free)
    recon_capture_rows: int | None = None  # rows per forward pass when caching unit inputs / outputs
                                         # (None: see tfmq.calib.reconstruction.capture_rows)
    recon_cuda_graphs: bool = True       # on CUDA, capture each TIAR / AdaRound / act-step iteration
                                         # in a CUDA graph (same arithmetic, no launch overhead)
    recon_parallel: str = "auto"         # several processes: "replicate" (each rank caches its share
                                         # of a unit's rows, the shares are gathered and every rank
                                         # runs the whole loop), "rows" (data-parallel loop, gradients
                                         # all-reduced each iteration, eager), "batch" (all rows on
                                         # every rank, each computes its slice of every batch, the
                                         # gradient all-reduce inside the CUDA graph) or "auto"
                                         # (replicate where the loop runs as a CUDA graph, rows elsewhere)
    act_learn_iters: int = 500           # activation step-size iterations per unit (reference: 5000)
    act_learn_lr: float = 4e-4           # their Adam learning rate (cosine decay)
    act_learn_p: float = 2.4             # exponent of their reconstruction loss

    @classmethod
    def for_method(cls, method: str, **overrides) -> "QuantConfig":
        """A config with ``method``'s recipe defaults, then ``overrides``."""
        from .recipes import get_recipe
        recipe = get_recipe(method)
        preset = overrides.pop("preset", None)      # named reconstruction settings
        if preset is not None:
            from .calib.reconstruction import preset as preset_values
            overrides = {**preset_values(preset), **overrides}
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
        for f in dataclasses.fields(self):        # NaN / inf pass every range check below
            values = getattr(self, f.name)
            for v in values if isinstance(values, (tuple, list)) else [values]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{f.name} must be finite, got {getattr(self, f.name)!r}")
        if self.calib_size < 1 or self.calib_batch_size < 1:
            raise ValueError("calibration size and batch size must be >= 1")
        if self.memory_budget_gb <= 0:
            raise ValueError("memory budget must be > 0")
        self._validate_temporal()
        self._validate_reconstruction()
        self.sampler.validate()
        return self

    def _validate_temporal(self) -> None:
        from .recipes import get_recipe
        stages = get_recipe(self.method).stages
        if not isinstance(self.interval_length, int) or self.interval_length < 1:
            raise ValueError(f"interval_length must be a positive integer, got {self.interval_length!r}")
        if self.fsc not in FSC_MODES:
            raise ValueError(f"fsc must be one of {', '.join(FSC_MODES)}, got {self.fsc!r}")
        if self.fsc != "none" and "fsc" not in stages:
            raise ValueError(f"finite set calibration (fsc={self.fsc!r}) is part of the tfmq method, "
                             f"not of {self.method!r}")
        if not 0 <= self.fsc_momentum < 1:
            raise ValueError(f"fsc_momentum must be in [0, 1), got {self.fsc_momentum}")
        if self.temporal is not None:
            if self.temporal not in TEMPORAL_MODES:
                raise ValueError(f"temporal must be one of {', '.join(TEMPORAL_MODES)}, got {self.temporal!r}")
            if "temporal" not in stages:
                raise ValueError(f"temporal={self.temporal!r} is part of the tfmq method, not of {self.method!r}")
        if self.tiar_iters is not None and (not isinstance(self.tiar_iters, int) or self.tiar_iters < 0):
            raise ValueError(f"tiar_iters must be an integer >= 0 (or None: recon_iters), got {self.tiar_iters!r}")

    def _validate_reconstruction(self) -> None:
        def positive_int(name, allow_none=False, allow_zero=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {v!r}")
        positive_int("calib_steps", allow_none=True)
        positive_int("recon_rows", allow_none=True)
        positive_int("recon_iters", allow_zero=True)
        positive_int("act_learn_iters", allow_zero=True)
        positive_int("recon_batch_size")
        positive_int("recon_capture_rows", allow_none=True)
        for name in ("recon_lr", "act_learn_lr", "act_learn_p", "recon_cache_gb"):
            if getattr(self, name) is None and name == "recon_cache_gb":
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.recon_reg_weight < 0:
            raise ValueError(f"recon_reg_weight must be >= 0, got {self.recon_reg_weight}")
        if not 0 <= self.recon_warmup < 1:
            raise ValueError(f"recon_warmup must be in [0, 1), got {self.recon_warmup}")
        if len(self.recon_beta) != 2 or min(self.recon_beta) <= 0:
            raise ValueError(f"recon_beta must be two positive numbers (start, end), got {self.recon_beta!r}")
        if not isinstance(self.recon_cuda_graphs, bool):
            raise ValueError(f"recon_cuda_graphs must be True or False, got {self.recon_cuda_graphs!r}")
        if self.recon_parallel not in RECON_PARALLEL_MODES:
            raise ValueError(f"recon_parallel must be one of {', '.join(RECON_PARALLEL_MODES)}, "
                             f"got {self.recon_parallel!r}")
        if self.act_ema is not None and not 0 <= self.act_ema < 1:
            raise ValueError(f"act_ema must be in [0, 1) or None, got {self.act_ema}")
        if self.recon_units is not None and (isinstance(self.recon_units, str) or not all(
                isinstance(p, str) for p in self.recon_units)):
            raise ValueError("recon_units must be a list of unit-name patterns")

    @property
    def effective_fsc(self) -> str:
        """The FSC mode that applies: none when activations stay in full precision."""
        return "none" if self.abits >= 32 else self.fsc

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        d["sampler"] = SamplerConfig(**d.get("sampler", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
