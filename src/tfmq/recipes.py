"""Methods as recipes: data over the shared machinery.

A recipe names the stages to run, in order, and the config defaults of its paper. Stages are
small functions over a :class:`QuantContext`, registered in ``STAGES``; a method never copies
machinery, it only lists stages and settings.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from .calib.data import CalibrationData
from .calib.ranges import calibrate_activations, init_weight_ranges
from .quant.model import set_quant_state


class StageTimer:
    """Wall time per named stage, kept in insertion order."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return sum(self.times.values())

    def to_dict(self) -> dict:
        return {"stages_s": {k: round(v, 3) for k, v in self.times.items()}, "total_s": round(self.total(), 3)}


@dataclass
class QuantContext:
    """What the stages of a recipe share."""
    pipe: object
    denoiser: nn.Module
    config: object
    data: CalibrationData
    timer: StageTimer
    progress: bool = True
    work_dir: Path | None = None
    extra: dict = field(default_factory=dict)


def stage_weight_ranges(ctx: QuantContext) -> None:
    """Per-channel weight ranges (MSE search by default)."""
    init_weight_ranges(ctx.denoiser, ctx.config.weight_init, ctx.progress)
    set_quant_state(ctx.denoiser, weight=True, act=False)


def stage_act_ranges(ctx: QuantContext) -> None:
    """One activation range per quantizer, from every step of the calibration data."""
    c = ctx.config
    calibrate_activations(ctx.denoiser, ctx.data, c.act_init, per_step=False,
                          rows_per_step=c.act_rows_per_step, batch_size=c.calib_batch_size,
                          seed=c.seed, progress=ctx.progress)
    set_quant_state(ctx.denoiser, act=True)


StageFn = Callable[[QuantContext], None]
STAGES: dict[str, StageFn] = {
    "weight_ranges": stage_weight_ranges,
    "act_ranges": stage_act_ranges,
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    stages: tuple[str, ...]
    defaults: dict


RECIPES: dict[str, Recipe] = {
    "naive": Recipe(
        "naive",
        "plain PTQ: MSE-initialised per-channel weights, activation ranges from the calibration "
        "data (one set for all steps)",
        ("weight_ranges", "act_ranges"),
        {"weight_init": "mse", "act_init": "mse"}),
}


def get_recipe(name: str) -> Recipe:
    """Look up a method by name."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(RECIPES)}") from None


def run_recipe(ctx: QuantContext) -> None:
    """Run the method's stages in order, timing each."""
    recipe = get_recipe(ctx.config.method)
    for name in recipe.stages:
        with ctx.timer(name):
            STAGES[name](ctx)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False))
