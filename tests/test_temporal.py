"""Temporal information block discovery, temporal features and feature caching.

Tiny diffusers models with RANDOM weights: structure and exactness checks only, no quality claims.
"""

import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_unet2d
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D

from tfmq.models.adapter import UnsupportedModelError
from tfmq.models.temporal import find_temporal_block, finite_set, temporal_features, tib_layer_names
from tfmq.models.unet import UNetAdapter
from tfmq.models.temporal_cache import CacheMissError, build_cache, install_cache
from tfmq.quant.model import WrapSpec, wrap_denoiser


def tiny_cond_unet(seed=0):
    """Tiny cross-attention UNet2DConditionModel (Stable Diffusion's layout), random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4).eval()


def tiny_timestep_class_unet(seed=0):
    """UNet2DModel whose class embedding is an MLP (class_embed_type='timestep')."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), class_embed_type="timestep").eval()


def resnet_names(model):
    return [n for n, m in model.named_modules() if type(m) is ResnetBlock2D]


MODELS = {
    "unet2d": (tiny_unet2d, ["time_proj", "time_embedding"], []),
    "unet2d-class": (lambda: tiny_unet2d(num_class_embeds=5), ["time_proj", "time_embedding", "class_embedding"], []),
    "unet2d-class-mlp": (tiny_timestep_class_unet, ["time_proj", "time_embedding", "class_embedding"],
                         ["class_embedding.linear_1", "class_embedding.linear_2"]),
    "unet2d-cond": (tiny_cond_unet, ["time_proj", "time_embedding"], []),
}


def call_inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([999, 500, 3][:n])
    kw = {}
    if isinstance(model, UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(n, 5, 16, generator=g)
    elif model.class_embedding is not None:
        kw["class_labels"] = torch.tensor([0, 4, 2][:n])
    return x, t, kw


@pytest.mark.parametrize("kind", list(MODELS))
def test_tib_discovery_exact_modules(kind):
    build, embedding, class_layers = MODELS[kind]
    model = build()
    block = find_temporal_block(model)
    assert block.embedding == embedding
    assert block.projections == [f"{r}.time_emb_proj" for r in resnet_names(model)] and len(block) == 8
    assert block.class_conditional == ("class" in kind)
    expected = ["time_embedding.linear_1", "time_embedding.linear_2"] + class_layers + \
        block.projections
    assert tib_layer_names(model) == expected
    # the same names once the denoiser is wrapped (QuantLayers in place of the layers)
    wrap_denoiser(model, WrapSpec(wbits=4, abits=8, softmax_bits=8, layer_policy="all"))
    assert tib_layer_names(model) == expected


@pytest.mark.parametrize("kind", list(MODELS))
def test_temporal_features_match_the_forward_pass(kind):
    """temporal_features computes exactly what every resnet's time_emb_proj sees in forward."""
    model = MODELS[kind][0]()
    block = find_temporal_block(model)
    x, t, kw = call_inputs(model)
    seen = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o))
             for p in block.projections]
    with torch.no_grad():
        model(x, t, **kw)
        feats = temporal_features(model, t, kw.get("class_labels"), kw)
    for h in hooks:
        h.remove()
    assert len(feats) == len(block.projections)
    for p, f in zip(block.projections, feats):
        assert torch.equal(seen[p], f), p


def test_unsupported_temporal_paths_are_refused():
    model = tiny_unet2d()
    model.mid_block.resnets[0].time_emb_proj = None
    model.mid_block.resnets[1].time_emb_proj = None
    block = find_temporal_block(model)          # still fine: the other resnets carry features
    assert "mid_block.resnets.0.time_emb_proj" not in block.projections
    from diffusers.models.normalization import AdaGroupNorm
    model.mid_block.add_module("ada_norm", AdaGroupNorm(64, 32, 8))   # reads temb without a time_emb_proj
    with pytest.raises(UnsupportedModelError, match="time embedding"):
        find_temporal_block(model)


