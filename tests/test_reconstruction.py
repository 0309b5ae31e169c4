"""Reconstruction units and BRECQ block reconstruction on a tiny UNet.

The tiny UNet of conftest has RANDOM weights: the errors below measure the machinery (does
reconstruction lower each unit's output error against rounding to nearest?), not image quality.
"""

import pytest
import torch
import conftest
from conftest import tiny_ddpm_pipeline, tiny_unet2d

import tfmq
from tfmq.calib.reconstruction import calibration_steps, reconstruction_steps
from tfmq.models.units import find_units, order_units, select_units, shortcut_splits
from tfmq.quant.model import WrapSpec, quant_layers, wrap_denoiser


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qdiff(**overrides):
    """Weights only, 60 AdaRound iterations: what these reconstruction tests measure."""
    return conftest.tiny_qdiff(**{"abits": 32, "recon_iters": 60, "act_learn_iters": 0, **overrides})


def example_input():
    return {"sample": torch.randn(1, 3, 16, 16), "timestep": torch.tensor([500])}


def test_units_cover_every_layer_once_in_network_order():
    unet = wrap_denoiser(tiny_unet2d(), WrapSpec(4, 8, 8, layer_policy="all"))
    units = order_units(unet, find_units(unet), example_input())
    names = [u.name for u in units]
    owned = [n for u in units for n in u.layers]
    assert sorted(owned) == sorted(quant_layers(unet))            # each layer in exactly one unit
    assert names[0] == "time_embedding" and names[-1] == "conv_out"
    # execution order, not registration order (diffusers registers up_blocks before mid_block and
    # a block's attentions before its resnets)
    assert names.index("mid_block.resnets.1") < names.index("up_blocks.0.resnets.0")
    assert names.index("down_blocks.1.resnets.0") < names.index("down_blocks.1.attentions.0")
    assert names.index("up_blocks.0.resnets.1") < names.index("up_blocks.0.attentions.1")
    kinds = {u.name: u.kind for u in units}
    assert kinds["up_blocks.0.upsamplers.0.conv"] == "layer"
    assert kinds["mid_block.attentions.0"] == "attention"
    attn = next(u for u in units if u.name == "mid_block.attentions.0")
    assert "mid_block.attentions.0.tfmq_attn.softmax" in attn.act_quantizers()
    assert [u.name for u in select_units(units, ["up_blocks.1.*"])] == ["up_blocks.1.resnets.0",
                                                                         "up_blocks.1.resnets.1"]
    with pytest.raises(ValueError, match="matches no unit"):
        select_units(units, ["up_block.*"])


def test_shortcut_splits_are_the_concat_boundaries():
    """The split index of every up-block resnet is where torch.cat put the skip feature."""
    unet = tiny_unet2d()
    splits = shortcut_splits(unet)
    seen, made = {}, []
    real_cat = torch.cat

    def cat(tensors, dim=0, **kw):
        out = real_cat(tensors, dim=dim, **kw)
        if dim == 1 and len(tensors) == 2:
            made.append((out, tensors[0].shape[1]))
        return out

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(
        n, next(c for t, c in made if t is args[0])))
        for n, m in unet.named_modules() if n.startswith("up_blocks") and n.count(".") == 3 and ".resnets." in n]
    torch.cat = cat
    try:
        with torch.no_grad():
            unet(**example_input())
    finally:
        torch.cat = real_cat
        for h in hooks:
            h.remove()
    assert len(seen) == 4
    for resnet, split in seen.items():
        assert splits[f"{resnet}.conv1"] == split
        assert splits[f"{resnet}.conv_shortcut"] == split
    assert set(splits) == {f"{r}.{layer}" for r in seen for layer in ("conv1", "conv_shortcut")}


def test_calibration_steps_spread_uniformly():
    assert calibration_steps(100, 20)[:3] == [0, 5, 10] and calibration_steps(100, 20)[-1] == 99
    assert len(calibration_steps(100, 20)) == 20
    assert calibration_steps(10, None) == list(range(10)) and calibration_steps(5, 9) == list(range(5))
    assert calibration_steps(7, 1) == [3]

    class C:
        calib_steps, interval_length = None, 4
    assert reconstruction_steps(C, 10) == [0, 4, 8]


def test_reconstruction_lowers_every_unit_error_against_nearest_rounding(capsys):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(), progress=False)
    results = pipe.unet.tfmq_info["reconstruction"]
    assert len(results) == 17
    lines = []
    for unit, r in results.items():
        lines.append(f"{unit:36s} naive {r['error_before']:.5f}  reconstructed {r['error_after']:.5f} "
                     f"({100 * (1 - r['error_after'] / r['error_before']):.1f}% lower)")
        assert r["error_after"] < r["error_before"], unit
    with capsys.disabled():
        print("\nper-unit output error (random-weight tiny UNet, W4, 60 it/unit):\n" + "\n".join(lines))
    units_s = pipe.unet.tfmq_info["calibration_time"]["units_s"]["reconstruct"]
    assert set(units_s) == set(results)


