"""The evaluation matrix: FP and every (method, bits) cell on one model, side by side.

Each cell quantizes a fresh copy of the FP pipeline, writes its compact checkpoint, samples N
images from the same seeds as FP (DDIM eta 0 by default, so FP and quantized start from the same
noise and follow comparable trajectories) and measures:

* FID (and sFID where the network exposes spatial features) against a real data set's cached
  reference statistics; IS only where the network has a classifier, else "not available";
* CLIP score for text-to-image models (``prompts``) where CLIP weights are found locally
  (:mod:`tfmq.eval.clip_score`), else skipped with the reason in the report;
* PSNR / MSE of the final images against FP's (trajectory deviation);
* calibration time, checkpoint size against the FP32 denoiser, sampling time.

Everything lands in ``out/``: ``cells/<cell>/`` (samples.npz, cell.json, the checkpoint),
``report.json``, ``report.md`` and ``grid.png``. A finished cell is never recomputed, so an
interrupted evaluation continues where it stopped; a folder made with other settings is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..sampling import SamplerConfig

SETTINGS_FILE = "settings.json"
FRECHET_METHOD = "eigh"
#: settings that may change between runs into one folder: they do not change finished cells
#: (samples are seeded per image; metrics are cached per reference set)
FREE_SETTINGS = ("methods", "bits", "reference", "reference_size", "device", "batch_size", "grid_images",
                 "clip_model")


def parse_bits(spec: str) -> tuple[int, int]:
    """``w4a8`` -> (4, 8); ``w4a32`` = weights only."""
    s = spec.strip().lower()
    if not (s.startswith("w") and "a" in s):
        raise ValueError(f"bit setting {spec!r} must look like w4a8")
    w, a = s[1:].split("a", 1)
    try:
        return int(w), int(a)
    except ValueError:
        raise ValueError(f"bit setting {spec!r} must look like w4a8") from None


@dataclass
class EvalSettings:
    """What an evaluation runs. ``quant_overrides`` go to every method's QuantConfig."""
    model: str = "default"
    methods: list[str] = field(default_factory=lambda: ["fp", "naive", "tfmq"])
    bits: list[str] = field(default_factory=lambda: ["w8a8", "w4a8"])
    num_images: int = 1000
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    batch_size: int = 250
    calib_size: int = 256
    layer_policy: str = "tfmq-official"
    reference: str | None = "fashion-mnist-test"
    reference_size: int | None = None
    device: str = "cpu"
    grid_images: int = 8
    quant_overrides: dict = field(default_factory=dict)
    prompts: list[str] | None = None     # text-to-image models: cycled over the images
    clip_model: str | None = None        # local CLIP folder for the CLIP score (None: see clip_score)

    def cells(self) -> list[tuple[str, str, int, int]]:
        """(cell name, method, wbits, abits), FP first."""
        out = []
        if "fp" in self.methods:
            out.append(("fp", "fp", 32, 32))
        for m in self.methods:
            if m == "fp":
                continue
            for b in self.bits:
                w, a = parse_bits(b)
                out.append((f"{m}-w{w}a{a}", m, w, a))
        return out

    def validate(self) -> "EvalSettings":
        from ..quant.quantizer import check_bits
        from ..recipes import RECIPES
        if not self.methods:
            raise ValueError("no methods given; e.g. fp,naive,tfmq")
        for m in self.methods:
            if m != "fp" and m not in RECIPES:
                raise ValueError(f"unknown method {m!r}; choose from fp, {', '.join(RECIPES)}")
        # every bit setting, whatever the methods (an fp-only run must not accept a typo either)
        for b in self.bits:
            w, a = parse_bits(b)
            check_bits(w, f"weight bits in {b!r}")
            check_bits(a, f"activation bits in {b!r}")
        if any(m != "fp" for m in self.methods) and not self.bits:
            raise ValueError("quantized methods need at least one bit setting (--bits), e.g. w8a8")
        for _, m, w, a in self.cells():
            if m != "fp":   # validate every cell's config before any work
                self.quant_config(m, w, a)
        if self.num_images < 2:
            raise ValueError("need at least 2 images per cell (FID needs a covariance)")
        self.sampler.validate()
        return self

    def quant_config(self, method: str, wbits: int, abits: int):
        from ..config import QuantConfig
        extra = {"prompts": self.prompts} if self.prompts and "prompts" not in self.quant_overrides else {}
        return QuantConfig.for_method(method, wbits=wbits, abits=abits, sampler=self.sampler,
                                      calib_size=self.calib_size, seed=self.seed,
                                      layer_policy=self.layer_policy, **extra, **self.quant_overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _open_out(out: Path, settings: EvalSettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    current = json.loads(json.dumps(settings.to_dict()))
    if path.exists():
        previous = json.loads(path.read_text())
        # cells may be added, and metrics computed elsewhere; what decides the samples must match
        keep = {k: v for k, v in current.items() if k not in FREE_SETTINGS}
        prev = {k: v for k, v in previous.items() if k not in FREE_SETTINGS}
        if keep != prev:
            diff = sorted(k for k in keep if keep[k] != prev.get(k))
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(diff)}); "
                             f"use another --out folder")
    elif any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no evaluation; use another --out folder")
    path.write_text(json.dumps(current, indent=2))


