"""The evaluation matrix: FP and every (method, bits) cell on one model, side by side.

Each cell quantizes a fresh copy of the FP pipeline, writes its compact checkpoint, samples N
images from the same seeds as FP (DDIM eta 0 by default, so FP and quantized start from the same
noise and follow comparable trajectories) and measures:

* FID (and sFID where the network exposes spatial features) against a real data set's cached
  reference statistics, FID with a bootstrap interval (:mod:`tfmq.eval.fid_bootstrap`); IS only
  where the network has a classifier, else "not available";
* class accuracy of class-conditional models with a shipped classifier of the data set
  (:mod:`tfmq.eval.classifier`), else skipped with the reason;
* CLIP score for text-to-image models (``prompts``) where CLIP weights are found locally
  (:mod:`tfmq.eval.clip_score`), else skipped with the reason in the report;
* PSNR / MSE of the final images against FP's (trajectory deviation);
* calibration time, checkpoint size against the FP32 denoiser, sampling time.

Everything lands in ``out/``: ``cells/<cell>/`` (samples.npz, cell.json, the checkpoint),
``report.json``, ``report.md`` (see :mod:`tfmq.eval.report`) and ``grid.png``. A finished cell is
never recomputed, so an interrupted evaluation continues where it stopped; a folder made with
other settings is refused.

Under several processes (``torchrun`` / ``accelerate launch``, :mod:`tfmq.distributed`) every
process runs the same call: each cell's calibration and sampling are split over the ranks (sample
``i`` keeps seed ``seed + i``), each rank computes the Inception features of the images it drew and
the features are gathered in sample order; rank 0 writes every file. The report equals one
process's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from ..models.adapter import adapter_for, get_denoiser
from ..sampling import SamplerConfig
from .report import markdown_report  # noqa: F401  (re-exported: the CLI prints the report)

SETTINGS_FILE = "settings.json"
FRECHET_METHOD = "eigh"
#: settings that may change between runs into one folder: they do not change finished cells
#: (samples are seeded per image; metrics are cached per reference set)
FREE_SETTINGS = ("methods", "bits", "reference", "reference_size", "device", "batch_size", "grid_images",
                 "clip_model", "classifier", "fid_bootstrap")
#: backends that run the quantized cells; ``reference`` is the fake-quant simulation (the calibrated
#: pipeline itself); the others load the cell's checkpoint into runtime modules (tfmq.runtime)
BACKENDS = {"reference": "reference (fake-quant simulation)",
            "weight-only": "weight-only (runtime: packed weights expanded per layer, eager)",
            "w8a8": "w8a8 (runtime: INT8 tensor-core kernels, eager)"}


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
    classifier: str = "auto"             # class accuracy: auto (from the reference), none, or a name
    fid_bootstrap: int = 50              # bootstrap resamples of the FID interval (0: none)
    backend: str = "reference"           # what runs the quantized cells (see BACKENDS)

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
        from .classifier import CLASSIFIERS
        if self.classifier not in ("auto", "none", *CLASSIFIERS):
            raise ValueError(f"unknown classifier {self.classifier!r}; choose from auto, none, "
                             f"{', '.join(CLASSIFIERS)}")
        if not isinstance(self.fid_bootstrap, int) or self.fid_bootstrap < 0 or self.fid_bootstrap == 1:
            raise ValueError(f"fid_bootstrap must be 0 (no interval) or an integer >= 2, got {self.fid_bootstrap!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.backend != "reference":
            import torch
            from ..runtime.backends import get_backend
            reason = get_backend(self.backend).available(torch.device(self.device))
            if reason is not None:
                raise ValueError(reason)
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
        # settings added after the folder was made count as their defaults
        previous = {**json.loads(json.dumps(EvalSettings().to_dict())), **json.loads(path.read_text())}
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
    return sum(p.numel() * 4 for p in get_denoiser(pipe).parameters())


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
        for turn in ("main", "others"):      # rank 0 computes (and caches) the reference statistics first
            if (turn == "main") == distributed.is_main():
                try:
                    from .inception import InceptionFeatures
                    from .reference import reference_stats
                    self.net = InceptionFeatures(device=self.settings.device, progress=self.progress)
                    self.ref = reference_stats(self.settings.reference, self.settings.reference_size,
                                               network=self.net)
                except (FileNotFoundError, ImportError) as exc:
                    self.available, self.reason = False, f"FID not available here: {exc}"
            distributed.barrier()

    def _features(self, images: np.ndarray, spatial: bool):
        """Inception features of ``images`` in order; under several processes each rank extracts
        the block of images it sampled (the sampling shard) and the features are gathered."""
        from .inception import InceptionOutput
        if not distributed.is_distributed():
            return self.net.extract(images, spatial=spatial)
        part = distributed.shard(len(images), align=self.settings.batch_size)
        mine = self.net.extract(images[part.start:part.stop], spatial=spatial)
        spat = distributed.gather_rows(mine.spatial) if spatial else None
        return InceptionOutput(distributed.gather_rows(mine.pool), spat)

    def _bootstrap_key(self) -> dict | None:
        b = self.settings.fid_bootstrap
        return {"resamples": b, "seed": self.settings.seed} if b else None

    def for_cell(self, cell_dir: Path, images: np.ndarray) -> dict:
        cached = cell_dir / self.cache_name
        data = None
        if distributed.is_main() and cached.exists():
            data = json.loads(cached.read_text())
            boot = data.get("fid_bootstrap")
            key = {k: boot[k] for k in ("resamples", "seed")} if boot else None
            if not ("fid_bootstrap" in data and key == self._bootstrap_key()):
                data = None
        if distributed.broadcast_object(data is not None):     # every rank follows rank 0
            return data if distributed.is_main() else {}
        result = self(images)
        if self.available and distributed.is_main():
            cached.write_text(json.dumps(result, indent=2))
        return result

    def __call__(self, images: np.ndarray) -> dict:
        from .inception_score import inception_score
        self._load()
        if not self.available:
            return {"fid": None, "sfid": None, "is": None, "metric_note": self.reason}
        from .fid import feature_stats, fid_from_stats
        from .fid_bootstrap import bootstrap_interval, fid_and_bootstrap
        feats = self._features(images, spatial=self.ref.spatial is not None and self.net.has_spatial)
        if not distributed.is_main():
            return {}                 # rank 0 computes the metrics and writes them
        # FID and its bootstrap from N x N Gram matrices (N <= 2048) or the eigendecomposition form
        # of Tr((S1 S2)^1/2) (N > 2048): equal to scipy's sqrtm up to rounding (checked in
        # tests/test_eval_metrics.py and tests/test_fid_bootstrap.py) and far faster on CPU
        b = self.settings.fid_bootstrap
        if b:
            fid, boot = fid_and_bootstrap(feats.pool, self.ref.pool, b, self.settings.seed)
        else:
            fid, boot = fid_from_stats(feature_stats(feats.pool), self.ref.pool, method=FRECHET_METHOD), None
        out = {"fid": fid, "fid_n": len(images)}
        if boot is not None:
            out["fid_ci"] = list(bootstrap_interval(fid, boot))
            out["fid_bootstrap"] = {"resamples": b, "seed": self.settings.seed, "samples": boot.tolist()}
        else:
            out["fid_bootstrap"] = None
        out["sfid"] = (fid_from_stats(feature_stats(feats.spatial), self.ref.spatial, method=FRECHET_METHOD)
                       if feats.spatial is not None else None)
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


class _ClassMetric:
    """Class accuracy of a class-conditional model's cells (:mod:`tfmq.eval.classifier`), cached
    per cell in ``metrics-class-<classifier>.json``. Unconditional models get nothing (the metric
    does not apply); a class-conditional model without a matching classifier gets the reason."""

    def __init__(self, settings: EvalSettings):
        from .classifier import classifier_for_reference
        self.settings = settings
        self.name = (classifier_for_reference(settings.reference) if settings.classifier == "auto"
                     else None if settings.classifier == "none" else settings.classifier)
        if settings.classifier == "none":
            self.skip = "turned off (--classifier none)"
        elif self.name is None:
            self.skip = (f"skipped: no classifier for the reference data set {settings.reference!r} (shipped: "
                         f"fashion-mnist, mnist; choose one with --classifier)" if settings.reference else
                         "skipped: no reference data set to choose a classifier from; pass --classifier")
        else:
            self.skip = None
        self.reason = None          # set once a class-conditional cell met the skip / a failure
        self.classifier = None
        self._labels = None

    def info(self) -> dict | None:
        """What the report says about the classifier that ran."""
        if self.classifier is None:
            return None
        m = self.classifier.meta
        return {"name": self.classifier.name, "test_accuracy": m["test_accuracy"], "test_n": m["test_n"],
                "num_classes": len(m["classes"])}

    def _sample_labels(self, cell_dir: Path) -> np.ndarray | None:
        path = cell_dir / "samples.npz"
        with np.load(path) as z:
            if "class_labels" in z.files:
                return z["class_labels"]
        if self._labels is None:      # a cell written before labels were stored: draw them again
            from ..api import load_any
            from ..sampling import build_conditioning
            pipe = load_any(self.settings.model, "cpu")
            cond = build_conditioning(pipe, self.settings.num_images, self.settings.seed,
                                      guidance_scale=self.settings.sampler.guidance_scale)
            self._labels = None if cond.class_labels is None else cond.class_labels.numpy()
        return self._labels

    def for_cell(self, cell_dir: Path, row: dict, images: np.ndarray) -> dict:
        if row.get("class_conditional") is False or self.settings.prompts:
            return {}
        if "class_conditional" not in row and self._sample_labels(cell_dir) is None:
            return {}                 # a cell written before the flag was stored, of an unconditional model
        if self.skip is not None:
            self.reason = self.skip
            return {"class_accuracy": None}
        from .classifier import ClassifierUnavailable, class_accuracy
        cached = cell_dir / f"metrics-class-{self.name}.json"
        try:
            self._load()
            if cached.exists():
                data = json.loads(cached.read_text())
                if data.get("n") == len(images):
                    return {"class_accuracy": data["class_accuracy"]}
            result = class_accuracy(self.classifier, images, self._sample_labels(cell_dir))
        except ClassifierUnavailable as exc:
            self.reason = f"skipped: {exc}"
            return {"class_accuracy": None}
        cached.write_text(json.dumps({"class_accuracy": result["class_accuracy"], "n": len(images),
                                      "classifier": self.name}, indent=2))
        return {"class_accuracy": result["class_accuracy"]}

    def _load(self) -> None:
        from .classifier import load_classifier
        if self.classifier is None:
            self.classifier = load_classifier(self.name)


def _run_cell(settings: EvalSettings, name: str, method: str, wbits: int, abits: int, cell_dir: Path,
              fp_images: np.ndarray | None, progress: bool) -> tuple[dict, np.ndarray]:
    import tfmq
    from ..api import load_any
    from ..checkpoint import checkpoint_size
    from ..models.adapter import has_class_labels
    from ..sampling import build_conditioning, generate
    pipe = load_any(settings.model, settings.device)
    labels = None
    if not settings.prompts and has_class_labels(get_denoiser(pipe)):   # the labels generate() draws
        labels = build_conditioning(pipe, settings.num_images, settings.seed,
                                    guidance_scale=settings.sampler.guidance_scale).class_labels.cpu().numpy()
    row = {"cell": name, "method": method, "wbits": wbits, "abits": abits,
           "layer_policy": settings.layer_policy if method != "fp" else None,
           "sampler": settings.sampler.name, "steps": settings.sampler.steps, "n": settings.num_images,
           "seed": settings.seed, "device": settings.device,
           "backend": BACKENDS[settings.backend] if method != "fp" else None,
           "class_conditional": labels is not None, "fp32_denoiser_bytes": _fp32_denoiser_bytes(pipe),
           "denoiser": type(get_denoiser(pipe)).__name__,
           "not_transferred": list(adapter_for(get_denoiser(pipe)).not_transferred)}
    if method != "fp":
        config = settings.quant_config(method, wbits, abits)
        tfmq.quantize(pipe, config, progress=progress)
        ckpt = cell_dir / "checkpoint"
        if distributed.is_main():
            tfmq.save(pipe, ckpt, overwrite=True)
        distributed.barrier()
        info = get_denoiser(pipe).tfmq_info
        row.update({"calibration_s": info["calibration_time"]["total_s"],
                    "calibration_stages_s": info["calibration_time"]["stages_s"],
                    "checkpoint_bytes": checkpoint_size(ckpt), "fsc": info.get("fsc"),
                    "recipe": info.get("recipe")})
        row["checkpoint_ratio"] = row["checkpoint_bytes"] / row["fp32_denoiser_bytes"]
        if settings.backend != "reference":          # sample from the deployable runtime instead
            pipe = tfmq.load(ckpt, settings.device, backend=settings.backend)
    t0 = time.perf_counter()
    part = distributed.shard(settings.num_images, align=settings.batch_size) \
        if distributed.is_distributed() else None     # several processes: each draws its block
    images = generate(pipe, settings.sampler, settings.num_images, settings.batch_size, settings.seed,
                      prompts=settings.prompts, progress=progress, desc=f"sampling {name}", indices=part)
    images = distributed.gather_rows(images)
    row["sampling_s"] = time.perf_counter() - t0
    if fp_images is not None and method != "fp":
        from .metrics import mse, psnr
        row["mse_vs_fp"] = float(mse(images, fp_images))
        row["psnr_vs_fp"] = float(psnr(images, fp_images))
    if distributed.is_main():
        np.savez(cell_dir / "samples.npz", arr_0=images, **({"class_labels": labels} if labels is not None else {}))
    return row, images


def evaluate(settings: EvalSettings, out: str | Path, progress: bool = True) -> dict:
    """Run (or continue) the evaluation matrix into ``out``; returns the report."""
    from .fid_bootstrap import DEFAULT_LEVEL
    from .report_settings import non_default_settings
    settings.validate()
    out = Path(out)
    error = None
    if distributed.is_main():
        try:
            _open_out(out, settings)
        except (ValueError, FileExistsError) as exc:
            error = exc
    error = distributed.broadcast_object(error)      # every rank stops alike
    if error is not None:
        raise error
    metrics = _Metrics(settings, progress)
    clip = _ClipMetric(settings, progress)
    classes = _ClassMetric(settings)
    rows, samples = [], {}
    fp_images = None
    cells = settings.cells()
    for name, method, w, a in tqdm(cells, desc="evaluation cells", disable=not progress):
        cell_dir = out / "cells" / name
        done = cell_dir / "cell.json"
        if distributed.broadcast_object(done.exists()):     # rank 0 decides: all ranks agree
            row = json.loads(done.read_text())
            images = np.load(cell_dir / "samples.npz")["arr_0"]
        else:
            if distributed.is_main():
                cell_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            row, images = _run_cell(settings, name, method, w, a, cell_dir, fp_images, progress)
            if distributed.is_main():
                done.write_text(json.dumps(row, indent=2))
        row = {**row, **metrics.for_cell(cell_dir, images)}
        if distributed.is_main():          # the other ranks only help with sampling and features
            row = {**row, **clip.for_cell(cell_dir, images), **classes.for_cell(cell_dir, row, images)}
        distributed.barrier()
        if method == "fp":
            fp_images = images
        rows.append(row)
        samples[name] = images[: settings.grid_images]
    report = {"settings": settings.to_dict(), "rows": rows,
              "backend": BACKENDS[settings.backend],
              "non_default_settings": non_default_settings(settings),
              "fid_bootstrap": ({"resamples": settings.fid_bootstrap, "seed": settings.seed,
                                 "level": DEFAULT_LEVEL} if settings.fid_bootstrap and metrics.available else None),
              "classifier": classes.info(),
              "metric_notes": {"is": next((r.get("is_note") for r in rows if r.get("is_note")), None),
                               "fid": metrics.reason, "clip": clip.reason, "class_accuracy": classes.reason},
              "grid": "grid.png"}
    if distributed.is_main():
        save_comparison_grid(samples, out / "grid.png")
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(markdown_report(report))
    distributed.barrier()
    return report


def save_comparison_grid(samples: dict[str, np.ndarray], path: Path) -> None:
    """One row per cell (FP first), same seeds in each column, a compact label above each row
    (see :func:`tfmq.eval.grid.comparison_grid`)."""
    from .grid import comparison_grid, to_pil
    if samples:
        to_pil(comparison_grid(samples)).save(path)
