"""W8A16 convolution (tfmq.runtime.kernels.w8a16): the int8-weight x float-input kernel against the
reference backend's dequantize-then-convolve, and the ``w8a8`` backend's use of it for convolutions
whose input the layer policy keeps in full precision.

The kernel tests run on a CUDA GPU, or on CPU tensors through Triton's interpreter where there is
none (tests/conftest.py sets ``TRITON_INTERPRET=1`` when Triton is installed); fp16 only there: the
interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.8 and 3.9). The tiny model is RANDOM-weight:
numerics, not quality.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tfmq.runtime.kernels import int8 as K
from tfmq.runtime.kernels import w8a16 as W

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if K.available() else "cpu"
needs_kernels = pytest.mark.skipif(not (K.available() or INTERPRET),
                                   reason="needs a CUDA GPU (cc >= 8.0) with Triton")
DTYPES = [torch.float16] + ([] if INTERPRET else [torch.bfloat16])
SHAPES = [  # batch, cin, h, w, cout, k, stride, padding
    (2, 20, 9, 7, 24, 3, 1, 1),        # channels not a multiple of any tile, odd image
    (1, 8, 6, 6, 70, 3, 2, 1),         # stride 2, cout across two N tiles
    (2, 16, 5, 5, 8, 1, 1, 0),         # 1x1
    (1, 72, 8, 8, 136, 3, 1, 1),       # several K blocks per tap
    (1, 64, 6, 5, 16, 3, 1, 1),        # whole K blocks
]


def _problem(gen, cin, cout, k, dtype, asym=True):
    if asym:
        codes = torch.randint(0, 256, (cout, cin, k, k), generator=gen)
        zw, ow = torch.randint(90, 170, (cout,), generator=gen).float(), 128
    else:
        codes = torch.randint(-128, 128, (cout, cin, k, k), generator=gen)
        zw, ow = torch.zeros(cout), 0
    sw = torch.rand(cout, generator=gen) * 0.01 + 0.001
    w_ref = ((codes.float() - zw.view(-1, 1, 1, 1)) * sw.view(-1, 1, 1, 1)).to(dtype)   # reference backend
    return codes, zw, ow, sw, w_ref


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("asym", [True, False])
def test_kernel_equals_dequantize_then_conv(dtype, shape, asym):
    b, cin, h, w, cout, k, stride, pad = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    codes, zw, ow, sw, w_ref = _problem(gen, cin, cout, k, dtype, asym)
    x = torch.randn(b, cin, h, w, generator=gen).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype)
    w8, zo = W.prepare_weight(codes, zw, ow)
    to = lambda t: t.to(DEV)  # noqa: E731
    y = W.w8a16_conv2d(to(x.contiguous(memory_format=torch.channels_last)), to(w8), to(zo), to(sw), to(bias),
                       stride, pad)
    # the same products (the dtype's values) summed in float64: the kernel differs by its float32
    # sums and the final rounding to the dtype only
    want = F.conv2d(x.double(), w_ref.double(), bias.double(), stride, pad)
    assert y.dtype == dtype and y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    tol = torch.finfo(dtype).eps * want.abs().max()
    assert (y.cpu().double() - want).abs().max() <= tol
    # a contiguous (NCHW) input is read as well, with the same result
    y2 = W.w8a16_conv2d(to(x), to(w8), to(zo), to(sw), to(bias), stride, pad)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    # and the PyTorch twin of the kernel dequantizes as the reference backend does
    w32 = (codes.float() - zw.view(-1, 1, 1, 1)) * sw.view(-1, 1, 1, 1)
    torch.testing.assert_close(W.ref_w8a16_conv2d(x.float(), w8, zo, sw, bias.float(), stride, pad),
                               F.conv2d(x.float(), w32, bias.float(), stride, pad), rtol=1e-5, atol=1e-4)


@needs_kernels
def test_bad_inputs_are_refused_before_launch():
    gen = torch.Generator().manual_seed(0)
    codes, zw, ow, sw, _ = _problem(gen, 8, 16, 3, torch.float16)
    w8, zo = (t.to(DEV) for t in W.prepare_weight(codes, zw, ow))
    x = torch.randn(1, 8, 6, 6, device=DEV)
    with pytest.raises(ValueError, match="dtype"):
        W.w8a16_conv2d(x, w8, zo, sw.to(DEV), None, 1, 1)                     # float32 input
    with pytest.raises(ValueError, match="channels"):
        W.w8a16_conv2d(x[:, :4].half(), w8, zo, sw.to(DEV), None, 1, 1)
    with pytest.raises(ValueError, match="int8"):
        W.w8a16_conv2d(x.half(), w8.permute(0, 3, 1, 2), zo, sw.to(DEV), None, 1, 1)   # PyTorch layout
    with pytest.raises(ValueError, match="zo"):
        W.w8a16_conv2d(x.half(), w8, zo[:3], sw.to(DEV), None, 1, 1)
    with pytest.raises(ValueError, match="integers"):
        W.prepare_weight(codes.float() + 0.5, zw, ow)


def _official_w8a8_checkpoint(tmp_path):
    """A tfmq W8A8 checkpoint of the tiny random-weight DDPM under the tfmq-official policy (every
    resnet conv1 keeps its input in full precision), timing-only calibration."""
    import tfmq
    from conftest import tiny_ddpm_pipeline
    pipe = tiny_ddpm_pipeline()
    config = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, layer_policy="tfmq-official",
                                         recon_iters=0, act_learn_iters=0, tiar_iters=0, calib_size=2,
                                         sampler=tfmq.SamplerConfig("ddim", 4))
    tfmq.quantize(pipe, config, progress=False)
    return tfmq.save(pipe, tmp_path / "ckpt")


@needs_kernels
def test_w8a8_backend_runs_fp_input_convs_with_the_w8a16_kernel(tmp_path, monkeypatch):
    """tfmq-official keeps the input of every resnet conv1 in full precision: under ``w8a8`` without
    the dense copies those convs (8-bit weights) run the W8A16 kernel, and the model's output
    matches the reference backend's on the same inputs (fp16 model)."""
    import tfmq
    from tfmq.runtime import backend_summary, runtime_layers
    from tfmq.runtime.backends import W8A8Backend

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    monkeypatch.setattr(W8A8Backend, "dense_fp_input_convs", False)     # the kernel, not the dense copy
    ckpt = _official_w8a8_checkpoint(tmp_path)
    ref = tfmq.load(ckpt, DEV, dtype=torch.float16, backend="reference")
    fast = tfmq.load(ckpt, DEV, dtype=torch.float16, backend="w8a8")
    w8a16 = [n for n, l in runtime_layers(fast.unet).items() if "w8a16" in l.prepared]
    assert w8a16 and all(n.endswith("conv1") for n in w8a16), w8a16
    backend = fast.unet.tfmq_backend
    left = [n for n, l in runtime_layers(fast.unet).items() if not l.prepared]
    assert backend == "w8a8" and left == ["time_embedding.linear_2"], left    # a linear with an FP input
    assert backend_summary(fast.unet)["reference_math"] == 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEV, torch.float16)
    t = torch.full((2,), 500, device=DEV)
    outs = []
    with torch.no_grad():
        for pipe_ in (ref, fast):
            pipe_.unet.tfmq_steps.set(0)
            pipe_.unet.tfmq_steps.paused = True
            outs.append(pipe_.unet(x, t).sample.float())
    a, b = outs
    # fp16 sums in another order move a few activation codes of later layers (see
    # tests/test_runtime.py): the bound is on the mean difference
    assert float((a - b).abs().mean() / a.abs().mean()) <= 0.03
    # the fp32 model keeps those convs on the reference math (the kernel takes bf16 / fp16)
    fast32 = tfmq.load(ckpt, DEV, dtype=torch.float32, backend="w8a8")
    assert not any("w8a16" in l.prepared for l in runtime_layers(fast32.unet).values())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_w8a8_backend_keeps_fp_input_conv_weights_dense(tmp_path, monkeypatch, dtype):
    """By default ``w8a8`` expands the weight of each full-precision-input 8-bit conv once, in the
    model dtype: the layer computes exactly what ``reference`` computes (bit for bit, same input),
    with no expansion per call, and ``runtime_nbytes`` counts the copies."""
    import tfmq
    from tfmq.runtime import backend_summary, runtime_layers, runtime_nbytes
    from tfmq.runtime.backends import BACKENDS, W8A8Backend

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    ckpt = _official_w8a8_checkpoint(tmp_path)
    fast = tfmq.load(ckpt, DEV, dtype=dtype, backend="w8a8").unet
    dense = {n: l for n, l in runtime_layers(fast).items() if "dense" in l.prepared}
    assert dense and all(n.endswith("conv1") for n in dense), sorted(dense)
    assert backend_summary(fast)["reference_math"] == 1             # time_embedding.linear_2 (a linear)
    gen = torch.Generator().manual_seed(4)
    extra = 0
    for n, layer in dense.items():
        w = layer.prepared["dense"]
        assert w.dtype == dtype and torch.equal(w, layer.dequantized_weight(dtype))
        extra += w.numel() * w.element_size()
        x = torch.randn(2, w.shape[1], 8, 8, generator=gen).to(DEV, dtype)
        assert torch.equal(BACKENDS["w8a8"].run(layer, x), BACKENDS["reference"].run(layer, x)), n
    assert runtime_nbytes(fast)["backend_extra"] >= extra
