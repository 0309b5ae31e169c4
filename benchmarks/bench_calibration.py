"""Calibration-time benchmark of the qdiff or tfmq method on a DDPM-CIFAR10-sized UNet.

The denoiser is a ``UNet2DModel`` built from the configuration of ``google/ddpm-cifar10-32``
(written out below: there is no network access) with RANDOM weights (seeded). Timings depend on
the architecture, the sizes and the iteration counts, not on the weights, so they are
representative; the reconstruction errors printed alongside are not (random weights).

Two settings are timed, each stage separately (data collection, weight ranges, every
reconstruction unit, activation ranges, activation step learning, freezing):

  * ``default``: the project's defaults (2,000 AdaRound iterations a unit, 500 activation-step
    iterations), measured end to end (or, with ``--measure-iters-default N``, extrapolated like
    the reference setting and labelled so);
  * ``reference``: the reference implementations' values (20,000 / 5,000 iterations a unit).
    With ``--measure-iters N`` (the default, 500) every unit runs only N iterations and the
    time of the remaining iterations is EXTRAPOLATED from the measured time per iteration of
    that unit; the output says so on every extrapolated figure. ``--measure-iters 0`` runs the
    full 20,000 iterations (hours on one GPU).

``--method tfmq`` runs TFMQ-DM's recipe (TIAR, reconstruction on every ``interval_length``-th
step, FSC, activation step learning) instead of Q-Diffusion's. ``--time-limit S`` stops a run
cleanly after S seconds (SIGALRM) and still reports every stage and unit finished by then, with
``"complete": false`` and where it stopped, so a too-slow run returns data.

Usage (GPU)::

    python benchmarks/bench_calibration.py --device cuda --run default   --json OUT/default.json
    python benchmarks/bench_calibration.py --device cuda --method tfmq --run default --time-limit 240 \
        --json OUT/tfmq_default.json
    python benchmarks/bench_calibration.py --device cuda --run reference --json OUT/reference.json

A CPU smoke run with tiny settings::

    python benchmarks/bench_calibration.py --device cpu --run default --calib-size 4 --steps 10 \
        --recon-iters 2 --act-iters 2 --units 'down_blocks.0.*'
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import tfmq
import tfmq.recipes
from tfmq.calib.reconstruction import RECON_PRESETS
from tfmq.models.adapter import get_denoiser
from tfmq.sampling import SamplerConfig
from results_io import write_results

#: google/ddpm-cifar10-32's unet/config.json (35.7M parameters).
CIFAR10_UNET_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 0, "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": 32,
    "norm_eps": 1e-6,
}
#: google/ddpm-cifar10-32's scheduler/scheduler_config.json (the parts that matter here).
CIFAR10_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                            "beta_schedule": "linear", "clip_sample": True, "variance_type": "fixed_large"}
MODEL_LABEL = "UNet2DModel with google/ddpm-cifar10-32's config, RANDOM weights (seed {seed})"


def build_pipeline(seed: int, device: str) -> DDPMPipeline:
    torch.manual_seed(seed)
    unet = UNet2DModel(**CIFAR10_UNET_CONFIG).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**CIFAR10_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class TimeLimit(Exception):
    """Raised by the SIGALRM handler when ``--time-limit`` is reached."""


class Progress:
    """Stage and unit completion times of one run, recorded as they happen (so that a run stopped
    by the time limit still reports how far it got)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.current: str | None = "calibration_data"
        self.started = self.t0
        self.units: list[dict] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def wrap(self, name, fn):
        def stage(ctx):
            if self.current == "calibration_data":      # the api's first stage ends here
                self.stages["calibration_data"] = time.perf_counter() - self.started
            self.current, self.started = name, time.perf_counter()
            fn(ctx)
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - self.started
            self.current = None
        return stage

    def on_unit(self, phase, unit, stats):
        self.units.append({"phase": phase, "unit": unit, "at_s": round(self.now(), 3),
                           "seconds": stats.get("seconds"), "optimize_s": stats.get("optimize_s"),
                           "iters": stats.get("iters"), "loop": stats.get("loop")})


ALARMED = []


def _alarm(signum, frame):
    ALARMED.append(time.perf_counter())
    raise TimeLimit()


