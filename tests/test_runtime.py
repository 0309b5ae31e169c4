"""The deployable runtime (tfmq.runtime) against the calibrated fake-quant model.

Tiny models here have RANDOM weights: they check numerics (runtime == fake-quant reference,
bit for bit), memory accounting, round trips and errors, not quality.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_ddpm_pipeline, tiny_qdiff
from safetensors.torch import load_file

import tfmq
from tfmq.quant.layers import QuantLayer
from tfmq.runtime import (ActQuant, BackendUnavailable, CalibrationMismatchError, PackedWeight, backend_summary,
                          runtime_layers, runtime_nbytes, set_backend)
from tfmq.sampling import SamplerConfig

STEPS = SamplerConfig(steps=4)
FAST = dict(recon_iters=0, act_learn_iters=0, tiar_iters=0, calib_size=2, sampler=STEPS)
CONFIGS = {
    "naive-w4a8": lambda: tfmq.QuantConfig.for_method("naive", wbits=4, abits=8, calib_size=2, sampler=STEPS),
    "tfmq-fsc-all": lambda: tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, fsc="all", **FAST),
    "tfmq-cache-w3": lambda: tfmq.QuantConfig.for_method("tfmq", wbits=3, abits=6, temporal="cache", **FAST),
    "qdiff-split-w8a8": lambda: tiny_qdiff(wbits=8, abits=8, recon_iters=0, act_learn_iters=0),
}


def trajectory_outputs(pipe, sampler, seed=3, n=2, class_labels=None):
    """Denoiser outputs along one deterministic trajectory (the sampler's timesteps in order)."""
    outs = []

    def record(i, t, x, kw):
        with torch.no_grad():
            outs.append(pipe.unet(x, torch.full((x.shape[0],), t, device=x.device), **kw).sample.clone())
    from tfmq.sampling import build_conditioning, denoise
    cond = build_conditioning(pipe, n, seed, class_labels)
    denoise(pipe, sampler, n, n, seed, cond, on_step=record, progress=False)
    return outs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_computes_what_fakequant_did(name, one_thread):
    cls = 5 if name == "tfmq-cache-w3" else None
    pipe = tiny_ddpm_pipeline(cls)
    config = CONFIGS[name]()
    tfmq.quantize(pipe, config, progress=False)
    labels = [0, 3] if cls else None
    want_imgs = tfmq.generate(pipe, config.sampler, 2, 2, seed=5, class_labels=labels, progress=False)
    want = trajectory_outputs(pipe, config.sampler, class_labels=labels)
    tfmq.convert(pipe, "reference")
    assert runtime_layers(pipe.unet)
    assert not any(isinstance(m, QuantLayer) for m in pipe.unet.modules())
    got = trajectory_outputs(pipe, config.sampler, class_labels=labels)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    got_imgs = tfmq.generate(pipe, config.sampler, 2, 2, seed=5, class_labels=labels, progress=False)
    assert (want_imgs == got_imgs).all()
    set_backend(pipe.unet, "weight-only")                   # same numbers, packed weights
    assert backend_summary(pipe.unet)["backend"] == "weight-only"
    again = trajectory_outputs(pipe, config.sampler, class_labels=labels)
    for a, b in zip(want, again):
        assert torch.equal(a, b)


def test_no_fp_copy_of_quantized_weights_and_memory(one_thread, tmp_path):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, wbits=4, abits=8, calib_size=2, sampler=STEPS, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    loaded = tfmq.load(ckpt, backend="weight-only")
    layers = runtime_layers(loaded.unet)
    assert layers
    for name, layer in layers.items():
        if layer.qweight is None:
            continue
        numel = torch.Size(layer.qweight.shape).numel()
        for t in list(layer.parameters()) + list(layer.buffers()):
            assert not (t.is_floating_point() and t.numel() == numel), f"{name} keeps an FP weight"
        # 4-bit codes: half a byte each, plus a float32 scale and zero-point per channel
        assert layer.qweight.packed.numel() == (numel + 1) // 2
    sizes = runtime_nbytes(loaded.unet)
    packed = sum(m.nbytes() for m in loaded.unet.modules() if isinstance(m, PackedWeight))
    assert sizes["packed_weights"] == packed
    acts = [m for m in loaded.unet.modules() if isinstance(m, ActQuant)]     # layers' and attention's
    assert acts and sizes["activation_params"] == sum(t.numel() * t.element_size() for a in acts
                                                      for t in list(a.parameters()) + list(a.buffers()))
    fp32 = sum(p.numel() * 4 for p in tiny_ddpm_pipeline().unet.parameters())
    assert sizes["total"] < 0.5 * fp32                   # tiny model: FP-kept layers weigh a lot


def test_weight_only_holds_fp_layers_as_stored(one_thread, tmp_path):
    """weight-only keeps the weights of the Linear / Conv2d layers the tfmq policy leaves in full
    precision (downsamplers, shortcuts, ...) in the checkpoint's float16 even in a float32 model:
    resident bytes within 1.1x of the checkpoint's tensors and below the reference backend's
    (which widens them at load), the model still reports float32, the numbers are the
    reference's bit for bit, and saving it again writes the same checkpoint."""
    pipe = tiny_ddpm_pipeline()
    with torch.no_grad():        # weights that float16 holds exactly (as the bundled model's), which
        for p in pipe.unet.parameters():      # the checkpoint then stores in float16
            p.copy_(p.half().float())
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, **FAST), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    stored = load_file(str(ckpt / "tfmq_denoiser.safetensors"))
    ckpt_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    ref, low = (tfmq.load(ckpt, backend=b) for b in ("reference", "weight-only"))
    compact = [n for n, layer in runtime_layers(low.unet).items() if "weight" in layer._buffers]
    assert compact and all(stored[f"state.{n}.weight"].dtype == torch.float16 for n in compact), compact
    assert all(low.unet.get_submodule(n).weight.dtype == torch.float16 for n in compact)
    low_bytes, ref_bytes = runtime_nbytes(low.unet)["total"], runtime_nbytes(ref.unet)["total"]
    assert low_bytes <= 1.1 * ckpt_bytes and low_bytes < ref_bytes, (low_bytes, ref_bytes, ckpt_bytes)
    assert low.unet.dtype == torch.float32 and low.dtype == torch.float32
    imgs = [tfmq.generate(p, STEPS, 2, 2, seed=4, progress=False) for p in (ref, low)]
    assert (imgs[0] == imgs[1]).all()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.full((2,), int(low.unet.tfmq_info["timesteps"][1]))
    with torch.no_grad():
        for p in (ref, low):
            p.unet.tfmq_steps.set(1)
            p.unet.tfmq_steps.paused = True
        assert torch.equal(low.unet(x, t).sample, ref.unet(x, t).sample)
    again = load_file(str(tfmq.save(low, tmp_path / "again") / "tfmq_denoiser.safetensors"))
    assert stored.keys() == again.keys()
    assert all(stored[k].dtype == again[k].dtype and torch.equal(stored[k], again[k]) for k in stored)


