"""Denoiser families behind the adapter: DiT, PixArt (T5 text, adaLN-single) and SDXL (two CLIP
text encoders, text_time added embedding), next to the UNets of the other test files.

Tiny pipelines built from configs with RANDOM weights: structure, exactness and plumbing only
(quantize with each method -> save -> load -> identical outputs; the temporal block equals what
the forward pass computes; TIAR lowers the temporal-feature error). Quality on a TRAINED
transformer is tests/test_bundled_model.py's fmnist-dit test.
"""

import pytest
import torch
from conftest import tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sdxl_pipeline

import tfmq
from tfmq.models.adapter import adapter_for, call_denoiser, get_denoiser
from tfmq.models.temporal import find_temporal_block, temporal_features, tib_layer_names
from tfmq.sampling import SamplerConfig, build_conditioning, denoise, generate, sampler_timesteps

SAMPLER = SamplerConfig("ddim", 4)


PROMPTS = ["a red dress", "blue shoes"]


@pytest.fixture(params=["dit", "pixart", "pixart-sizes", "sdxl"])
def family(request, tmp_path):
    """(pipeline, sampling kwargs) of each family."""
    if request.param == "dit":
        return tiny_dit_pipeline(), {"class_labels": [0, 3]}
    if request.param == "pixart":
        return tiny_pixart_pipeline(tmp_path), {"prompts": PROMPTS}
    if request.param == "pixart-sizes":
        return tiny_pixart_pipeline(tmp_path, additional_conditions=True), {"prompts": PROMPTS}
    return tiny_sdxl_pipeline(tmp_path), {"prompts": PROMPTS}


def _quick(method, **kw):
    small = dict(wbits=4, abits=8, sampler=SAMPLER, calib_size=2, calib_batch_size=2, layer_policy="all")
    if method in ("qdiff", "tfmq"):
        small.update(recon_iters=3, act_learn_iters=2, recon_batch_size=4)
    if method == "tfmq":
        small.update(tiar_iters=3)
    if method == "qdiff":
        small.update(calib_steps=2)
    small.update(kw)
    return tfmq.QuantConfig.for_method(method, **small)


def test_adapters_name_component_and_family(family):
    pipe, _ = family
    adapter = adapter_for(get_denoiser(pipe))
    assert adapter.component == ("unet" if adapter.family == "unet" else "transformer")
    assert getattr(pipe, adapter.component) is get_denoiser(pipe)


def test_temporal_block_equals_forward_pass(family):
    """The features computed from the block alone are the outputs the modules give inside a
    real forward call (forward hooks), for the call's timesteps / classes / conditioning."""
    pipe, kw = family
    denoiser = get_denoiser(pipe)
    block = find_temporal_block(denoiser)
    cond = build_conditioning(pipe, 2, 0, kw.get("class_labels"), kw.get("prompts"))
    row = {"sample": torch.randn(2, *adapter_for(denoiser).sample_shape(denoiser), generator=torch.Generator().manual_seed(0)),
           "timestep": torch.tensor([999, 10]), **cond.rows(slice(0, 2), False)}
    seen = {}
    hooks = [denoiser.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.setdefault(n, out)) for n in block.projections]
    try:
        with torch.no_grad():
            call_denoiser(denoiser, row)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        feats = temporal_features(denoiser, row["timestep"], row.get("class_labels"), row, block=block)
    assert len(feats) == len(block.projections) == len(block.feature_dims) > 0
    for name, f, dim in zip(block.projections, feats, block.feature_dims):
        assert f.shape == (2, dim)
        torch.testing.assert_close(f, seen[name], rtol=0, atol=0)


@pytest.mark.parametrize("method,extra", [("naive", {}), ("qdiff", {}), ("tfmq", {"temporal": "tiar"}),
                                          ("tfmq", {"temporal": "cache"})])
