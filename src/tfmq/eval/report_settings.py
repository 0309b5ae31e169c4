"""Which settings of an evaluation differ from the defaults, and which of them are cut down.

A report that omits its overrides reads as if the defaults were used: 20 AdaRound iterations look
like 2,000. :func:`non_default_settings` lists every evaluation setting that differs from
:class:`~tfmq.eval.evaluate.EvalSettings`' defaults (which are the CLI's) and every QuantConfig
value that ``--set`` (``quant_overrides``, presets included) moves away from a method's own
default, marking as *reduced* those that make the run quicker and noisier than the default one
(fewer images, steps, calibration trajectories, real images or iterations).
"""

from __future__ import annotations

import dataclasses

__all__ = ["non_default_settings", "DATASET_SIZES", "STAGE_OF_OPTION"]

#: images in each reference data set (what ``reference_size=None`` means)
DATASET_SIZES = {"fashion-mnist-test": 10_000, "fashion-mnist-train": 60_000, "mnist-5k": 5_000}

#: which recipe stage reads a QuantConfig option (by name prefix); options not listed apply to
#: every method or to several stages
STAGE_OF_OPTION = {"recon_": "reconstruct", "act_learn_": "act_learning", "tiar_iters": "temporal",
                   "interval_length": "reconstruct"}

#: QuantConfig options that, set lower than the method's default, make calibration quicker
_REDUCIBLE_OPTIONS = ("recon_iters", "act_learn_iters", "tiar_iters", "recon_rows", "calib_steps")


def _entry(setting: str, value, default, reduced: bool, source: str, **extra) -> dict:
    return {"setting": setting, "value": value, "default": default, "reduced": bool(reduced),
            "source": source, **extra}


def _eval_level(settings) -> list[dict]:
    d = type(settings)()                  # the defaults of the settings' own class (EvalSettings)
    s, ds = settings.sampler, d.sampler
    quantized = any(m != "fp" for m in settings.methods)
    out = []
    if settings.num_images != d.num_images:
        out.append(_entry("images per cell (--num-images)", settings.num_images, d.num_images,
                          settings.num_images < d.num_images, "flag"))
    if s.steps != ds.steps:
        out.append(_entry("sampling steps (--steps)", s.steps, ds.steps, s.steps < ds.steps, "flag"))
    for name, flag in (("name", "--sampler"), ("eta", "--eta"), ("guidance_scale", "--guidance-scale")):
        if getattr(s, name) != getattr(ds, name):
            out.append(_entry(f"sampler {name} ({flag})", getattr(s, name), getattr(ds, name), False, "flag"))
    if settings.seed != d.seed:
        out.append(_entry("seed (--seed)", settings.seed, d.seed, False, "flag"))
    if quantized and settings.calib_size != d.calib_size:
        out.append(_entry("calibration trajectories (--calib-size)", settings.calib_size, d.calib_size,
                          settings.calib_size < d.calib_size, "flag"))
    if quantized and settings.layer_policy != d.layer_policy:
        out.append(_entry("layer policy (--layer-policy)", settings.layer_policy, d.layer_policy, False, "flag"))
    if settings.reference != d.reference:
        out.append(_entry("FID reference (--reference)", settings.reference or "none", d.reference, False, "flag"))
    if settings.reference is not None and settings.reference_size is not None:
        full = DATASET_SIZES.get(settings.reference)
        if full is None or settings.reference_size < full:
            out.append(_entry("real images for FID (--reference-size)", settings.reference_size,
                              f"all {full:,}" if full else "all", True, "flag"))
    return out


def _option_entries(settings) -> list[dict]:
    """--set values: per option, the value and each quantized method's own default."""
    from ..config import QuantConfig
    from ..recipes import get_recipe
    cells = [(m, w, a) for _, m, w, a in settings.cells() if m != "fp"]
    if not settings.quant_overrides or not cells:
        return []
    base = dict(sampler=settings.sampler, calib_size=settings.calib_size, seed=settings.seed,
                layer_policy=settings.layer_policy)
    if settings.prompts:
        base["prompts"] = settings.prompts
    changed: dict[str, dict] = {}
    for method, w, a in cells:
        default = QuantConfig.for_method(method, wbits=w, abits=a, **base)
        actual = settings.quant_config(method, w, a)
        for f in dataclasses.fields(QuantConfig):
            dv, av = getattr(default, f.name), getattr(actual, f.name)
            if dv != av:
                e = changed.setdefault(f.name, {"value": av, "defaults": {}})
                e["defaults"][method] = dv
    out = []
    preset = settings.quant_overrides.get("preset")
    for name, e in changed.items():
        stage = next((st for prefix, st in STAGE_OF_OPTION.items() if name.startswith(prefix)), None)
        methods = sorted(e["defaults"])
        used_by = [m for m in methods if stage is None or stage in get_recipe(m).stages]
        defaults = sorted({repr(v) if not isinstance(v, (int, float, str)) else v
                           for v in e["defaults"].values()}, key=str)
        default = defaults[0] if len(defaults) == 1 else ", ".join(f"{m} {e['defaults'][m]}" for m in methods)
        value = e["value"]
        reduced = (bool(used_by) and name in _REDUCIBLE_OPTIONS and value is not None and all(
            dv is None or (isinstance(dv, (int, float)) and value < dv) for dv in e["defaults"].values()))
        source = "--set" if name in settings.quant_overrides else f"preset {preset}"
        out.append(_entry(name, value, default, reduced, source, used_by=used_by))
    return out


def non_default_settings(settings) -> list[dict]:
    """Every setting of ``settings`` (an EvalSettings) that differs from the defaults.

    Returns dicts with ``setting``, ``value``, ``default``, ``reduced`` (True when the change makes
    the run quicker and its numbers noisier than the default run's), ``source`` (``flag``,
    ``--set`` or ``preset NAME``) and, for QuantConfig options, ``used_by`` (the methods of this
    run whose recipe reads the option).
    """
    return _eval_level(settings) + _option_entries(settings)
