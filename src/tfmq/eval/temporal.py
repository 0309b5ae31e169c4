"""Temporal feature analysis: how well a quantized denoiser keeps its temporal features.

For every sampling step, the cosine similarity between the full-precision temporal features
``g_i(h(t))`` and the quantized model's ``g^_i(h^(t))`` (averaged over the resnet blocks i and,
for class-conditional models, over the classes) -- the TFMQ-DM paper's "temporal feature error"
figure -- plus the relative squared error. Per-step activation parameters (FSC) are selected for
each step; a feature-cached model answers from its cache.

Results are written as JSON and drawn as a PNG line plot (matplotlib when installed, otherwise
a small PIL renderer: matplotlib is not a dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.temporal import find_temporal_block, finite_set, model_classes, temporal_features


@torch.no_grad()
def temporal_feature_similarity(fp_denoiser: nn.Module, q_denoiser: nn.Module,
                                timesteps: list[int] | None = None, classes: list[int] | None = None,
                                max_classes: int = 64) -> dict:
    """Per-step cosine similarity and relative error of the quantized temporal features.

    ``timesteps`` default to the ones the quantized model was calibrated for. For a
    class-conditional model ``classes`` default to the first ``max_classes`` rows of the class
    table (null class included when the table is that small)."""
    info = getattr(q_denoiser, "tfmq_info", None) or {}
    if timesteps is None:
        if "timesteps" not in info:
            raise ValueError("give the timesteps: the quantized model has no calibration info")
        timesteps = [int(t) for t in info["timesteps"]]
    block = find_temporal_block(fp_denoiser)
    if block.needs_conditioning:
        raise ValueError("temporal analysis needs a time embedding that depends on the timestep / class only")
    if block.class_conditional and classes is None:
        classes = (model_classes(fp_denoiser) or [0])[:max_classes]
    per_step = info.get("fsc", {}).get("n_sets", 1) > 1 and len(timesteps) == info["fsc"]["n_sets"]
    dev_fp = next(fp_denoiser.parameters()).device
    dev_q = next(q_denoiser.parameters()).device
    cos_steps, err_steps = [], []
    per_feature = {name: [] for name in block.projections}
    for s, t in enumerate(timesteps):
        tt, labels, _ = finite_set([t], classes if block.class_conditional else None)
        ref = temporal_features(fp_denoiser, tt.to(dev_fp), None if labels is None else labels.to(dev_fp),
                                block=block)
        got = temporal_features(q_denoiser, tt.to(dev_q), None if labels is None else labels.to(dev_q),
                                step_index=s if per_step else None)
        cos_i = [float(F.cosine_similarity(g.float().cpu(), r.float().cpu(), dim=1).mean())
                 for g, r in zip(got, ref)]
        num = sum(float(((g.float().cpu() - r.float().cpu()) ** 2).sum()) for g, r in zip(got, ref))
        den = sum(float((r.float().cpu() ** 2).sum()) for r in ref)
        for name, c in zip(block.projections, cos_i):
            per_feature[name].append(c)
        cos_steps.append(sum(cos_i) / len(cos_i))
        err_steps.append(num / max(den, 1e-30))
    return {"timesteps": [int(t) for t in timesteps], "cosine": cos_steps, "relative_error": err_steps,
            "mean_cosine": sum(cos_steps) / len(cos_steps), "min_cosine": min(cos_steps),
            "mean_relative_error": sum(err_steps) / len(err_steps), "per_feature_cosine": per_feature,
            "classes": classes, "method": info.get("method"), "fsc": info.get("fsc", {}).get("mode"),
            "temporal": info.get("temporal", {}).get("mode"), "wbits": info.get("wbits"),
            "abits": info.get("abits")}


# ---- plotting -------------------------------------------------------------------------------------
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def plot_cosine(reports: dict[str, dict], path: str | Path, title: str = "temporal feature cosine similarity") -> Path:
    """Line plot of cosine similarity per sampling step, one line per report."""
    path = Path(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(reports, path, title)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in reports.items():
        ax.plot(range(len(r["cosine"])), r["cosine"], label=label)
    ax.set_xlabel("sampling step (0 = first, t = T)")
    ax.set_ylabel("cosine(FP, quantized)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_pil(reports: dict[str, dict], path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw
    w, h, left, right, top, bottom = 900, 440, 70, 240, 40, 60     # legend in the right margin
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [v for r in reports.values() for v in r["cosine"]]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-6:
        lo, hi = lo - 1e-3, hi + 1e-3
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    n = max(len(r["cosine"]) for r in reports.values())

    def xy(i, v):
        x = left + (w - left - right) * (i / max(1, n - 1))
        y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):                                          # y ticks
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{v:.4f}", fill="black")
    for k in range(5):                                          # x ticks
        i = round((n - 1) * k / 4)
        x, _ = xy(i, lo)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 6, h - bottom + 6), str(i), fill="black")
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 60, h - 22), "sampling step", fill="black")
    for j, (label, r) in enumerate(reports.items()):
        color = COLORS[j % len(COLORS)]
        pts = [xy(i, v) for i, v in enumerate(r["cosine"])]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + 8 + 14 * j
        d.line([w - right + 10, ly + 6, w - right + 30, ly + 6], fill=color, width=3)
        d.text((w - right + 35, ly), f"{label} ({r['mean_cosine']:.4f})", fill="black")
    img.save(path)
    return path


def write_analysis(reports: dict[str, dict], out_dir: str | Path) -> dict[str, Path]:
    """``temporal_features.json`` (every report) and ``temporal_cosine.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "temporal_features.json"
    js.write_text(json.dumps(reports, indent=2))
    png = plot_cosine(reports, out_dir / "temporal_cosine.png")
    return {"json": js, "png": png}