def run_setting(name: str, args, measure_iters: int | None) -> dict:
    """Quantize a fresh pipeline with one setting; returns its timings (measured and, where
    iterations were cut, extrapolated)."""
    values = dict(RECON_PRESETS[name])
    if args.recon_iters is not None:
        values["recon_iters"] = args.recon_iters
    if args.act_iters is not None:
        values["act_learn_iters"] = args.act_iters
    if args.tiar_iters is not None:
        values["tiar_iters"] = args.tiar_iters
    target = {"reconstruct": values["recon_iters"], "act_learning": values["act_learn_iters"]}
    run_values = dict(values)
    if measure_iters:
        run_values["recon_iters"] = min(measure_iters, values["recon_iters"])
        run_values["act_learn_iters"] = min(measure_iters, values["act_learn_iters"])
    extra = {}
    if args.calib_size is not None:
        extra["calib_size"] = args.calib_size
    if args.calib_steps is not None:
        extra["calib_steps"] = args.calib_steps
    if args.method != "tfmq":
        run_values.pop("tiar_iters", None)
    config = tfmq.QuantConfig.for_method(
        args.method, wbits=4, abits=8, sampler=SamplerConfig("ddim", args.steps),
        calib_batch_size=args.calib_batch_size, seed=args.seed, recon_bf16=args.bf16,
        recon_units=args.units, layer_policy=args.layer_policy, recon_cuda_graphs=not args.no_graphs,
        **extra, **run_values)
    pipe = build_pipeline(args.seed, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    progress = Progress()
    saved = dict(tfmq.recipes.STAGES)
    for stage, fn in saved.items():
        tfmq.recipes.STAGES[stage] = progress.wrap(stage, fn)
    if args.time_limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    t0 = progress.t0 = time.perf_counter()
    progress.started = t0
    try:
        tfmq.quantize(pipe, config, progress=not args.no_progress, on_unit=progress.on_unit)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    except BaseException as e:      # TimeLimit, or what it turned into where it struck (e.g. a capture)
        if not ALARMED:
            raise
        signal.setitimer(signal.ITIMER_REAL, 0)
        ALARMED.clear()
        if not isinstance(e, TimeLimit):
            print(f"(the time limit struck inside {type(e).__name__}: {e})", flush=True)
        tfmq.recipes.STAGES.update(saved)
        wall = time.perf_counter() - t0
        print(f"TIME LIMIT of {args.time_limit} s reached in stage {progress.current!r} after "
              f"{len(progress.units)} units; the run is INCOMPLETE", flush=True)
        return {"setting": name, "complete": False, "stopped_in_stage": progress.current,
                "time_limit_s": args.time_limit, "wall_s": wall,
                "finished_stages_s": {k: round(v, 3) for k, v in progress.stages.items()},
                "units_done": progress.units, "config": config.to_dict()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        tfmq.recipes.STAGES.update(saved)
    wall = time.perf_counter() - t0
    info = get_denoiser(pipe).tfmq_info
    times = info["calibration_time"]
    stages = dict(times["stages_s"])
    units = {s: dict(u) for s, u in times.get("units_s", {}).items()}
    extrapolated = {}
    for stage, key in (("reconstruct", "reconstruction"), ("act_learning", "act_learning")):
        ran = run_values["recon_iters" if stage == "reconstruct" else "act_learn_iters"]
        if ran == target[stage] or stage not in stages:
            continue
        stage_units = {}
        for unit, st in info.get(key, {}).items():
            per_iter = st["optimize_s"] / max(1, ran)
            stage_units[unit] = st["seconds"] - st["optimize_s"] + per_iter * target[stage]
        extra = sum(stage_units.values()) - sum(info[key][u]["seconds"] for u in stage_units)
        extrapolated[stage] = {"measured_iters_per_unit": ran, "target_iters_per_unit": target[stage],
                               "stage_s": stages[stage] + extra, "units_s": stage_units}
    result = {
        "setting": name, "complete": True, "iters_per_unit": target, "ran_iters_per_unit":
            {"reconstruct": run_values["recon_iters"], "act_learning": run_values["act_learn_iters"]},
        "measured": {"stages_s": stages, "units_s": units, "total_s": times["total_s"], "wall_s": wall},
        "extrapolated": extrapolated,
        "units": len(info.get("reconstruction", {})),
        "unit_errors": {u: {"naive": s["error_before"], "reconstructed": s["error_after"]}
                        for u, s in info.get("reconstruction", {}).items()},
        "loops": sorted({str(u.get("loop")) for u in progress.units}),
        "temporal": {k: v for k, v in info.get("temporal", {}).items() if k != "layers"},
        "config": config.to_dict(),
    }
    if extrapolated:
        total = sum(extrapolated.get(s, {}).get("stage_s", v) for s, v in stages.items())
        result["extrapolated_total_s"] = total
    return result


def print_table(results: list[dict]) -> None:
    for r in results:
        if not r["complete"]:
            print(f"{r['setting']}: INCOMPLETE (time limit {r['time_limit_s']} s, stopped in "
                  f"{r['stopped_in_stage']!r}); finished stages (s): {r['finished_stages_s']}; "
                  f"{len(r['units_done'])} units done")
    results = [r for r in results if r["complete"]]
    if not results:
        return
    stages = []
    for r in results:
        for s in r["measured"]["stages_s"]:
            if s not in stages:
                stages.append(s)
    cols = []
    for r in results:
        cols.append((f"{r['setting']} (measured, {r['ran_iters_per_unit']['reconstruct']}/"
                     f"{r['ran_iters_per_unit']['act_learning']} it)", r["measured"]["stages_s"],
                     r["measured"]["total_s"]))
        if r["extrapolated"]:
            ex = {s: r["extrapolated"].get(s, {}).get("stage_s", v) for s, v in r["measured"]["stages_s"].items()}
            cols.append((f"{r['setting']} EXTRAPOLATED to {r['iters_per_unit']['reconstruct']}/"
                         f"{r['iters_per_unit']['act_learning']} it", ex, r["extrapolated_total_s"]))
    width = max(len(s) for s in stages + ["total"])
    head = f"{'stage':<{width}}" + "".join(f" | {c[0]:>40}" for c in cols)
    print(head)
    print("-" * len(head))
    for s in stages + ["total"]:
        cells = "".join(f" | {(c[2] if s == 'total' else c[1].get(s, float('nan'))):>40.1f}" for c in cols)
        print(f"{s:<{width}}{cells}")
    print("(seconds; 'it' = AdaRound / activation-step iterations per unit)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--run", choices=["default", "reference", "both"], default="both")
    p.add_argument("--measure-iters", type=int, default=500,
                   help="reference setting: iterations actually run per unit, the rest extrapolated "
                        "(0 = run all 20,000)")
    p.add_argument("--measure-iters-default", type=int, default=0,
                   help="default setting: the same, if its full run does not fit the time available "
                        "(0 = run all, the default)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration sampler (100)")
    p.add_argument("--method", choices=["qdiff", "tfmq"], default="qdiff")
    p.add_argument("--calib-size", type=int, default=None,
                   help="trajectories (default: the method's, 256 for both)")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="qdiff: steps used (default: the method's, Q-Diffusion --cali_st 20)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="stop the run cleanly after this many seconds, reporting how far it got (0: none)")
    p.add_argument("--no-graphs", action="store_true", help="run the loops eagerly (no CUDA graphs)")
    p.add_argument("--calib-batch-size", type=int, default=32)
    p.add_argument("--recon-iters", type=int, default=None, help="override the setting's AdaRound iterations")
    p.add_argument("--act-iters", type=int, default=None, help="override the setting's activation iterations")
    p.add_argument("--tiar-iters", type=int, default=None, help="tfmq: override the setting's TIAR iterations")
    p.add_argument("--units", nargs="*", default=None, help="only these unit patterns (smoke tests)")
    p.add_argument("--layer-policy", default="tfmq-official")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the unit forwards (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    pipe = build_pipeline(args.seed, "cpu")
    n_params = sum(p.numel() for p in get_denoiser(pipe).parameters())
    del pipe
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    label = MODEL_LABEL.format(seed=args.seed)
    print(f"model: {label}, {n_params / 1e6:.1f}M parameters")
    print(f"method: {args.method} W4A8, policy {args.layer_policy}, DDIM {args.steps} steps, "
          f"calib_size {args.calib_size or 'default'}, calib_steps {args.calib_steps or 'default'}; "
          f"device {args.device} ({device_name}), CUDA graphs {'off' if args.no_graphs else 'on (CUDA)'}")

    settings = ["default", "reference"] if args.run == "both" else [args.run]
    results = []
    for name in settings:
        measure = args.measure_iters if name == "reference" else args.measure_iters_default
        results.append(run_setting(name, args, measure))
    print_table(results)
    for r in results:
        if r["complete"] and r["extrapolated"]:
            ex = r["extrapolated"]["reconstruct"] if "reconstruct" in r["extrapolated"] else next(iter(r["extrapolated"].values()))
            print(f"NOTE: '{r['setting']}' ran {ex['measured_iters_per_unit']} iterations per unit; times "
                  f"labelled EXTRAPOLATED scale each unit's measured time per iteration to "
                  f"{ex['target_iters_per_unit']} iterations.")
    out = {"model": label, "parameters": n_params, "device": args.device, "device_name": device_name,
           "torch": torch.__version__, "python": sys.version.split()[0], "method": args.method, "wbits": 4,
           "abits": 8, "results": results}
    if args.json:
        write_results(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