def _fp32_denoiser_bytes(pipe) -> int:
    return sum(p.numel() * 4 for p in pipe.unet.parameters())


class _Metrics:
    """FID / sFID / IS against one reference set; the network and the reference statistics are
    loaded on first use. Results are cached per cell and reference (``metrics-<ref>-<n>.json``),
    so metrics can be computed on another machine than the samples (e.g. sample on a GPU that
    lacks the FID network, then run the same command on a CPU machine that has it)."""

    def __init__(self, settings: EvalSettings, progress: bool):
        self.settings = settings
        self.progress = progress
        self.available = settings.reference is not None
        self.reason = None if self.available else "no reference data set given"
        self.net = self.ref = None

    @property
    def cache_name(self) -> str:
        return f"metrics-{self.settings.reference}-{self.settings.reference_size or 'all'}.json"

    def _load(self) -> None:
        if self.ref is not None or not self.available:
            return
        try:
            from .inception import InceptionFeatures
            from .reference import reference_stats
            self.net = InceptionFeatures(device=self.settings.device, progress=self.progress)
            self.ref = reference_stats(self.settings.reference, self.settings.reference_size, network=self.net)
        except (FileNotFoundError, ImportError) as exc:
            self.available, self.reason = False, f"FID not available here: {exc}"

    def for_cell(self, cell_dir: Path, images: np.ndarray) -> dict:
        cached = cell_dir / self.cache_name
        if cached.exists():
            return json.loads(cached.read_text())
        result = self(images)
        if self.available:
            cached.write_text(json.dumps(result, indent=2))
        return result

    def __call__(self, images: np.ndarray) -> dict:
        from .inception_score import inception_score
        self._load()
        if not self.available:
            return {"fid": None, "sfid": None, "is": None, "metric_note": self.reason}
        from .fid import fid_from_stats, image_stats
        stats = image_stats(images, self.net, spatial=self.ref.spatial is not None)
        # the eigendecomposition form of Tr((S1 S2)^1/2): equal to scipy's sqrtm up to rounding
        # (checked in tests/test_eval_metrics.py) and several times faster at D = 2048 on CPU
        out = {"fid": fid_from_stats(stats.pool, self.ref.pool, method=FRECHET_METHOD)}
        out["sfid"] = (fid_from_stats(stats.spatial, self.ref.spatial, method=FRECHET_METHOD)
                       if stats.spatial is not None else None)
        is_result = inception_score(images, self.net)
        out["is"] = is_result.value
        if is_result.value is None:
            out["is_note"] = is_result.reason
        return out


class _ClipMetric:
    """CLIP score of a cell's images against their prompts (text-to-image models only), cached per
    cell and CLIP source in ``metrics-clip.json``; the scorer is loaded on first use."""
    CACHE = "metrics-clip.json"

    def __init__(self, settings: EvalSettings, progress: bool):
        from .clip_score import clip_source
        self.settings = settings
        self.progress = progress
        self.source = clip_source(settings.clip_model)
        self.scorer = None
        self.reason = None if settings.prompts else "only for text-to-image models (evaluated with --prompt)"

    def for_cell(self, cell_dir: Path, images: np.ndarray) -> dict:
        if self.reason is not None:
            return {"clip_score": None}
        cached = cell_dir / self.CACHE
        if cached.exists():
            data = json.loads(cached.read_text())
            if data.get("source") == self.source and data.get("prompts") == self.settings.prompts:
                return {"clip_score": data["clip_score"]}
        if self.scorer is None:
            from .clip_score import ClipScorer, ClipUnavailable
            try:
                self.scorer = ClipScorer(self.settings.clip_model, self.settings.device)
            except ClipUnavailable as exc:
                self.reason = f"skipped: {exc}"
                return {"clip_score": None}
        value = self.scorer.score(images, self.settings.prompts, self.progress)
        cached.write_text(json.dumps({"source": self.source, "prompts": self.settings.prompts,
                                      "clip_score": value}, indent=2))
        return {"clip_score": value}