def test_quantize_save_load_identical(family, method, extra, tmp_path):
    pipe, kw = family
    denoiser = get_denoiser(pipe)
    block = find_temporal_block(denoiser)
    config = _quick(method, prompts=kw.get("prompts"), **extra)
    if extra.get("temporal") == "cache" and block.needs_conditioning:
        with pytest.raises(ValueError, match="caching"):
            tfmq.quantize(pipe, config, progress=False)
        return
    tfmq.quantize(pipe, config, progress=False)
    q = generate(pipe, SAMPLER, 2, batch_size=2, seed=1, progress=False, **kw)
    tfmq.save(pipe, tmp_path / "ckpt")
    back = tfmq.load(tmp_path / "ckpt")
    assert type(get_denoiser(back)) is type(denoiser)
    again = generate(back, SAMPLER, 2, batch_size=2, seed=1, progress=False, **kw)
    assert (q == again).all()
    if method == "tfmq":                     # per-step parameters: the calibrated sampler is enforced
        from tfmq.runtime.steps import CalibrationMismatchError
        with pytest.raises(CalibrationMismatchError):
            generate(back, SamplerConfig("ddim", 5), 1, progress=False, **kw)


def test_tiar_lowers_temporal_error(family):
    from tfmq.api import make_wrap_spec
    from tfmq.calib.ranges import init_weight_ranges
    from tfmq.calib.tiar import tiar
    from tfmq.quant.model import wrap_denoiser
    pipe, kw = family
    denoiser = get_denoiser(pipe)
    timesteps = sampler_timesteps(pipe, SAMPLER)
    data = None
    if find_temporal_block(denoiser).needs_conditioning:
        from tfmq.calib.data import collect_calibration_data
        data = collect_calibration_data(pipe, SAMPLER, 2, 2, prompts=kw.get("prompts"), progress=False)
    config = _quick("tfmq", wbits=3)
    wrap_denoiser(denoiser, make_wrap_spec(config, denoiser, timesteps))
    init_weight_ranges(denoiser, "minmax", progress=False)
    summary = tiar(denoiser, timesteps, data, iters=120, lr=1e-2, progress=False)
    assert summary["layers"] and set(summary["layers"]) <= set(tib_layer_names(denoiser))
    assert summary["error_tiar"] < summary["error_nearest"]


def test_dit_learned_sigma_output_is_split():
    pipe = tiny_dit_pipeline(learned_sigma=True)
    out = denoise(pipe, SAMPLER, 2, 2, 0, build_conditioning(pipe, 2, 0, [1, 2]), progress=False)
    assert out.shape == (2, 1, 8, 8)


def test_dit_conditioning_and_errors():
    pipe = tiny_dit_pipeline()
    dit = get_denoiser(pipe)
    cond = build_conditioning(pipe, 3, 0, [4], guidance_scale=2.0)
    assert cond.class_labels.tolist() == [4, 4, 4]
    assert cond.negative["class_labels"].tolist() == [5, 5, 5]      # the null row after 5 classes
    with pytest.raises(ValueError, match="class labels must be in 0..4"):
        build_conditioning(pipe, 1, 0, [5])
    with pytest.raises(ValueError, match="not text-conditional"):
        build_conditioning(pipe, 1, 0, prompts=["x"])
    assert adapter_for(dit).class_table(dit) == list(range(6))


def test_temporal_cache_refused_where_the_block_reads_other_inputs(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    block = find_temporal_block(get_denoiser(pipe))
    assert block.needs_conditioning and "add_embedding" in block.embedding
    pipe = tiny_pixart_pipeline(tmp_path, additional_conditions=False)
    assert not find_temporal_block(get_denoiser(pipe)).needs_conditioning


def test_unsupported_denoiser_lists_the_supported_ones():
    from diffusers import DiffusionPipeline

    from tfmq.models.base import UnsupportedModelError

    class Odd(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel.*PixArtTransformer2DModel"):
        get_denoiser(Odd(torch.nn.Linear(2, 2)))