def default_label(info: dict, path: str | Path) -> str:
    """'tfmq W4A8 (fsc all, tiar)' from a checkpoint's info; the folder name as a fallback."""
    if not info.get("method"):
        return Path(path).name
    extras = []
    if info.get("fsc", {}).get("mode") not in (None, "none"):
        extras.append(f"fsc {info['fsc']['mode']}")
    if info.get("temporal", {}).get("mode"):
        extras.append(info["temporal"]["mode"])
    tag = f" ({', '.join(extras)})" if extras else ""
    return f"{info['method']} W{info.get('wbits')}A{info.get('abits')}{tag}"


def analyze_checkpoints(model, checkpoints: list[str | Path], out_dir: str | Path,
                        labels: list[str] | None = None, device: str = "cpu",
                        progress: bool = True) -> dict:
    """Temporal-feature analysis of quantized checkpoints against the FP ``model`` (a hub id,
    pipeline folder or 'default'); writes the JSON and the plot into ``out_dir``."""
    from tqdm.auto import tqdm

    from ..api import load, load_any
    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    fp = load_any(model, device)
    from ..models.adapter import get_denoiser
    fp_denoiser = get_denoiser(fp)
    if getattr(fp_denoiser, "tfmq_info", None) is not None:
        raise ValueError("the reference model must be the full-precision pipeline, not a quantized checkpoint")
    reports = {}
    for i, ckpt in enumerate(tqdm(checkpoints, desc="temporal analysis", disable=not progress, leave=False)):
        q = load(ckpt, device)
        label = labels[i] if labels else default_label(get_denoiser(q).tfmq_info, ckpt)
        if label in reports:
            label = f"{label} [{Path(ckpt).name}]"
        report = temporal_feature_similarity(fp_denoiser, get_denoiser(q))
        report["checkpoint"] = str(ckpt)
        reports[label] = report
    paths = write_analysis(reports, out_dir)
    return {"reports": reports, "paths": {k: str(v) for k, v in paths.items()}}
