"""The qdiff method end to end: split shortcut, activation step learning, checkpoint, report, config.

Tiny models from conftest have RANDOM weights: plumbing and numerics only, no quality claims.
"""

import json

import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_qdiff

import tfmq
from tfmq.calib.reconstruction import RECON_PRESETS
from tfmq.calib.report import REPORT_FILE, format_calibration_time, write_calibration_time
from tfmq.quant.layers import GroupActQuantizer
from tfmq.recipes import RECIPES
from tfmq.runtime.layers import GroupActQuant

SPLIT_LAYER = "up_blocks.1.resnets.0.conv_shortcut"


pytestmark = pytest.mark.usefixtures("one_thread")


def concat_input(pipe, layer_name: str) -> torch.Tensor:
    """What ``layer_name`` receives on a calibration-like batch (quantizers bypassed)."""
    from tfmq.quant.model import set_quant_state
    layer = pipe.unet.get_submodule(layer_name)
    got = []
    h = layer.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    set_quant_state(pipe.unet, weight=False, act=False)
    try:
        with torch.no_grad():
            pipe.unet(torch.randn(4, 3, 16, 16), torch.tensor([10, 300, 600, 900]))
    finally:
        h.remove()
        set_quant_state(pipe.unet, weight=True, act=True)
    return got[0]


def test_split_shortcut_has_separate_ranges_for_the_two_groups():
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(act_init="minmax", act_learn_iters=0, recon_iters=0), progress=False)
    spec = pipe.unet.tfmq_info["wrap_spec"]
    assert spec["splits"][SPLIT_LAYER] == 32
    q = pipe.unet.get_submodule(SPLIT_LAYER).act_quantizer
    assert isinstance(q, GroupActQuantizer) and q.split == 32
    assert SPLIT_LAYER in pipe.unet.tfmq_info["split_shortcut_layers"]
    x = concat_input(pipe, SPLIT_LAYER)
    lo0, hi0 = x[:, :32].min(), x[:, :32].max()
    lo1, hi1 = x[:, 32:].min(), x[:, 32:].max()
    s0, s1 = q.groups[0].scale.item(), q.groups[1].scale.item()
    assert s0 != pytest.approx(s1, rel=0.05)                       # the two groups' ranges differ
    # each group's range covers its own channels' values (the calibration data are other inputs
    # of the same network, so compare loosely) and is far from the other group's
    for s, lo, hi in ((s0, lo0, hi0), (s1, lo1, hi1)):
        assert s * 255 >= 0.5 * float(hi - torch.clamp(lo, max=0))
    # without the split, one range would have to cover both groups
    joint = float(torch.maximum(hi0, hi1) - torch.minimum(torch.minimum(lo0, lo1), torch.tensor(0.)))
    assert min(s0, s1) * 255 < 0.9 * joint


def test_act_learning_moves_the_split_group_scales_separately():
    cfg = tiny_qdiff(act_init="minmax", recon_iters=0, act_learn_iters=0)
    base = tiny_ddpm_pipeline()
    tfmq.quantize(base, cfg, progress=False)
    learned = tiny_ddpm_pipeline()
    tfmq.quantize(learned, tiny_qdiff(act_init="minmax", recon_iters=0, act_learn_iters=40),
                  progress=False)
    for layer in (SPLIT_LAYER, "up_blocks.1.resnets.0.conv1"):
        q0 = base.unet.get_submodule(layer).act_quantizer
        q1 = learned.unet.get_submodule(layer).act_quantizer
        init = [g.scale.item() for g in q0.groups]
        after = [g.scale.item() for g in q1.groups]
        assert after[0] != init[0] and after[1] != init[1]         # both groups were learned
        assert after[0] != pytest.approx(after[1], rel=0.05)       # and stay separate
        assert not any(g.scale.requires_grad for g in q1.groups)
    results = learned.unet.tfmq_info["act_learning"]
    improved = sum(r["error_after"] < r["error_before"] for r in results.values())
    assert improved >= 0.5 * len(results)       # small steps: 8-bit activations are close already


def test_qdiff_end_to_end_checkpoint_and_time_report(tmp_path):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(softmax_bits=16, act_ema=0.95), progress=False)
    info = pipe.unet.tfmq_info
    assert info["method"] == "qdiff" and info["recipe"] == list(RECIPES["qdiff"].stages)
    assert pipe.unet.get_submodule("mid_block.attentions.0").tfmq_attn.softmax.bits == 16
    times = info["calibration_time"]
    assert set(times["stages_s"]) >= {"calibration_data", "weight_ranges", "reconstruct", "act_ranges",
                                      "act_learning"}
    assert set(times["units_s"]) == {"reconstruct", "act_learning"}
    assert "up_blocks.0.attentions.1" in times["units_s"]["reconstruct"]

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        ref = pipe.unet(x, t).sample
    tfmq.save(pipe, tmp_path / "ckpt")
    loaded = tfmq.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t).sample, ref)
    assert isinstance(pipe.unet.get_submodule(SPLIT_LAYER).act_quantizer, GroupActQuantizer)
    split = loaded.unet.get_submodule(SPLIT_LAYER).act          # the runtime keeps the two groups
    assert isinstance(split, GroupActQuant) and split.split == pipe.unet.get_submodule(SPLIT_LAYER).act_quantizer.split

    path = write_calibration_time(tmp_path / "ckpt", info)
    assert path.name == REPORT_FILE
    report = json.loads(path.read_text())
    assert report["stages_s"] == times["stages_s"] and report["units_s"] == times["units_s"]
    assert set(report["reconstruction_errors"]) == set(info["reconstruction"])
    text = format_calibration_time(info)
    assert "reconstruct" in text and "  up_blocks.1.resnets.1" in text and "total" in text


def test_qdiff_recipe_defaults_and_presets():
    cfg = tfmq.QuantConfig.for_method("qdiff")
    assert cfg.calib_steps == 20 and cfg.calib_size == 256 and cfg.split_shortcut
    assert cfg.recon_iters == RECON_PRESETS["default"]["recon_iters"]
    ref = tfmq.QuantConfig.for_method("qdiff", preset="reference")
    assert ref.recon_iters == 20000 and ref.recon_batch_size == 32 and ref.act_learn_iters == 5000
    assert tfmq.QuantConfig.for_method("qdiff", preset="reference", recon_batch_size=8).recon_batch_size == 8
    with pytest.raises(ValueError, match="preset"):
        tfmq.QuantConfig.for_method("qdiff", preset="fastest")
    assert not tfmq.QuantConfig.for_method("naive").split_shortcut


@pytest.mark.parametrize("bad, match", [
    ({"recon_iters": -1}, "recon_iters"), ({"recon_batch_size": 0}, "recon_batch_size"),
    ({"calib_steps": 0}, "calib_steps"), ({"recon_warmup": 1.0}, "recon_warmup"),
    ({"recon_beta": (20,)}, "recon_beta"), ({"act_ema": 1.5}, "act_ema"),
    ({"recon_lr": 0}, "recon_lr"), ({"recon_units": "up_blocks.*"}, "recon_units"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        tfmq.QuantConfig.for_method("qdiff", **bad)


def test_weight_only_qdiff_skips_activation_stages():
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(abits=32, recon_iters=5), progress=False)
    info = pipe.unet.tfmq_info
    assert "act_learning" not in info and len(info["reconstruction"]) == 17