def test_only_selected_units_are_reconstructed():
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(recon_units=["up_blocks.1.*"], recon_iters=10), progress=False)
    assert list(pipe.unet.tfmq_info["reconstruction"]) == ["up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]


def test_bf16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    with pytest.raises(ValueError, match="CUDA"):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(recon_bf16=True), progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reconstruction_on_cuda_with_bf16():
    pipe = tiny_ddpm_pipeline().to("cuda")
    tfmq.quantize(pipe, tiny_qdiff(recon_bf16=True, abits=8, act_learn_iters=10), progress=False)
    results = pipe.unet.tfmq_info["reconstruction"]
    assert sum(r["error_after"] < r["error_before"] for r in results.values()) >= 0.8 * len(results)


def test_capture_rows_default_rule():
    from tfmq.calib.reconstruction import capture_rows
    assert capture_rows(32, 3 * 32 * 32, "cpu") == 32                 # CPU: one calibration batch
    assert capture_rows(32, 3 * 32 * 32, "cuda") == 160               # 2^19 values, whole batches
    assert capture_rows(32, 28 * 28, "cuda") == 256                   # at most 256 rows
    assert capture_rows(32, 4 * 64 * 64, "cuda") == 32                # SD latents: one batch
    assert capture_rows(8, 4 * 128 * 128, "cuda") == 8                # never less than a batch
    assert capture_rows(32, 3 * 32 * 32, "cuda", requested=48) == 48


def test_capture_in_larger_passes_caches_the_same_rows():
    """Caching a unit's inputs / outputs in passes of 4 batches gives the rows of 1-batch passes."""
    from tfmq.calib.data import collect_calibration_data
    from tfmq.calib.reconstruction import calibration_rows, capture
    from tfmq.sampling import SamplerConfig
    from tfmq.calib.ranges import init_weight_ranges
    from tfmq.quant.model import set_quant_state
    pipe = tiny_ddpm_pipeline()
    data = collect_calibration_data(pipe, SamplerConfig("ddim", 10), 12, batch_size=12,
                                    seed=0, progress=False)
    steps = [0, 4, 9]
    unet = wrap_denoiser(pipe.unet, WrapSpec(4, 8, 8, layer_policy="all"))
    init_weight_ranges(unet, "minmax", progress=False)
    set_quant_state(unet, weight=True, act=False)       # W4 nearest rounding, FP activations
    units = order_units(unet, find_units(unet), example_input())
    unit = next(u for u in units if u.name == "up_blocks.1.resnets.0")    # takes a skip concat
    cached = {}
    for size in (4, 16):
        rows = calibration_rows(data, steps, None, 0, 4, "cpu", torch.float32, capture_size=size)
        assert rows.capture_size == size
        cached[size] = (capture(unet, unit, rows, "input", 1 << 40), capture(unet, unit, rows, "output", 1 << 40))
    for a, b in zip(cached[4], cached[16]):
        assert a.rows == b.rows == 36
        assert set(a.data) == set(b.data)
        for k in a.data:
            # float rounding may differ with the batch size (conv algorithms): about 1e-6 here
            torch.testing.assert_close(a.data[k], b.data[k], rtol=1e-4, atol=1e-5)


def test_capture_rows_must_be_positive():
    with pytest.raises(ValueError, match="recon_capture_rows"):
        tiny_qdiff(recon_capture_rows=0)


def test_recon_parallel_mode_is_checked_and_auto_follows_the_loop():
    from tfmq.calib.reconstruction import parallel_mode
    with pytest.raises(ValueError, match="recon_parallel"):
        tiny_qdiff(recon_parallel="ranks")
    with pytest.raises(ValueError, match="parallel"):
        parallel_mode("both", None, "cpu")
    assert parallel_mode("auto", None, "cpu") == "rows"          # eager on the CPU: split the rows
    assert parallel_mode("auto", False, "cpu") == "rows"
    assert parallel_mode("auto", None, "cuda") == "replicate"    # CUDA-graph loops: replicate them
    assert parallel_mode("auto", False, "cuda") == "rows"        # eager loops on CUDA split rows
    assert parallel_mode("replicate", None, "cpu") == "replicate"
    assert parallel_mode("rows", None, "cpu") == "rows"


def test_quant_state_restores_every_quantizer_flag_even_after_an_error():
    from tfmq.quant.model import act_quantizers, quant_state, weight_quantizers
    unet = wrap_denoiser(tiny_unet2d(), WrapSpec(4, 8, 8, layer_policy="all"))
    qs = list(weight_quantizers(unet).values()) + list(act_quantizers(unet).values())
    for i, q in enumerate(qs):                       # a mixed state, as TIAR leaves it mid-run
        q.enabled = i % 3 == 0
    before = [q.enabled for q in qs]
    with quant_state(unet, weight=False, act=True):
        assert not any(q.enabled for q in weight_quantizers(unet).values())
        assert all(q.enabled for q in act_quantizers(unet).values())
    assert [q.enabled for q in qs] == before
    with pytest.raises(RuntimeError, match="inside"):
        with quant_state(unet, weight=True):
            assert all(q.enabled for q in weight_quantizers(unet).values())
            raise RuntimeError("inside")
    assert [q.enabled for q in qs] == before
