"""The tfmq method end to end: TIAR, reconstruction of the other units, FSC, save / load, and
the temporal-feature analysis.

Tiny diffusers models with RANDOM weights: plumbing and relative errors only, no quality claims
(those are measured on the bundled trained model).
"""

import json

import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_sd_pipeline, tiny_unet2d

import tfmq
from tfmq.calib.ranges import init_weight_ranges
from tfmq.calib.tiar import tiar
from tfmq.eval.temporal import temporal_feature_similarity, write_analysis
from tfmq.models.temporal import tib_layer_names
from tfmq.quant.model import WrapSpec, quant_layers, wrap_denoiser
from tfmq.sampling import SamplerConfig, denoise, sampler_timesteps

STEPS = SamplerConfig("ddim", 4)


def test_tfmq_end_to_end_save_load_identical(tmp_path):
    pipe = tiny_ddpm_pipeline()
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=STEPS, tiar_iters=20, recon_iters=3, fsc="tib",
                                      act_learn_iters=3, interval_length=2,
                                      recon_units=["down_blocks.*", "mid_block.resnets.0"])
    tfmq.quantize(pipe, cfg, progress=False)
    info = pipe.unet.tfmq_info
    assert info["recipe"] == ["weight_ranges", "temporal", "reconstruct", "fsc", "act_learning",
                              "temporal_cache"]
    assert "down_blocks.0.resnets.0" in info["act_learning"]     # its single-set quantizers learned
    assert info["temporal"]["mode"] == "tiar" and info["fsc"] == {**info["fsc"], "mode": "tib", "n_sets": 4}
    tib = set(tib_layer_names(pipe.unet))
    assert set(info["temporal"]["layers"]) <= tib
    # the other units' reconstruction left the TIB alone (and ran on every 2nd step only)
    assert "time_embedding" not in info["reconstruction"]
    assert "down_blocks.0.resnets.0" in info["reconstruction"]
    assert all(quant_layers(pipe.unet)[n].frozen for n in info["temporal"]["layers"])

    tfmq.save(pipe, tmp_path / "ck")
    loaded = tfmq.load(tmp_path / "ck")
    assert loaded.unet.tfmq_info["fsc"]["mode"] == "tib"
    compare_identical(pipe, loaded, info["timesteps"])


def compare_identical(pipe, loaded, timesteps):
    n = torch.get_num_threads()
    torch.set_num_threads(1)      # bit-for-bit comparison: no thread-count-dependent BLAS sums
    try:
        _compare_identical(pipe, loaded, timesteps)
    finally:
        torch.set_num_threads(n)


def _compare_identical(pipe, loaded, timesteps):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in timesteps:                           # per-step parameters: same outputs per step
            a = pipe.unet(x, torch.tensor(t)).sample
            b = loaded.unet(x, torch.tensor(t)).sample
            assert torch.equal(a, b), (t, (a - b).abs().max().item())
    za = denoise(pipe, STEPS, 2, 2, 0, progress=False)
    zb = denoise(loaded, STEPS, 2, 2, 0, progress=False)
    assert torch.equal(za, zb)                        # whole trajectories too


def test_tfmq_cache_end_to_end(tmp_path):
    pipe = tiny_ddpm_pipeline()
    fp = tiny_ddpm_pipeline().unet
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=STEPS, temporal="cache", recon_iters=2, fsc="all",
                                      act_rows_per_step=2, recon_units=["down_blocks.0.*"])
    tfmq.quantize(pipe, cfg, progress=False)
    info = pipe.unet.tfmq_info["temporal"]
    assert info["mode"] == "cache" and info["timesteps"] == sampler_timesteps(pipe, STEPS)
    assert not any(n.startswith("time_embedding") or n.endswith("time_emb_proj") for n in quant_layers(pipe.unet))
    report = temporal_feature_similarity(fp, pipe.unet)
    assert report["min_cosine"] == pytest.approx(1.0, abs=1e-6)   # the FP features, from the table
    tfmq.save(pipe, tmp_path / "ck")
    loaded = tfmq.load(tmp_path / "ck")
    compare_identical(pipe, loaded, info["timesteps"])


def test_tiar_lowers_temporal_error_against_nearest_rounding():
    model = tiny_unet2d(num_class_embeds=4)
    wrap_denoiser(model, WrapSpec(wbits=3, abits=8, softmax_bits=8))
    init_weight_ranges(model, "mse", progress=False)
    timesteps = [999, 800, 600, 400, 200, 1]
    summary = tiar(model, timesteps, iters=150, progress=False)
    assert summary["rows"] == len(timesteps) * 4              # every (t, class) of the finite set
    assert summary["error_tiar"] < 0.9 * summary["error_nearest"]
    assert summary["cosine_tiar"] > summary["cosine_nearest"]


