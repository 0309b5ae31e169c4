"""CLIP score: the formula against a direct computation, prompt cycling, the skip message without
local weights, and `tfmq evaluate` on a text-to-image pipeline.

The CLIP model and the Stable-Diffusion-shaped pipeline are tiny with RANDOM weights (no CLIP
weights can be downloaded here): the scores check the plumbing and the arithmetic, not quality.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_clip_dir, tiny_sd_pipeline

from tfmq.eval.clip_score import ClipScorer, ClipUnavailable
from tfmq.eval.evaluate import EvalSettings, evaluate
from tfmq.sampling import SamplerConfig


@pytest.fixture
def clip_dir(tmp_path):
    d = tmp_path / "clipsrc"
    d.mkdir()
    return tiny_clip_dir(d)


def images(n, seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def direct_cosines(clip_dir, imgs, texts):
    """Cosine of L2-normalised image / text projections, computed from the two encoders apart."""
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():
        pix = proc(images=list(imgs), return_tensors="pt")["pixel_values"]
        tok = proc(text=texts, return_tensors="pt", padding=True)
        f = model.get_image_features(pixel_values=pix)
        t = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    f = f if torch.is_tensor(f) else f.pooler_output
    t = t if torch.is_tensor(t) else t.pooler_output
    f, t = f / f.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return (f * t).sum(-1).numpy()


def test_clip_score_matches_the_direct_formula_and_cycles_prompts(clip_dir):
    scorer = ClipScorer(str(clip_dir), batch_size=2)          # batches of 2: 5 images span 3
    imgs = images(5)
    prompts = ["a cat", "dog"]
    cos = scorer.cosines(imgs, prompts)
    want = direct_cosines(clip_dir, imgs, ["a cat", "dog", "a cat", "dog", "a cat"])
    np.testing.assert_allclose(cos, want, rtol=1e-4, atol=1e-5)
    assert scorer.score(imgs, prompts) == pytest.approx(100 * np.clip(want, 0, None).mean(), rel=1e-4, abs=1e-4)
    gray = imgs[..., :1]                                       # 1-channel images are scored as RGB
    np.testing.assert_allclose(scorer.cosines(gray, prompts),
                               direct_cosines(clip_dir, np.repeat(gray, 3, -1),
                                              ["a cat", "dog", "a cat", "dog", "a cat"]), rtol=1e-4, atol=1e-5)


def test_clip_score_bad_input_and_missing_weights(clip_dir, tmp_path, monkeypatch):
    scorer = ClipScorer(str(clip_dir))
    with pytest.raises(ValueError, match="uint8"):
        scorer.cosines(images(2).astype(np.float32), ["x"])
    with pytest.raises(ValueError, match="prompts"):
        scorer.cosines(images(2), [])
    monkeypatch.delenv("TFMQ_CLIP_MODEL", raising=False)
    with pytest.raises(ClipUnavailable, match="--clip-model"):
        ClipScorer(str(tmp_path / "no-such-clip"))
    monkeypatch.setenv("TFMQ_CLIP_MODEL", str(clip_dir))       # the variable is the default source
    assert ClipScorer().source == str(clip_dir)


def sd_settings(model_dir, **kw):
    return EvalSettings(model=str(model_dir), methods=["fp", "naive"], bits=["w8a8"], num_images=3, seed=1,
                        sampler=SamplerConfig(steps=3), batch_size=3, calib_size=2, reference=None,
                        grid_images=2, prompts=["a cat", "dog"], **kw)


@pytest.fixture
def sd_dir(tmp_path):
    d = tmp_path / "sdtok"
    d.mkdir()
    pipe = tiny_sd_pipeline(d, clip_sample=True)
    pipe.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def test_evaluate_text_to_image_reports_clip_score(sd_dir, clip_dir, tmp_path):
    report = evaluate(sd_settings(sd_dir, clip_model=str(clip_dir)), tmp_path / "ev", progress=False)
    rows = {r["cell"]: r for r in report["rows"]}
    assert set(rows) == {"fp", "naive-w8a8"}
    scorer = ClipScorer(str(clip_dir))
    for name, row in rows.items():
        imgs = np.load(tmp_path / "ev" / "cells" / name / "samples.npz")["arr_0"]
        assert row["clip_score"] == pytest.approx(scorer.score(imgs, ["a cat", "dog"]), rel=1e-5, abs=1e-5)
    assert report["metric_notes"]["clip"] is None
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| CLIP |" in md and f"{rows['fp']['clip_score']:.2f}" in md

    # the same evaluation without CLIP weights: cells reused, the score skipped with the reason
    again = evaluate(sd_settings(sd_dir, clip_model=str(tmp_path / "missing")), tmp_path / "ev", progress=False)
    assert all(r["clip_score"] is None for r in again["rows"])
    assert "skipped" in again["metric_notes"]["clip"] and "--clip-model" in again["metric_notes"]["clip"]
    assert "CLIP score: skipped" in (tmp_path / "ev" / "report.md").read_text()


def test_clip_score_not_applicable_without_prompts(tiny_pipe_dir, tmp_path):
    s = EvalSettings(model=str(tiny_pipe_dir), methods=["fp"], bits=[], num_images=2, seed=0,
                     sampler=SamplerConfig(steps=2), batch_size=2, reference=None, grid_images=2)
    report = evaluate(s, tmp_path / "ev", progress=False)
    assert report["rows"][0]["clip_score"] is None
    assert "text-to-image" in report["metric_notes"]["clip"]
