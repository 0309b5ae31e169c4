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


@pytest.mark.slow
def test_samples_beat_noise_by_a_wide_fid_margin():
    from tfmq.eval.datasets import DatasetUnavailable
    from tfmq.eval.fid import fid_from_stats, image_stats
    from tfmq.eval.inception import InceptionFeatures, NetworkUnavailable
    from tfmq.eval.reference import reference_stats
    try:
        net = InceptionFeatures(progress=False)
        ref = reference_stats("fashion-mnist-test", 200, network=net)
    except (NetworkUnavailable, DatasetUnavailable) as exc:
        pytest.skip(str(exc))
    pipe = tfmq.load_pipeline(tfmq.default_model_path())
    samples = tfmq.generate(pipe, SamplerConfig(steps=20), 64, 64, seed=0, progress=False)
    noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
    fid_samples = fid_from_stats(image_stats(samples, net, spatial=False).pool, ref.pool, method="eigh")
    fid_noise = fid_from_stats(image_stats(noise, net, spatial=False).pool, ref.pool, method="eigh")
    assert fid_samples < 0.5 * fid_noise, (fid_samples, fid_noise)