@pytest.mark.slow
def test_tiar_beats_naive_and_plain_block_reconstruction():
    """Same AdaRound iterations for the TIB's layers: TIAR (temporal-feature loss) vs BRECQ units
    (resnet-output loss, the time_emb_proj inside its resnet) vs nearest rounding, W4A32."""
    sampler = SamplerConfig("ddim", 3)
    fp = tiny_ddpm_pipeline().unet
    errors = {}
    for method, kw in [("naive", {}),
                       ("qdiff", {"recon_iters": 60, "calib_steps": None, "recon_rows": 2,
                                  "recon_units": ["time_embedding", "*resnets.*"]}),
                       ("tfmq", {"tiar_iters": 60, "recon_iters": 0})]:
        pipe = tiny_ddpm_pipeline()
        cfg = tfmq.QuantConfig.for_method(method, wbits=4, abits=32, calib_size=2, calib_batch_size=2,
                                          sampler=sampler, **kw)
        tfmq.quantize(pipe, cfg, progress=False)
        errors[method] = temporal_feature_similarity(fp, pipe.unet)["mean_relative_error"]
    assert errors["tfmq"] < errors["naive"]
    assert errors["tfmq"] < errors["qdiff"]


def test_analysis_writes_json_and_plot(tmp_path):
    fp = tiny_ddpm_pipeline().unet
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("naive", wbits=4, abits=8, calib_size=2,
                                                    calib_batch_size=2, sampler=STEPS), progress=False)
    report = temporal_feature_similarity(fp, pipe.unet)
    assert len(report["cosine"]) == 4 and all(0.9 < c <= 1.0 + 1e-6 for c in report["cosine"])
    paths = write_analysis({"naive W4A8": report}, tmp_path)
    assert json.loads(paths["json"].read_text())["naive W4A8"]["timesteps"] == report["timesteps"]
    from PIL import Image
    assert Image.open(paths["png"]).size[0] > 100


def test_cli_flags_and_analyze(tiny_pipe_dir, tmp_path, capsys):
    from tfmq.cli import build_parser, main, quantize_overrides
    from tfmq.config import QuantConfig
    args = build_parser().parse_args(["quantize", "--method", "tfmq", "--wbits", "4", "--abits", "8",
                                      "--interval-length", "5", "--fsc", "tib", "--temporal", "cache",
                                      "--tiar-iters", "7", "--out", str(tmp_path / "x")])
    cfg = QuantConfig.for_method(args.method, **quantize_overrides(args))
    assert (cfg.interval_length, cfg.fsc, cfg.temporal, cfg.tiar_iters) == (5, "tib", "cache", 7)
    args = build_parser().parse_args(["quantize", "--method", "naive", "--fsc", "all", "--out", "y"])
    with pytest.raises(ValueError, match="tfmq method"):
        QuantConfig.for_method(args.method, **quantize_overrides(args))
    # analyze: a checkpoint of the saved tiny pipeline against that pipeline
    pipe = tfmq.load_pipeline(tiny_pipe_dir)
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=2, calib_batch_size=2,
                                                    sampler=SamplerConfig("ddim", 3), fsc="tib",
                                                    tiar_iters=5, recon_iters=0, act_learn_iters=5,
                                                    recon_units=["down_blocks.0.resnets.0"]), progress=False)
    tfmq.save(pipe, tmp_path / "ck")
    assert main(["analyze", str(tmp_path / "ck"), "--model", str(tiny_pipe_dir), "--labels", "tfmq",
                 "--out", str(tmp_path / "an")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.9 < out["summary"]["tfmq"]["mean_cosine"] <= 1.0 + 1e-6
    assert (tmp_path / "an" / "temporal_cosine.png").exists()


def test_tfmq_on_text_to_image_unet(tiny_sd, tmp_path):
    """UNet2DConditionModel with guidance: TIAR over the timesteps, FSC 'all' on the guided
    batch, reload, and diffusers' own pipeline call selecting the per-step sets."""
    (tmp_path / "fp").mkdir()
    fp = tiny_sd_pipeline(tmp_path / "fp").unet            # the same seeded random weights, FP
    sampler = SamplerConfig("ddim", 3, guidance_scale=7.5)
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=sampler, prompts=["a cat", "dog"], fsc="all",
                                      tiar_iters=10, recon_iters=2, recon_units=["down_blocks.0.*"])
    tfmq.quantize(tiny_sd, cfg, progress=False)
    info = tiny_sd.unet.tfmq_info
    assert info["temporal"]["rows"] == 3 and info["fsc"]["n_sets"] == 3
    tfmq.save(tiny_sd, tmp_path / "ck")
    loaded = tfmq.load(tmp_path / "ck")
    assert temporal_feature_similarity(fp, loaded.unet)["mean_cosine"] > 0.9
    out = loaded(["a cat"], num_inference_steps=3, guidance_scale=7.5, output_type="np", height=16, width=16)
    assert out.images.shape == (1, 16, 16, 3)
