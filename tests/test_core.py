"""Quantization core on tiny diffusers models (RANDOM weights: numerics and plumbing only)."""

import json

import pytest
import torch
from conftest import tiny_ddpm_pipeline

import tfmq
from tfmq.calib.data import collect_calibration_data
from tfmq.checkpoint import CheckpointError, checkpoint_size
from tfmq.models.adapter import UnsupportedModelError, get_denoiser, quantizable_layers
from tfmq.quant.layers import QuantLayer
from tfmq.quant.model import quant_layers
from tfmq.sampling import SamplerConfig

STEPS = SamplerConfig(steps=4)


def fixed_inputs(pipe, n=4, seed=123, cond=None, timesteps=(750, 500, 250, 1)):
    """Inputs like the calibration data's: noise at the sampler's timesteps, real conditioning."""
    denoiser = pipe.unet
    g = torch.Generator().manual_seed(seed)
    c = denoiser.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor(list(timesteps)[:n])
    kwargs = {}
    if cond == "class":
        kwargs["class_labels"] = torch.tensor([0, 1, 2, 3][:n])
    elif cond == "text":
        emb, _ = pipe.encode_prompt(["a cat", "a red dog"] * (n // 2), "cpu", 1, False)
        kwargs["encoder_hidden_states"] = emb
    return x, t, kwargs


def rel_error(pipe_fp, pipe_q, sampler, **cond):
    """Relative output error on held-out inputs drawn like the calibration data (another seed)."""
    data = collect_calibration_data(pipe_fp, sampler, 2, 2, seed=999, progress=False, **cond)
    batch = data.batch(range(len(data)))
    kw = {k: v for k, v in batch.items() if k not in ("sample", "timestep")}
    with torch.no_grad():
        a = pipe_fp.unet(batch["sample"], batch["timestep"], **kw).sample
        b = pipe_q.unet(batch["sample"], batch["timestep"], **kw).sample
    return ((a - b).norm() / a.norm()).item()


def test_layer_listing_and_policy(tiny_pipe):
    layers = quantizable_layers(tiny_pipe.unet)
    kinds = {l.kind for l in layers}
    assert kinds == {"conv", "linear", "attention"}
    tfmq.quantize(tiny_pipe, wbits=8, abits=8, calib_size=2, sampler=STEPS, progress=False)
    q = quant_layers(tiny_pipe.unet)
    assert "conv_in" not in q and "conv_out" not in q          # kept FP by tfmq-official
    assert "time_embedding.linear_1" not in q
    assert q["time_embedding.linear_2"].act_quantizer is None   # FP input, quantized weight
    assert q["time_embedding.linear_2"].weight_quantizer is not None
    assert all(n.endswith("conv1") is False or l.act_quantizer is None for n, l in q.items())
    attn = [m for m in tiny_pipe.unet.modules() if hasattr(m, "tfmq_attn")]
    assert attn and all(a.tfmq_attn.softmax.bits == 8 for a in attn)


@pytest.mark.parametrize("cond", [None, "class"])
def test_error_grows_as_bits_drop_unet2d(cond):
    n_cls = 5 if cond == "class" else None
    fp = tiny_ddpm_pipeline(n_cls)
    errs = {}
    for bits in (8, 6, 4, 3):
        q = tiny_ddpm_pipeline(n_cls)
        tfmq.quantize(q, wbits=bits, abits=bits, calib_size=4, sampler=STEPS, progress=False,
                      layer_policy="all")
        errs[bits] = rel_error(fp, q, STEPS)
    assert errs[8] < 0.05, errs
    assert errs[8] < errs[6] < errs[4] < errs[3], errs


def test_error_grows_as_bits_drop_text_unet(tmp_path):
    from conftest import tiny_sd_pipeline
    fp = tiny_sd_pipeline(tmp_path, clip_sample=True)
    errs = {}
    for bits in (8, 6, 4, 3):
        q = tiny_sd_pipeline(tmp_path, clip_sample=True)
        sampler = SamplerConfig(steps=4, guidance_scale=3.0)
        tfmq.quantize(q, wbits=bits, abits=bits, calib_size=2, sampler=sampler,
                      prompts=["a cat", "a red dog"], progress=False)
        errs[bits] = rel_error(fp, q, sampler, prompts=["a cat", "a red dog"])
    assert errs[8] < 0.05, errs
    assert errs[8] < errs[6] < errs[4] < errs[3], errs


def test_weights_only_and_fp_settings(tiny_pipe):
    tfmq.quantize(tiny_pipe, wbits=4, abits=32, calib_size=2, sampler=STEPS, progress=False)
    layers = quant_layers(tiny_pipe.unet)
    assert layers and all(l.act_quantizer is None for l in layers.values())
    assert all(not hasattr(m, "tfmq_attn") for m in tiny_pipe.unet.modules())


def test_calibration_records_every_step_once_per_trajectory(tiny_pipe):
    calls = []
    h = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    data = collect_calibration_data(tiny_pipe, SamplerConfig(steps=6), num_trajectories=5, batch_size=2,
                                    seed=0, progress=False)
    h.remove()
    assert len(calls) == 6 * 3 and sum(calls) == 6 * 5          # 3 batches x 6 steps, 5 rows per step
    assert len(data) == 6
    assert data.timesteps == [int(t) for t in tfmq.sampling.make_scheduler(tiny_pipe, SamplerConfig(steps=6)).timesteps]
    for i in range(6):
        d = data.step(i)
        assert d["sample"].shape[0] == 5
        assert (d["timestep"] == data.timesteps[i]).all()
    again = collect_calibration_data(tiny_pipe, SamplerConfig(steps=6), 5, 2, seed=0, progress=False)
    assert torch.equal(again.step(3)["sample"], data.step(3)["sample"])      # seeded


def test_calibration_spills_to_disk_over_budget(tiny_pipe):
    mem = collect_calibration_data(tiny_pipe, STEPS, 4, 2, progress=False)
    disk = collect_calibration_data(tiny_pipe, STEPS, 4, 2, memory_budget_bytes=10_000, progress=False)
    assert disk.spilled and not mem.spilled
    spill = disk.spill_dir
    for i in range(len(mem)):
        assert torch.equal(mem.step(i)["sample"], disk.step(i)["sample"])
        assert disk.rows(i) == mem.rows(i) == disk.step(i)["sample"].shape[0] == 4   # from shapes
    disk.cleanup()
    assert not spill.exists()


def test_class_conditional_calibration_records_guidance_batch():
    pipe = tiny_ddpm_pipeline(num_class_embeds=5)
    data = collect_calibration_data(pipe, SamplerConfig(steps=3, guidance_scale=2.0), 4, 4, progress=False)
    d = data.step(0)
    assert d["sample"].shape[0] == 8                           # cond + uncond
    assert (d["class_labels"][4:] == 4).all()                  # null class
    assert (d["class_labels"][:4] < 4).all()


def test_save_load_identical_outputs(tiny_pipe, tmp_path):
    tfmq.quantize(tiny_pipe, wbits=4, abits=8, calib_size=3, sampler=STEPS, progress=False)
    out = tfmq.save(tiny_pipe, tmp_path / "ckpt")
    loaded = tfmq.load(out)
    x, t, kw = fixed_inputs(tiny_pipe)
    with torch.no_grad():
        assert torch.equal(tiny_pipe.unet(x, t).sample, loaded.unet(x, t).sample)
    a = tfmq.generate(tiny_pipe, STEPS, 3, 2, seed=7, progress=False)
    b = tfmq.generate(loaded, STEPS, 3, 2, seed=7, progress=False)
    assert (a == b).all()
    cfg = json.loads((out / "quantization_config.json").read_text())
    assert cfg["method"] == "naive" and cfg["wbits"] == 4 and cfg["layer_policy"] == "tfmq-official"
    assert cfg["timesteps"] == [int(t) for t in tfmq.sampling.make_scheduler(tiny_pipe, STEPS).timesteps]
    # the FP weights of quantized layers are not in the file
    from safetensors import safe_open
    with safe_open(str(out / "tfmq_denoiser.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name, layer in quant_layers(tiny_pipe.unet).items():
        if layer.weight_quantizer is not None:
            assert f"state.{name}.layer.weight" not in keys and f"codes.{name}" in keys


def test_save_refuses_non_empty_folder(tiny_pipe, tmp_path):
    tfmq.quantize(tiny_pipe, wbits=8, abits=8, calib_size=2, sampler=STEPS, progress=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tfmq.save(tiny_pipe, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"


def test_checkpoint_errors(tiny_pipe, tmp_path):
    tfmq.quantize(tiny_pipe, wbits=4, abits=8, calib_size=2, sampler=STEPS, progress=False)
    out = tfmq.save(tiny_pipe, tmp_path / "ckpt")
    # another model: the denoiser config no longer matches the tensors' fingerprint
    unet_cfg = out / "unet" / "config.json"
    good_unet = unet_cfg.read_text()
    changed = json.loads(good_unet)
    changed["num_class_embeds"] = 5
    unet_cfg.write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match="another model"):
        tfmq.load(out)
    unet_cfg.write_text(good_unet)
    # unknown format version
    cfg_path = out / "quantization_config.json"
    good = cfg_path.read_text()
    cfg = json.loads(good)
    cfg["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version"):
        tfmq.load(out)
    cfg_path.write_text(good)
    # corrupt tensors file
    f = out / "tfmq_denoiser.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        tfmq.load(out)
    # not a checkpoint at all
    with pytest.raises(CheckpointError, match="not a tfmq checkpoint"):
        tfmq.load(tmp_path)


def test_unsupported_models_and_bad_config(tiny_pipe):
    class NoDenoiser:
        transformer = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        get_denoiser(NoDenoiser())

    class WrongDenoiser:
        unet = torch.nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError, match="supported denoisers"):
        tfmq.quantize(WrongDenoiser(), wbits=8, abits=8)
    for bad in ({"wbits": 1}, {"abits": 9}, {"layer_policy": "some"}, {"method": "magic"},
                {"softmax_bits": 12}, {"calib_size": 0}):
        with pytest.raises(ValueError):
            tfmq.quantize(tiny_pipe, progress=False, **bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        tfmq.quantize(tiny_pipe, sampler=SamplerConfig(name="magic"), progress=False)
    with pytest.raises(ValueError, match="could not load"):
        tfmq.load_pipeline("/nonexistent/model")


def test_quantized_layer_is_frozen_to_integer_codes(tiny_pipe):
    tfmq.quantize(tiny_pipe, wbits=3, abits=8, calib_size=2, sampler=STEPS, progress=False)
    for layer in quant_layers(tiny_pipe.unet).values():
        assert isinstance(layer, QuantLayer) and layer.frozen
        if layer.weight_quantizer is not None:
            codes = layer.weight_codes
            assert codes.min() >= 0 and codes.max() <= 7
            scale, zero = layer.weight_quantizer.current()
            torch.testing.assert_close(layer.weight, (codes.float() - zero) * scale)


def test_temporary_hooks_run_in_the_block_and_are_removed_even_after_an_error():
    from tfmq.hooks import temporary_hooks
    lin = torch.nn.Linear(3, 2)
    seen = []
    with temporary_hooks([(lin, lambda m, a: seen.append("pre"))]), \
            temporary_hooks([(lin, lambda m, a, out: seen.append("post"))], pre=False):
        lin(torch.zeros(1, 3))
    lin(torch.zeros(1, 3))
    assert seen == ["pre", "post"]
    with pytest.raises(RuntimeError, match="inside"):
        with temporary_hooks([(lin, lambda m, a: seen.append("again"))]):
            raise RuntimeError("inside")
    lin(torch.zeros(1, 3))
    assert seen == ["pre", "post"] and not lin._forward_pre_hooks and not lin._forward_hooks