def test_checkpoint_round_trip_is_exact(one_thread, tmp_path):
    pipe = tiny_ddpm_pipeline()
    config = CONFIGS["tfmq-fsc-all"]()
    tfmq.quantize(pipe, config, progress=False)
    first = tfmq.save(pipe, tmp_path / "a")
    loaded = tfmq.load(first)
    second = tfmq.save(loaded, tmp_path / "b")
    a, b = load_file(str(first / "tfmq_denoiser.safetensors")), load_file(str(second / "tfmq_denoiser.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    imgs = [tfmq.generate(p, config.sampler, 2, 2, seed=1, progress=False) for p in (pipe, loaded)]
    assert (imgs[0] == imgs[1]).all()


def test_sampler_selects_each_step_from_the_host_value(one_thread, tmp_path, monkeypatch):
    """tfmq's sampler loop announces every step's timestep (StepIndex.expect), so the per-step
    model's pre-hook reads no timestep tensor back from the device (one host-GPU synchronisation
    per step): the steps are selected from host ints, in the calibrated order, and the images are
    those of the hook-driven selection."""
    from tfmq.runtime.steps import StepIndex
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, CONFIGS["tfmq-fsc-all"](), progress=False)
    loaded = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"))
    seen = []
    select = StepIndex.select
    monkeypatch.setattr(StepIndex, "select", lambda self, t: seen.append(t) or select(self, t))
    announced = tfmq.generate(loaded, STEPS, 2, 2, seed=1, progress=False)
    assert seen == [int(t) for t in loaded.unet.tfmq_info["timesteps"]]
    assert all(type(t) is int for t in seen)
    seen.clear()
    monkeypatch.setattr(StepIndex, "expect", lambda self, t: None)       # the pre-hook alone
    hooked = tfmq.generate(loaded, STEPS, 2, 2, seed=1, progress=False)
    assert len(seen) == STEPS.steps and all(torch.is_tensor(t) for t in seen)
    assert (announced == hooked).all()


def test_pipeline_call_after_load(one_thread, tmp_path):
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, CONFIGS["tfmq-fsc-all"](), progress=False)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    loaded = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    out = loaded(batch_size=2, num_inference_steps=STEPS.steps, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert out.shape == (2, 16, 16, 3) and torch.isfinite(torch.from_numpy(out)).all()
    with pytest.raises(CalibrationMismatchError, match="4 steps"):
        loaded(batch_size=1, num_inference_steps=3, output_type="np")
    from diffusers import DDPMScheduler
    loaded.scheduler = DDPMScheduler.from_config(loaded.scheduler.config)
    with pytest.raises(CalibrationMismatchError, match="DDPMScheduler"):
        loaded(batch_size=1, num_inference_steps=STEPS.steps, output_type="np")
    # the freshly quantized pipeline checks the same way
    with pytest.raises(CalibrationMismatchError):
        pipe(batch_size=1, num_inference_steps=10, output_type="np")


def test_pipeline_call_tiny_sd(tiny_sd, one_thread, tmp_path):
    tfmq.quantize(tiny_sd, wbits=8, abits=8, calib_size=2, sampler=STEPS, prompts=["a cat"], progress=False)
    loaded = tfmq.load(tfmq.save(tiny_sd, tmp_path / "ckpt"))
    out = loaded("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), height=16, width=16).images
    assert out.shape == (1, 16, 16, 3)
    a = tfmq.generate(tiny_sd, STEPS, 2, 2, seed=0, prompts=["a cat", "a dog"], progress=False)
    b = tfmq.generate(loaded, STEPS, 2, 2, seed=0, prompts=["a cat", "a dog"], progress=False)
    assert (a == b).all()


def test_backend_errors(tiny_pipe, tmp_path):
    tfmq.quantize(tiny_pipe, wbits=8, abits=8, calib_size=2, sampler=STEPS, progress=False)
    ckpt = tfmq.save(tiny_pipe, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="unknown backend"):
        tfmq.load(ckpt, backend="magic")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            tfmq.load(ckpt, backend="w8a8")
    with pytest.raises(ValueError, match="not a calibrated"):
        tfmq.convert(tiny_ddpm_pipeline())
    with pytest.raises(ValueError, match="torch.compile mode"):
        tfmq.load(ckpt, compile="fastest")


@pytest.mark.slow
def test_compiled_fullgraph_equals_eager(one_thread, tmp_path):
    """The per-step index is data: the converted denoiser compiles with fullgraph=True (no graph
    break) and computes what eager mode does at every step."""
    pipe = tiny_ddpm_pipeline()
    config = CONFIGS["tfmq-fsc-all"]()
    tfmq.quantize(pipe, config, progress=False)
    loaded = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"))
    unet = loaded.unet
    ts = unet.tfmq_info["timesteps"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = [unet(x, torch.full((2,), t)).sample for t in ts]
        compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
        for t, want in zip(ts, eager):
            got = compiled(x, torch.full((2,), t)).sample
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # forward compiled, hooks eager: the step index still checks each call
        unet.forward = torch.compile(unet.forward, backend="aot_eager", fullgraph=True)
        unet.tfmq_steps.reset()
        for t, want in zip(ts, eager):
            torch.testing.assert_close(unet(x, torch.full((2,), t)).sample, want, rtol=0, atol=1e-5)
        with pytest.raises(CalibrationMismatchError):
            unet(x, torch.full((2,), ts[0] + 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_follows_the_step_index(tmp_path):
    pipe = tiny_ddpm_pipeline()
    config = CONFIGS["tfmq-fsc-all"]()
    tfmq.quantize(pipe, config, progress=False)
    loaded = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"), device="cuda")
    unet = loaded.unet
    ts = unet.tfmq_info["timesteps"]
    x = torch.randn(2, 3, 16, 16, device="cuda")
    t_in = torch.full((2,), ts[0], device="cuda")
    with torch.no_grad():
        eager = [unet(x, torch.full((2,), t, device="cuda")).sample for t in ts]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                unet(x, t_in)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = unet(x, t_in).sample
        for t, want in zip(ts, eager):
            t_in.fill_(t)
            g.replay()
            torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reduce_overhead_compile_follows_the_steps(tmp_path):
    """``tfmq.load(..., compile="reduce-overhead")``: every call replays a CUDA graph (torch.compile's
    CUDA-graph trees) that reads the per-step parameters through the step-index buffer, so a whole
    trajectory gives what the same compiled code gives without graphs, step for step."""
    pipe = tiny_ddpm_pipeline()
    config = CONFIGS["tfmq-fsc-all"]()
    tfmq.quantize(pipe, config, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    plain = tfmq.load(ckpt, "cuda", compile=True)
    graphs = tfmq.load(ckpt, "cuda", compile="reduce-overhead")
    with torch.no_grad():
        want = trajectory_outputs(plain, config.sampler)
        for _ in range(2):                                 # warm-up and recording, then replays
            got = trajectory_outputs(graphs, config.sampler)
    assert len(got) == len(want) == config.sampler.steps
    per_step = [float((g - w).abs().max()) for g, w in zip(got, want)]
    assert max(per_step) <= 1e-5, per_step


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_w8a8_backend_matches_reference_on_cuda(tmp_path):
    """Real int8 tensor-core layers compute the calibrated grid: per-call outputs close to the
    reference backend, and final images >= 40 dB PSNR vs reference (same noise)."""
    from tfmq.runtime.kernels import int8
    if not int8.available():
        pytest.skip("int8 kernels need Triton and compute capability >= 8.0")
    # the fp32 reference must be fp32: cuDNN convolutions default to TF32 on Ampere and later
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_w8a8_with_reference(tmp_path)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare_w8a8_with_reference(tmp_path):
    pipe = tiny_ddpm_pipeline()
    config = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, layer_policy="all", **FAST)
    tfmq.quantize(pipe, config, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    ref = tfmq.load(ckpt, "cuda", backend="reference")
    fast = tfmq.load(ckpt, "cuda", backend="w8a8")
    summary = backend_summary(fast.unet)
    assert summary["backend_kernels"] > 0.8 * summary["layers"]
    inputs = []
    tfmq.sampling.denoise(ref, config.sampler, 4, 4, 3, on_step=lambda i, tt, x, kw: inputs.append((tt, x.clone())),
                          progress=False)
    rel = []
    with torch.no_grad():
        for step, (tt, x) in enumerate(inputs):    # the same inputs for both backends
            t_b = torch.full((x.shape[0],), tt, device=x.device)
            for unet in (ref.unet, fast.unet):
                unet.tfmq_steps.set(step)
                unet.tfmq_steps.paused = True
            a, b = ref.unet(x, t_b).sample, fast.unet(x, t_b).sample
            for unet in (ref.unet, fast.unet):
                unet.tfmq_steps.paused = False
            rel.append(float((a - b).abs().mean() / a.abs().mean()))
    # integer products are exact; a code of a later layer flips where the reference's float
    # accumulation lands on a rounding boundary, and the flip propagates. Measured on an H200 (both
    # conv paths alike, session 9): per step 0.85%, 1.37%, 1.8e-7, 0.71% (mean |diff| / mean |ref|).
    assert max(rel) <= 0.03, rel
    # Final images: a quantized model is discontinuous, so any change of float rounding moves some
    # codes and the sampler carries the moves on. The yardstick is the reference's own sensitivity
    # to float rounding: the same checkpoint computed in float64. Measured on this random-weight tiny
    # model (4 DDIM steps, 16 images): w8a8 vs fp32 reference 35.6 dB on an H200 (34.9 dB through the
    # Triton interpreter on CPU), float64 vs fp32 reference 34.6 dB (CPU), the quantization error
    # itself (reference vs the FP model) 29.9 dB. A wrong scale or code costs far more than 3 dB.
    ref64 = tfmq.load(ckpt, "cuda", dtype=torch.float64, backend="reference")
    a, b, c = (tfmq.generate(p, config.sampler, 16, 16, seed=0, progress=False).astype("float64")
               for p in (ref, fast, ref64))
    psnr = lambda x, y: 10 * np.log10(255.0 ** 2 / max(((x - y) ** 2).mean(), 1e-12))  # noqa: E731
    assert psnr(b, a) >= psnr(c, a) - 3.0, (psnr(b, a), psnr(c, a))


def test_evaluate_with_the_weight_only_backend(tmp_path, one_thread):
    """evaluate --backend weight-only samples the quantized cell from the runtime: the same images
    as the fake-quant reference (identical numerics), and the report names the backend."""
    import numpy as np
    from tfmq.eval.evaluate import EvalSettings, evaluate
    pipe_dir = tmp_path / "model"
    tiny_ddpm_pipeline().save_pretrained(pipe_dir)
    common = dict(model=str(pipe_dir), methods=["fp", "naive"], bits=["w8a8"], num_images=4, batch_size=4,
                  sampler=SamplerConfig(steps=3), calib_size=2, reference=None, fid_bootstrap=0)
    runs = {}
    for backend in ("reference", "weight-only"):
        report = evaluate(EvalSettings(**common, backend=backend), tmp_path / backend, progress=False)
        assert backend in report["rows"][1]["backend"]
        runs[backend] = np.load(tmp_path / backend / "cells" / report["rows"][1]["cell"] / "samples.npz")["arr_0"]
    assert (runs["reference"] == runs["weight-only"]).all()
    with pytest.raises(ValueError, match="CUDA"):
        EvalSettings(**common, backend="w8a8").validate()      # device cpu: refused before any work


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fuse_quantize", [True, False])
def test_w8a8_backend_compiled_matches_eager_on_cuda(tmp_path, fuse_quantize):
    """torch.compile(fullgraph) of a w8a8 denoiser, with the activation quantizers fused into the
    compiled graph (torch operations) or as the Triton pass: per-call outputs as eager's (codes may
    flip where the compiled float math rounds differently: bounded on average)."""
    from tfmq.runtime.backends import BACKENDS
    from tfmq.runtime.kernels import int8
    if not int8.available():
        pytest.skip("int8 kernels need Triton and compute capability >= 8.0")
    pipe = tiny_ddpm_pipeline()
    config = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, layer_policy="all", **FAST)
    tfmq.quantize(pipe, config, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    eager = tfmq.load(ckpt, "cuda", torch.bfloat16, backend="w8a8").unet
    backend, before = BACKENDS["w8a8"], BACKENDS["w8a8"].fuse_quantize
    backend.fuse_quantize = fuse_quantize
    try:
        comp = tfmq.load(ckpt, "cuda", torch.bfloat16, backend="w8a8", compile=True).unet
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
        t = torch.full((4,), int(tfmq.sampling.sampler_timesteps(pipe, config.sampler)[1]), device="cuda")
        with torch.no_grad():
            for unet in (eager, comp):
                unet.tfmq_steps.set(1)
                unet.tfmq_steps.paused = True
            a, b = eager(x, t).sample.float(), comp(x, t).sample.float()
    finally:
        backend.fuse_quantize = before
    assert torch.isfinite(b).all()
    # measured on an H200 (session 9): 3.5% (fused) / 3.6% (Triton passes) mean |diff| / mean |eager|:
    # the compiled bf16 math around the layers rounds differently from eager and flips codes; the
    # fused quantizers add nothing measurable over the separate passes
    assert (a - b).abs().mean() <= 0.06 * a.abs().mean()