def test_finite_set_is_step_major():
    t, labels, step = finite_set([10, 5], [0, 1, 2])
    assert t.tolist() == [10, 10, 10, 5, 5, 5]
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and step.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("kind", ["unet2d", "unet2d-class", "unet2d-cond"])
def test_cache_reproduces_fp_temporal_features_exactly(kind):
    fp = MODELS[kind][0]()
    cached = MODELS[kind][0]()
    timesteps = [999, 500, 3]
    x, t, kw = call_inputs(fp)
    block = find_temporal_block(fp)
    with torch.no_grad():
        want = temporal_features(fp, t, kw.get("class_labels"), kw)
        ref = fp(x, t, **kw).sample
    cache = build_cache(cached, timesteps, progress=False)
    # the table is exactly the FP features of the finite set (same computation, same batch)
    t_all, labels_all, _ = finite_set(timesteps, cache.classes.tolist() if cache.classes is not None else None)
    with torch.no_grad():
        table = temporal_features(fp, t_all, labels_all)
    for i, f in enumerate(table):
        assert torch.equal(cache.feature_table(i).flatten(0, 1), f)
    install_cache(cached, cache)
    # the TIB is gone from the runtime path: no time-embedding / projection weights left
    assert not any("time_embedding" in n or "time_emb_proj" in n for n, _ in cached.named_parameters())
    seen = {}
    hooks = [cached.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o))
             for p in block.projections]
    with torch.no_grad():
        out = cached(x, t, **kw).sample
    for h in hooks:
        h.remove()
    # what the cached model uses in its forward = the FP features, up to the float summation
    # order of a GEMM over another batch size (the FP model itself is not batch-invariant)
    for p, w in zip(block.projections, want):
        torch.testing.assert_close(seen[p], w, rtol=1e-6, atol=1e-6, msg=p)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the analysis path reads the same table
    got = temporal_features(cached, t, kw.get("class_labels"))
    assert all(torch.equal(g, seen[p]) for g, p in zip(got, block.projections))


def test_cache_refuses_unknown_timestep_and_class():
    model = tiny_unet2d(num_class_embeds=5)
    install_cache(model, build_cache(model, [999, 500], classes=[0, 1], progress=False))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(CacheMissError, match="timestep"):
        model(x, torch.tensor([998]), class_labels=torch.tensor([0]))
    with pytest.raises(CacheMissError, match="class"):
        model(x, torch.tensor([999]), class_labels=torch.tensor([3]))
    model(x, torch.tensor(999.0), class_labels=torch.tensor([1]))     # a float scalar timestep works


def test_embed_time_needs_labels_for_class_models():
    with pytest.raises(ValueError, match="class"):
        UNetAdapter().embed_time(tiny_unet2d(num_class_embeds=5), torch.tensor([3]), None, {})


def test_cache_checkpoint_roundtrip(tmp_path):
    import tfmq
    from tfmq.sampling import SamplerConfig
    pipe = tiny_ddpm_pipeline()
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=SamplerConfig("ddim", 3), fsc="tib", temporal="cache",
                                      tiar_iters=0, recon_iters=0, act_learn_iters=5,
                                      recon_units=["down_blocks.0.resnets.0"])
    tfmq.quantize(pipe, cfg, progress=False)
    info = pipe.unet.tfmq_info["temporal"]
    assert info["mode"] == "cache" and info["timesteps"] == pipe.unet.tfmq_info["timesteps"]
    tfmq.save(pipe, tmp_path / "ck")
    loaded = tfmq.load(tmp_path / "ck")
    assert torch.equal(loaded.unet.tfmq_temporal_cache.feature_0, pipe.unet.tfmq_temporal_cache.feature_0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for t in info["timesteps"]:
            assert torch.equal(pipe.unet(x, torch.tensor(t)).sample, loaded.unet(x, torch.tensor(t)).sample)