def _run_cell(settings: EvalSettings, name: str, method: str, wbits: int, abits: int, cell_dir: Path,
              fp_images: np.ndarray | None, progress: bool) -> tuple[dict, np.ndarray]:
    import tfmq
    from ..api import load_any
    from ..checkpoint import checkpoint_size
    from ..sampling import generate
    pipe = load_any(settings.model, settings.device)
    row = {"cell": name, "method": method, "wbits": wbits, "abits": abits,
           "layer_policy": settings.layer_policy if method != "fp" else None,
           "sampler": settings.sampler.name, "steps": settings.sampler.steps, "n": settings.num_images,
           "seed": settings.seed, "device": settings.device,
           "fp32_denoiser_bytes": _fp32_denoiser_bytes(pipe)}
    if method != "fp":
        config = settings.quant_config(method, wbits, abits)
        tfmq.quantize(pipe, config, progress=progress)
        ckpt = tfmq.save(pipe, cell_dir / "checkpoint", overwrite=True)
        info = pipe.unet.tfmq_info
        row.update({"calibration_s": info["calibration_time"]["total_s"],
                    "calibration_stages_s": info["calibration_time"]["stages_s"],
                    "checkpoint_bytes": checkpoint_size(ckpt), "fsc": info.get("fsc"),
                    "recipe": info.get("recipe")})
        row["checkpoint_ratio"] = row["checkpoint_bytes"] / row["fp32_denoiser_bytes"]
    t0 = time.perf_counter()
    images = generate(pipe, settings.sampler, settings.num_images, settings.batch_size, settings.seed,
                      prompts=settings.prompts, progress=progress, desc=f"sampling {name}")
    row["sampling_s"] = time.perf_counter() - t0
    if fp_images is not None and method != "fp":
        from .metrics import mse, psnr
        row["mse_vs_fp"] = float(mse(images, fp_images))
        row["psnr_vs_fp"] = float(psnr(images, fp_images))
    np.savez(cell_dir / "samples.npz", arr_0=images)
    return row, images


def evaluate(settings: EvalSettings, out: str | Path, progress: bool = True) -> dict:
    """Run (or continue) the evaluation matrix into ``out``; returns the report."""
    settings.validate()
    out = Path(out)
    _open_out(out, settings)
    metrics = _Metrics(settings, progress)
    clip = _ClipMetric(settings, progress)
    rows, samples = [], {}
    fp_images = None
    cells = settings.cells()
    for name, method, w, a in tqdm(cells, desc="evaluation cells", disable=not progress):
        cell_dir = out / "cells" / name
        done = cell_dir / "cell.json"
        if done.exists():
            row = json.loads(done.read_text())
            images = np.load(cell_dir / "samples.npz")["arr_0"]
        else:
            cell_dir.mkdir(parents=True, exist_ok=True)
            row, images = _run_cell(settings, name, method, w, a, cell_dir, fp_images, progress)
            done.write_text(json.dumps(row, indent=2))
        row = {**row, **metrics.for_cell(cell_dir, images), **clip.for_cell(cell_dir, images)}
        if method == "fp":
            fp_images = images
        rows.append(row)
        samples[name] = images[: settings.grid_images]
    report = {"settings": settings.to_dict(), "rows": rows,
              "metric_notes": {"is": next((r.get("is_note") for r in rows if r.get("is_note")), None),
                               "fid": metrics.reason, "clip": clip.reason}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    save_comparison_grid(samples, out / "grid.png")
    return report


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def markdown_report(report: dict) -> str:
    """The report as a Markdown table, one row per cell."""
    s = report["settings"]
    samp = s["sampler"]
    lines = [
        f"# tfmq evaluation: {s['model']}",
        "",
        f"Sampler {samp['name']} {samp['steps']} steps (eta {samp['eta']}, guidance {samp['guidance_scale']}), "
        f"N = {s['num_images']} per cell, seed {s['seed']}, reference {s['reference']} "
        f"({s['reference_size'] or 'all'} images), calibration {s['calib_size']} trajectories, "
        f"layer policy {s['layer_policy']}.",
        "",
        "| method | W/A | FID | sFID | IS | CLIP | PSNR vs FP (dB) | MSE vs FP | calib (s) | ckpt (MB) | ckpt / FP32 | sampling (s) | policy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ck = r.get("checkpoint_bytes")
        lines.append(
            f"| {r['method']} | {r['wbits']}/{r['abits']} | {_fmt(r.get('fid'))} | {_fmt(r.get('sfid'))} | "
            f"{_fmt(r.get('is'))} | {_fmt(r.get('clip_score'))} | {_fmt(r.get('psnr_vs_fp'))} | {_fmt(r.get('mse_vs_fp'), '.1f')} | "
            f"{_fmt(r.get('calibration_s'), '.1f')} | {_fmt(ck / 1e6 if ck else None)} | "
            f"{_fmt(r.get('checkpoint_ratio'), '.1%')} | {_fmt(r.get('sampling_s'), '.1f')} | "
            f"{r.get('layer_policy') or '-'} |")
    notes = report.get("metric_notes", {})
    if notes.get("is"):
        lines += ["", f"IS: not available ({notes['is']})."]
    if notes.get("fid"):
        lines += ["", f"FID: {notes['fid']}."]
    if notes.get("clip"):
        lines += ["", f"CLIP score: {notes['clip']}."]
    return "\n".join(lines) + "\n"


def save_comparison_grid(samples: dict[str, np.ndarray], path: Path) -> None:
    """One row per cell (FP first), same seeds in each column, the cell name on the left."""
    from PIL import Image, ImageDraw
    from .grid import make_grid
    names = list(samples)
    if not names:
        return
    n = min(len(v) for v in samples.values())
    imgs = np.concatenate([samples[k][:n] for k in names])
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    grid = make_grid(imgs, ncols=n)
    label_w = 110
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (grid.shape[0] - 2) / len(names)
    for i, name in enumerate(names):
        draw.text((4, int(i * row_h + row_h / 2) - 5), name, fill="black")
    canvas.save(path)
