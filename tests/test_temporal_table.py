"""The temporal block of a loaded checkpoint replaced by the table of its outputs
(``tfmq.load(..., temporal_table=True)``, :func:`tfmq.runtime.tabulate_temporal`).

Tiny models with RANDOM weights: exactness against the block itself, plumbing and errors.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sdxl_pipeline
from test_guards import assert_compiled_follows_the_steps

import tfmq
from tfmq.models.adapter import get_denoiser
from tfmq.models.temporal import find_temporal_block, temporal_features
from tfmq.runtime import CalibrationMismatchError, runtime_layers, tabulate_temporal
from tfmq.runtime.guards import CAN_SKIP_GUARDS
from tfmq.runtime.temporal_cache import CachedProjection
from tfmq.sampling import SamplerConfig, generate

STEPS = SamplerConfig(steps=4)
FAST = dict(recon_iters=0, act_learn_iters=0, tiar_iters=0, calib_size=2, sampler=STEPS)


@pytest.fixture(scope="module")
def tfmq_ckpt(tmp_path_factory):
    """A tiny unconditional DDPM quantized with tfmq W4A8 (per-step parameters of the temporal block)."""
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, **FAST), progress=False)
    return tfmq.save(pipe, tmp_path_factory.mktemp("tt") / "ckpt")


def test_table_rows_are_the_quantized_block_outputs(one_thread, tfmq_ckpt):
    plain = tfmq.load(tfmq_ckpt)
    tabled = tfmq.load(tfmq_ckpt, temporal_table=True)
    unet, tab = plain.unet, tabled.unet
    assert unet.tfmq_info["fsc"]["n_sets"] > 1                # the block has per-step parameters
    block = find_temporal_block(unet)
    tib = [n for n in runtime_layers(unet) if n in block.projections or n.startswith(tuple(r + "." for r in block.roots))]
    assert len(tib) > len(block.projections)                  # quantized layers of the block...
    assert not set(tib) & set(runtime_layers(tab))            # ...left the model
    assert all(isinstance(tab.get_submodule(n), CachedProjection) for n in block.projections)
    table = tab.tfmq_temporal_cache
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(unet.tfmq_info["timesteps"]):
            unet.tfmq_steps.set(i)
            feats = temporal_features(unet, torch.tensor([t]), None, block=block)
            for j, f in enumerate(feats):
                assert torch.equal(table.feature_table(j)[i], f.float())
            # a batch-1 call computes the block's rows with the same arithmetic: bit for bit
            unet.tfmq_steps.reset()
            tab.tfmq_steps.reset()
            want = [unet(x, torch.tensor([s])).sample for s in unet.tfmq_info["timesteps"][:i + 1]][-1]
            got = [tab(x, torch.tensor([s])).sample for s in unet.tfmq_info["timesteps"][:i + 1]][-1]
            assert torch.equal(want, got)


@pytest.mark.parametrize("family", ["ddpm-class", "dit", "pixart"])
def test_every_family_samples_the_same_images(one_thread, tmp_path, family):
    """Class-conditional UNet, DiT (adaLN-Zero, class table with the null class) and PixArt
    (adaLN-single): images sampled with the table equal the block-computed ones."""
    kw = {"prompts": ["a red dress", "blue shoes"]} if family == "pixart" else {"class_labels": [0, 3]}
    pipe = {"ddpm-class": lambda: tiny_ddpm_pipeline(5), "dit": tiny_dit_pipeline,
            "pixart": lambda: tiny_pixart_pipeline(tmp_path)}[family]()
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_batch_size=2, layer_policy="all",
                                      **FAST, **({"prompts": kw["prompts"]} if "prompts" in kw else {}))
    tfmq.quantize(pipe, cfg, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    plain, tabled = tfmq.load(ckpt), tfmq.load(ckpt, temporal_table=True)
    table = get_denoiser(tabled).tfmq_temporal_cache
    assert (table.classes is None) == (family == "pixart")
    a = generate(plain, STEPS, 2, 2, seed=1, progress=False, **kw)
    b = generate(tabled, STEPS, 2, 2, seed=1, progress=False, **kw)
    np.testing.assert_array_equal(a, b)


def test_pipeline_call_tied_to_the_calibrated_sampler(one_thread, tmp_path):
    """A checkpoint without per-step parameters samples with any step count; with the table it
    holds the calibrated timesteps only, and the pipeline's own __call__ says so."""
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, fsc="none", **FAST), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    plain, tabled = tfmq.load(ckpt), tfmq.load(ckpt, temporal_table=True)
    assert plain(num_inference_steps=5, output_type="np").images.shape == (1, 16, 16, 3)
    out = tabled(num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    ref = plain(num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(out - ref).max() < 0.1          # random weights: a rounding step can flip a code
    with pytest.raises(CalibrationMismatchError, match="4 steps"):
        tabled(num_inference_steps=5, output_type="np")


def test_refusals_before_any_change(one_thread, tfmq_ckpt, tmp_path):
    tabled = tfmq.load(tfmq_ckpt, temporal_table=True)
    with pytest.raises(ValueError, match="cannot be written as a checkpoint"):
        tfmq.save(tabled, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    plain = tfmq.load(tfmq_ckpt)
    before = set(runtime_layers(plain.unet))
    with pytest.raises(ValueError, match="MiB"):
        tabulate_temporal(plain.unet, max_bytes=100)
    assert set(runtime_layers(plain.unet)) == before and getattr(plain.unet, "tfmq_temporal_cache", None) is None
    assert tabulate_temporal(tabled.unet) is tabled.unet.tfmq_temporal_cache        # already tabulated


def test_sdxl_is_refused_with_the_reason(one_thread, tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, prompts=["a red dress"],
                                                    calib_size=2, sampler=STEPS), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="add_embedding"):
        tfmq.load(ckpt, temporal_table=True)


@pytest.mark.skipif(not CAN_SKIP_GUARDS, reason="this PyTorch has no skip_guard_eval_unsafe")
def test_compiled_table_follows_the_step_index(one_thread, tfmq_ckpt):
    """Compiled (aot_eager: no C++ compiler needed) and called without re-checking guards, the
    tabulated denoiser reads each step's row from the step index and equals eager mode."""
    torch._dynamo.reset()
    unet = tfmq.load(tfmq_ckpt, temporal_table=True).unet
    assert_compiled_follows_the_steps(unet)
