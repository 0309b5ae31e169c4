"""The bundled default model: a real DDPM trained on Fashion-MNIST (scripts/train_default_model.py)."""

import json

import numpy as np
import pytest
import torch

import tfmq
from tfmq.checkpoint import checkpoint_size
from tfmq.sampling import SamplerConfig


def test_bundled_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tfmq.default_model_path()
    pipe = tfmq.load_pipeline(path)
    assert type(pipe.unet).__name__ == "UNet2DModel" and pipe.unet.config.sample_size == 32
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 10 * 2 ** 20
    info = json.loads((path / "training.json").read_text())
    assert info["dataset"]["num_images"] == 60000 and info["training"]["seed"] == 0


def test_w4_checkpoint_is_under_a_fifth_of_fp32(tmp_path):
    """Issue bound: the W4 denoiser files are at most 20% of the FP32 denoiser (real model, whose
    FP-kept layers are fp16-exact and so stored as fp16 without loss)."""
    pipe = tfmq.load_pipeline(tfmq.default_model_path())
    fp32 = sum(p.numel() for p in pipe.unet.parameters()) * 4
    tfmq.quantize(pipe, wbits=4, abits=8, calib_size=2, sampler=SamplerConfig(steps=2), progress=False)
    size = checkpoint_size(tfmq.save(pipe, tmp_path / "w4"))
    assert size <= 0.20 * fp32, size / fp32


N_FID = 32  # samples per FID (DDIM 10): on 2 CPU cores ~7 s to draw, ~7 s of Inception features


@pytest.fixture(scope="module")
def fid_refs():
    """The FID network, the statistics of 200 real Fashion-MNIST test images and the FID of
    N_FID uniform-noise images against them (computed once for this module's tests); skips
    where the FID network or the data are missing."""
    from tfmq.eval.datasets import DatasetUnavailable
    from tfmq.eval.fid import fid_from_stats, image_stats
    from tfmq.eval.inception import InceptionFeatures, NetworkUnavailable
    from tfmq.eval.reference import reference_stats
    try:
        net = InceptionFeatures(progress=False)
        ref = reference_stats("fashion-mnist-test", 200, network=net)
    except (NetworkUnavailable, DatasetUnavailable) as exc:
        pytest.skip(str(exc))
    noise = np.random.default_rng(0).integers(0, 256, (N_FID, 32, 32, 1), dtype=np.uint8)
    fid_noise = fid_from_stats(image_stats(noise, net, spatial=False).pool, ref.pool, method="eigh")
    return net, ref, fid_noise


def _fid_of_samples_and_noise(pipe, refs) -> tuple[float, float]:
    """FID of N_FID samples (DDIM 10, seed 0) and of N_FID uniform-noise images against 200 real
    Fashion-MNIST test images. Measured on the bundled models (2 CPU cores): samples 134 / 146
    (UNet / DiT) vs noise 417, ratio 0.32 / 0.35; with 64 samples at DDIM 20: 0.26 / 0.29."""
    from tfmq.eval.fid import fid_from_stats, image_stats
    net, ref, fid_noise = refs
    samples = tfmq.generate(pipe, SamplerConfig(steps=10), N_FID, N_FID, seed=0, progress=False)
    assert samples.shape == (N_FID, 32, 32, 1), samples.shape
    fid_samples = fid_from_stats(image_stats(samples, net, spatial=False).pool, ref.pool, method="eigh")
    return fid_samples, fid_noise


@pytest.mark.slow
def test_samples_beat_noise_by_a_wide_fid_margin(fid_refs):
    fid_samples, fid_noise = _fid_of_samples_and_noise(tfmq.load_pipeline(tfmq.default_model_path()), fid_refs)
    assert fid_samples < 0.5 * fid_noise, (fid_samples, fid_noise)


# ---- the bundled DiT (scripts/train_dit.py): a real class-conditional transformer -------------------
def test_bundled_dit_loads_offline_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tfmq.api import bundled_model_path, load_any
    pipe = load_any("fmnist-dit")
    assert type(pipe).__name__ == "DiTPipeline" and pipe.vae is None
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    path = bundled_model_path("fmnist-dit")
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 10 * 2 ** 20
    info = json.loads((path / "training.json").read_text())
    assert info["dataset"]["num_images"] == 60000 and info["training"]["seed"] == 0
    assert info["training"]["steps"] > 0 and info["training"]["train_wall_time_s"] > 0


@pytest.mark.slow
def test_bundled_dit_draws_the_asked_class():
    """Recognisable garments of the asked class: the shipped Fashion-MNIST classifier (91.8% on
    real test images) agrees with the label asked of the DiT far above chance (10%)."""
    from tfmq.api import load_any
    from tfmq.eval.classifier import class_accuracy, load_classifier
    pipe = load_any("fmnist-dit")
    labels = [c for c in range(10) for _ in range(3)]
    samples = tfmq.generate(pipe, SamplerConfig(steps=20), len(labels), 30, seed=0, class_labels=labels,
                            progress=False)
    acc = class_accuracy(load_classifier("fashion-mnist"), samples, labels)
    assert acc["class_accuracy"] >= 0.6, acc


@pytest.mark.slow
def test_bundled_dit_beats_noise_by_a_wide_fid_margin(fid_refs):
    from tfmq.api import load_any
    fid_samples, fid_noise = _fid_of_samples_and_noise(load_any("fmnist-dit"), fid_refs)
    assert fid_samples < 0.5 * fid_noise, (fid_samples, fid_noise)
