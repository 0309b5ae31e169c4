"""Finite set calibration: per-step activation parameters, their selection while sampling and
the refusal of another sampler / step count.

Tiny diffusers models with RANDOM weights: plumbing and exactness only, no quality claims.
"""

import pytest
import torch
from conftest import tiny_ddpm_pipeline

import tfmq
from tfmq.calib.fsc import CalibrationMismatchError, tib_act_quantizers
from tfmq.models.temporal import timestep_key
from tfmq.quant.model import act_quantizers
from tfmq.sampling import SamplerConfig, generate

STEPS = SamplerConfig("ddim", 4)


def quantized(fsc, **kw):
    kw.setdefault("act_learn_iters", 5)
    pipe = tiny_ddpm_pipeline()
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=STEPS, fsc=fsc, tiar_iters=0, recon_iters=0,
                                      recon_units=["down_blocks.0.resnets.0"], **kw)
    return tfmq.quantize(pipe, cfg, progress=False)


@pytest.fixture(scope="module")
def tib_pipe():
    return quantized("tib")


@pytest.fixture(scope="module")
def all_pipe():
    return quantized("all", act_rows_per_step=2)


def record_used_sets(pipe, quantizers):
    """Run the sampler; for every call of every quantizer check that its output is the fake-quant
    of its input with the parameter set of the call's step, and record the step indices used."""
    timesteps = pipe.unet.tfmq_info["timesteps"]
    current = {}
    used = {n: [] for n in quantizers}

    def on_call(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        current["step"] = timesteps.index(timestep_key(t.reshape(-1)[0]))

    def check(name):
        def hook(q, args, out):
            s = current["step"]
            want = q.fake_quant(args[0], q.scale[s].to(args[0].dtype), q.zero_point[s].to(args[0].dtype))
            assert q.set_index == s and torch.equal(out, want), name
            used[name].append(s)
        return hook

    hooks = [pipe.unet.register_forward_pre_hook(on_call, with_kwargs=True)]
    hooks += [q.register_forward_hook(check(n)) for n, q in quantizers.items()]
    try:
        generate(pipe, STEPS, 1, progress=False)
    finally:
        for h in hooks:
            h.remove()
    return used


def test_tib_mode_per_step_exact_ranges_used_at_each_step(tib_pipe):
    unet = tib_pipe.unet
    assert unet.tfmq_info["fsc"]["mode"] == "tib"
    tib = tib_act_quantizers(unet)
    assert len(tib) == 8                                  # the input of every time_emb_proj
    for name, q in tib.items():
        assert q.scale.shape[0] == 4
        assert len(set(q.scale.flatten().tolist())) == 4, name     # one distinct set per step
    for name, q in act_quantizers(unet).items():
        if name not in tib:                               # one set: one range for all steps
            assert q.n_sets == 1 and q.scale.shape[0] == 1, name
    used = record_used_sets(tib_pipe, tib)
    assert all(v == [0, 1, 2, 3] for v in used.values())


def test_tib_mode_ranges_are_the_exact_minmax(tib_pipe):
    """The TIB's inputs depend on t only: the range at step s is their exact min / max."""
    unet = tib_pipe.unet
    tib = tib_act_quantizers(unet)
    seen = {}
    hooks = [q.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
             for n, q in tib.items()]
    try:
        for s, t in enumerate(unet.tfmq_info["timesteps"]):
            seen.clear()
            with torch.no_grad():
                unet(torch.zeros(1, 3, 16, 16), torch.tensor([t]))
            for n, q in tib.items():
                x = seen[n]
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                assert float(q.scale[s]) == pytest.approx((hi - lo) / 255, rel=1e-5), (n, s)
    finally:
        for h in hooks:
            h.remove()


def test_all_mode_every_quantizer_has_per_step_sets_used_at_each_step(all_pipe):
    unet = all_pipe.unet
    info = unet.tfmq_info["fsc"]
    assert info["mode"] == "all" and info["n_sets"] == 4
    qs = act_quantizers(unet)
    assert info["per_step_quantizers"] == len(qs)
    differing = [n for n, q in qs.items() if len(set(q.scale.flatten().tolist())) > 1]
    assert len(differing) > len(qs) // 2                  # ranges really depend on the step
    used = record_used_sets(all_pipe, qs)
    assert all(v == [0, 1, 2, 3] for v in used.values())


def test_mismatched_sampler_is_refused(tib_pipe, tmp_path):
    with pytest.raises(CalibrationMismatchError, match="calibrated for ddim with 4 steps"):
        generate(tib_pipe, SamplerConfig("ddim", 8), 1, progress=False)
    with pytest.raises(CalibrationMismatchError, match="ddpm"):
        generate(tib_pipe, SamplerConfig("ddpm", 4), 1, progress=False)
    # diffusers' own pipeline is checked before it starts: another step count, including one whose
    # timesteps are a subset of the calibrated ones (DDIM-2: 500, 0 inside DDIM-4: 750, 500, 250, 0)
    with pytest.raises(CalibrationMismatchError, match="calibrated for ddim with 4 steps"):
        tib_pipe(batch_size=1, num_inference_steps=3, output_type="np")
    with pytest.raises(CalibrationMismatchError, match="calibrated for ddim with 4 steps"):
        tib_pipe(batch_size=1, num_inference_steps=2, output_type="np")
    # direct denoiser calls: the step index refuses an unknown timestep and a skipped step
    x = torch.zeros(1, 3, 16, 16)
    tib_pipe.unet.tfmq_steps.reset()
    with pytest.raises(CalibrationMismatchError, match="not one this quantized model was calibrated for"):
        tib_pipe.unet(x, torch.tensor([666]))
    tib_pipe.unet(x, torch.tensor([750]))
    with pytest.raises(CalibrationMismatchError, match="does not follow"):
        tib_pipe.unet(x, torch.tensor([250]))
    assert tib_pipe(batch_size=1, num_inference_steps=4, output_type="np").images.shape == (1, 16, 16, 3)
    # the same checks after a save / load round trip
    tfmq.save(tib_pipe, tmp_path / "ck")
    loaded = tfmq.load(tmp_path / "ck")
    with pytest.raises(CalibrationMismatchError, match="calibrated for ddim with 4 steps"):
        generate(loaded, SamplerConfig("ddim", 5), 1, progress=False)
    with pytest.raises(CalibrationMismatchError):
        loaded(batch_size=1, num_inference_steps=2, output_type="np")


def test_fsc_config_validation():
    with pytest.raises(ValueError, match="fsc"):
        tfmq.QuantConfig.for_method("tfmq", fsc="sometimes")
    with pytest.raises(ValueError, match="tfmq method"):
        tfmq.QuantConfig.for_method("naive", fsc="all")
    with pytest.raises(ValueError, match="interval_length"):
        tfmq.QuantConfig.for_method("tfmq", interval_length=0)
    cfg = tfmq.QuantConfig.for_method("tfmq", abits=32)
    assert cfg.fsc == "tib" and cfg.effective_fsc == "none"   # weights-only: nothing to calibrate


def test_tib_mode_act_learning_uses_each_rows_step_and_keeps_tib_ranges():
    """fsc=tib: the TIB's per-step sets stay the exact min-max; the single-set quantizers are
    refined by activation step learning, whose forwards select each row's own step set."""
    seen = []
    orig = tfmq.calib.act_learning.learn_act_steps

    def spy(quantizers, loss_fn, *a, **kw):
        unet = pipes[-1].unet
        hooks = [q.register_forward_pre_hook(lambda m, args: seen.append(m.set_index))
                 for q in tib_act_quantizers(unet).values()]
        try:
            return orig(quantizers, loss_fn, *a, **kw)
        finally:
            for h in hooks:
                h.remove()

    pipes = []
    import tfmq.models.adapter as adapter
    real = adapter.get_denoiser

    def remember(pipe):
        pipes.append(pipe)
        return real(pipe)

    mp = pytest.MonkeyPatch()
    mp.setattr(tfmq.calib.act_learning, "learn_act_steps", spy)
    mp.setattr(tfmq.api, "get_denoiser", remember)
    try:
        learned = quantized("tib", act_learn_iters=20)
    finally:
        mp.undo()
    fixed = quantized("tib", act_learn_iters=0)
    info = learned.unet.tfmq_info["act_learning"]
    assert list(info) == ["down_blocks.0.resnets.0"] and info["down_blocks.0.resnets.0"]["iters"] == 20
    # per-row step sets during learning, from the reconstruction rows' steps
    assert seen and all(torch.is_tensor(i) and i.dim() == 1 for i in seen)
    assert {int(v) for i in seen for v in i} <= {0, 1, 2, 3}
    a, b = act_quantizers(learned.unet), act_quantizers(fixed.unet)
    tib = tib_act_quantizers(learned.unet)
    for n in tib:
        assert torch.equal(a[n].scale, b[n].scale), n                # exact ranges kept
    unit = [n for n in a if n.startswith("down_blocks.0.resnets.0.") and n not in tib]
    assert unit and any(not torch.equal(a[n].scale, b[n].scale) for n in unit)  # learned
    others = [n for n in a if not n.startswith("down_blocks.0.resnets.0.")]
    assert all(torch.equal(a[n].scale, b[n].scale) for n in others)  # other units untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tib_mode_with_act_learning_on_cuda_keeps_parameters_on_the_gpu():
    """Per-row step sets on the GPU: every quantizer parameter lives with the model."""
    pipe = tiny_ddpm_pipeline().to("cuda")
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=2, calib_batch_size=2,
                                      sampler=STEPS, fsc="tib", tiar_iters=5, recon_iters=5,
                                      act_learn_iters=5)
    tfmq.quantize(pipe, cfg, progress=False)
    for name, q in act_quantizers(pipe.unet).items():
        assert q.scale.device.type == "cuda" and q.zero_point.device.type == "cuda", name
    assert generate(pipe, STEPS, 2, progress=False).shape == (2, 16, 16, 3)
