"""The fused attention with quantized probabilities (tfmq.runtime.kernels.attention): the Triton
kernel against its reference (the fake-quant computation), on a CUDA GPU or, without one, on CPU
tensors through Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``; the
interpreter has no bfloat16, so bfloat16 runs on CUDA only), and the w8a8 runtime's use of it.
Models here have random weights: they test plumbing and numerics, not quality."""

from __future__ import annotations

import os

import pytest
import torch

from tfmq.runtime.kernels import attention as A
from tfmq.runtime.kernels import int8 as K

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if K.available() else "cpu"
needs_kernels = pytest.mark.skipif(not (K.available() or INTERPRET), reason="needs a CUDA GPU with Triton")
needs_cuda = pytest.mark.skipif(not K.available(), reason="needs a CUDA GPU (cc >= 8.0) with Triton")
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def _inputs(gen, b, h, nq, nk, d, dv, dtype, transposed=True):
    """q laid out as the attention processor leaves it ([B, N, H, D] memory, viewed [B, H, N, D])."""
    q = torch.randn(b, nq, h, d, generator=gen).transpose(1, 2) if transposed else torch.randn(b, h, nq, d, generator=gen)
    k, v = torch.randn(b, h, nk, d, generator=gen), torch.randn(b, h, nk, dv, generator=gen)
    return [t.to(DEV, dtype) for t in (q, k, v)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 40, 40, 24, 24), (1, 2, 70, 17, 40, 40), (3, 1, 16, 77, 64, 32)])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_the_fake_quant_computation(dtype, shape, bits):
    """Kernel vs the explicit computation in the same dtype: equal up to the summation order (a
    probability on a rounding boundary may land one grid step apart); the probabilities ARE
    rounded (the unrounded attention is far off at 4 bits)."""
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    b, h, nq, nk, d, dv = shape
    q, k, v = _inputs(gen, b, h, nq, nk, d, dv, dtype)
    qmax = (1 << bits) - 1
    scale_tab = torch.tensor([1.0 / qmax, 0.7 / qmax, 1.3 / qmax], device=DEV)
    zero_tab = torch.zeros(3, device=DEV)
    step = torch.tensor(2, device=DEV)
    out = A.quant_attention(q, k, v, d ** -0.5, scale_tab, zero_tab, 0, qmax, step)
    ref = A.ref_quant_attention(q, k, v, d ** -0.5, scale_tab, zero_tab, 0, qmax, step)
    assert out.shape == ref.shape == (b, h, nq, dv) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()          # [B, N, H, Dv] memory: to_out reads it as is
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (out.double() - ref.double()).abs()
    # elements off by more than a few ulps: probabilities one grid step apart (rare)
    step_size = float(scale_tab[2]) * float(v.abs().max())
    assert float(err.max()) <= max(step_size, 4 * ulp * float(ref.abs().max())) * 1.01, float(err.max())
    assert float((err > 4 * ulp * float(ref.abs().max())).double().mean()) < 0.02
    plain = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * d ** -0.5, -1) @ v.double()
    if bits == 4:
        assert float((plain - ref.double()).abs().max()) > 20 * float(err.max()) + 1e-3


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_upcast_scores_as_upcast_attention(dtype):
    """``upcast_scores`` (diffusers' ``upcast_attention``): scores in float32, as the reference
    computes them then. Either way the kernel is nearer its own mode's reference than the other's
    (counted in probability codes that moved: output changes of a third of a grid step or more)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t * 4 for t in _inputs(gen, 2, 2, 48, 40, 32, 32, dtype))
    tabs = torch.tensor([1 / 255], device=DEV), torch.zeros(1, device=DEV)
    refs = {up: A.ref_quant_attention(q, k, v, 0.3, *tabs, 0, 255, None, up).double() for up in (False, True)}
    flip = float(v.abs().max()) / 255 / 3
    for up in (False, True):
        out = A.quant_attention(q, k, v, 0.3, *tabs, 0, 255, None, up).double()
        own, other = (int(((out - refs[m]).abs() > flip).sum()) for m in (up, not up))
        assert own * 2 < other, (up, own, other)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [(0, 255), (-128, 127)])
def test_kernel_rounds_q_k_v_to_their_grids(dtype, grid):
    """With the q / k / v tables the kernel takes the unrounded inputs and rounds each to its own
    grid (per-step sets read at the step) before the attention: as the reference that rounds them
    first; without the rounding the result is far off (coarse grids here)."""
    gen = torch.Generator().manual_seed(21)
    amin, amax = grid
    q, k, v = _inputs(gen, 2, 2, 37, 45, 24, 24, dtype)
    zero = (amin + amax + 1) // 2 if amin == 0 else 0

    def tabs(scale):
        return (torch.tensor([scale, 2 * scale, 3 * scale], device=DEV),
                torch.full((3,), float(zero), device=DEV))
    qkv = [*tabs(0.05), *tabs(0.04), *tabs(0.06)]
    sm = (torch.tensor([1 / 255, 1 / 200, 1 / 150], device=DEV), torch.zeros(3, device=DEV))
    step = torch.tensor(2, device=DEV)
    out = A.quant_attention(q, k, v, 0.2, *sm, 0, 255, step, False, qkv, amin, amax).double()
    ref = A.ref_quant_attention(q, k, v, 0.2, *sm, 0, 255, step, False, qkv, amin, amax).double()
    unrounded = A.ref_quant_attention(q, k, v, 0.2, *sm, 0, 255, step).double()
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (out - ref).abs()
    assert float((err > 4 * ulp * float(ref.abs().max())).double().mean()) < 0.02
    assert float((unrounded - ref).abs().max()) > 10 * float(err.max()) + 1e-3
    with pytest.raises(ValueError, match="6 tables"):
        A.quant_attention(q, k, v, 0.2, *sm, 0, 255, step, False, qkv[:4], amin, amax)
    with pytest.raises(ValueError, match="softmax table's shape"):
        A.quant_attention(q, k, v, 0.2, *sm, 0, 255, step, False, [t[:1] for t in qkv], amin, amax)


@needs_kernels
def test_kernel_reads_the_set_of_the_step():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(gen, 2, 2, 33, 33, 32, 32, torch.float32)
    scale_tab, zero_tab = torch.tensor([1 / 15, 2 / 15], device=DEV), torch.zeros(2, device=DEV)
    outs = []
    for s in (0, 1):
        step = torch.tensor(s, device=DEV)
        out = A.quant_attention(q, k, v, 0.2, scale_tab, zero_tab, 0, 15, step)
        ref = A.ref_quant_attention(q, k, v, 0.2, scale_tab, zero_tab, 0, 15, step)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        outs.append(out)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-2


@needs_kernels
def test_bad_input_is_refused_before_launch():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _inputs(gen, 1, 1, 8, 8, 16, 16, torch.float32)
    s, z = torch.ones(1, device=DEV) / 255, torch.zeros(1, device=DEV)
    with pytest.raises(ValueError, match="D, Dv <= 256"):
        wide = torch.zeros(1, 1, 8, 512, device=DEV)
        A.quant_attention(wide, wide, wide, 1.0, s, z, 0, 255)
    with pytest.raises(ValueError, match="one float dtype"):
        A.quant_attention(q, k.half(), v, 1.0, s, z, 0, 255)
    with pytest.raises(ValueError, match="need a step tensor"):
        A.quant_attention(q, k, v, 1.0, torch.ones(3, device=DEV), torch.zeros(3, device=DEV), 0, 255)
    with pytest.raises(ValueError, match="float32 table"):
        A.quant_attention(q, k, v, 1.0, s.double(), z, 0, 255)
    with pytest.raises(ValueError, match="bad softmax grid"):
        A.quant_attention(q, k, v, 1.0, s, z, 255, 0)
    assert not A.supports(torch.zeros(1, 1, 8, 300), torch.zeros(1, 1, 8, 300), torch.zeros(1, 1, 8, 300))


@needs_kernels
@pytest.mark.parametrize("method", ["naive", "tfmq"])
def test_w8a8_runtime_attention_uses_the_kernel(tmp_path, monkeypatch, method):
    """A W8A8 checkpoint with 8-bit probabilities (the default softmax bits): under the w8a8
    backend every attention runs the fused kernel, rounding q, k, v in it, and each attention's
    output equals the fake-quant attention's on the same inputs (float32) but where a probability
    on a rounding boundary moved one code (a few elements of one query row)."""
    import tfmq
    from conftest import tiny_ddpm_pipeline
    from tfmq.quant.layers import QuantAttnProcessor
    from tfmq.runtime import backend_summary
    from tfmq.runtime.backends import W8A8Backend
    from tfmq.runtime.layers import RuntimeAttnProcessor

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    pipe = tiny_ddpm_pipeline()
    extra = dict(recon_iters=0, act_learn_iters=0, tiar_iters=0) if method == "tfmq" else {}
    config = tfmq.QuantConfig.for_method(method, wbits=8, abits=8, layer_policy="all", calib_size=2,
                                         sampler=tfmq.SamplerConfig("ddim", 4), **extra)
    tfmq.quantize(pipe, config, progress=False)
    unet = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"), DEV, backend="w8a8").unet
    n_attn = sum(1 for m in unet.modules() if getattr(m, "tfmq_attn", None) is not None)
    assert n_attn > 0 and backend_summary(unet)["attention"] == {"flash": 0, "fused": n_attn, "explicit": 0}
    qkv_passed, moved = [], []
    real, attend = A.quant_attention, RuntimeAttnProcessor.attend
    monkeypatch.setattr(A, "quant_attention", lambda *a: qkv_passed.append(a[10]) or real(*a))

    def compared(attn, q, k, v, mask):
        out, dtype = attend(attn, q, k, v, mask)
        ref, _ = QuantAttnProcessor.attend(attn, q, k, v, mask)
        moved.append(float(((out - ref).abs() > 1e-5 * float(ref.abs().max())).double().mean()))
        return out, dtype
    monkeypatch.setattr(RuntimeAttnProcessor, "attend", staticmethod(compared))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEV)
    t = torch.full((2,), 500, device=DEV)
    steps = getattr(unet, "tfmq_steps", None)
    for step in ((0, 3) if steps is not None else (None,)):
        if step is not None:
            steps.set(step)
            steps.paused = True
        with torch.no_grad():
            unet(x, t)
    calls = n_attn * (2 if steps is not None else 1)
    assert len(qkv_passed) == calls and all(q is not None and len(q) == 6 for q in qkv_passed), qkv_passed
    assert len(moved) == calls and max(moved) < 0.01, moved


@needs_cuda
@pytest.mark.cuda
def test_custom_op_compiles_and_captures(tmp_path):
    """The custom operator inside torch.compile(fullgraph) and a CUDA graph: the eager kernel's
    output, per-step tables read at the step tensor as it changes between replays (bfloat16)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(gen, 4, 2, 256, 256, 64, 64, torch.bfloat16)
    scale_tab = torch.tensor([1 / 255, 2 / 255], device=DEV)
    zero_tab = torch.zeros(2, device=DEV)
    step = torch.zeros((), dtype=torch.long, device=DEV)
    from tfmq.runtime.kernels import ops

    fn = torch.compile(lambda q, k, v: ops.quant_attention(q, k, v, 0.125, scale_tab, zero_tab, 0, 255, step, False,
                                                           [], 0, 255) * 2, fullgraph=True)
    for s in (0, 1):
        step.fill_(s)
        want = A.quant_attention(q, k, v, 0.125, scale_tab, zero_tab, 0, 255, step) * 2
        assert torch.equal(fn(q, k, v), want)
    out = torch.empty_like(want)
    g = torch.cuda.CUDAGraph()
    step.fill_(0)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out.copy_(A.quant_attention(q, k, v, 0.125, scale_tab, zero_tab, 0, 255, step))
    for s in (1, 0):
        step.fill_(s)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, A.quant_attention(q, k, v, 0.125, scale_tab, zero_tab, 0, 255, step))


@needs_kernels
def test_autotune_keeps_register_sized_tiles():
    """The autotuner's tiles for wide heads: none whose query block or key block times the head
    width exceeds 128 x 128 elements (they would spill); narrow heads keep every tile."""
    from tfmq.runtime.kernels import _attention_triton as ta
    configs = ta._configs()
    wide = ta._prune(configs, {}, BLOCK_D=256, BLOCK_DV=256)
    assert wide and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in wide)
    assert ta._prune(configs, {}, BLOCK_D=64, BLOCK_DV=64) == configs


@needs_kernels
def test_custom_op_agrees_with_its_fake_and_compiles_opaquely():
    """tfmq::quant_attention (what compiled graphs call): the function's output, a fake
    implementation that agrees with the real one (torch.library.opcheck: schema, shapes, strides,
    dtypes), and a fullgraph compile around it (AOT tracing with the fake) computing the same."""
    from tfmq.runtime.kernels import ops
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(gen, 2, 2, 20, 36, 16, 16, torch.float32)
    scale_tab, zero_tab = torch.tensor([1 / 255, 2 / 255], device=DEV), torch.zeros(2, device=DEV)
    step = torch.tensor(1, device=DEV)
    args = (q, k, v, 0.25, scale_tab, zero_tab, 0, 255, step, False, [], 0, 255)
    want = A.quant_attention(*args[:10])
    got = ops.quant_attention(*args)
    assert torch.equal(got, want) and got.stride() == want.stride()
    torch.library.opcheck(ops.quant_attention, args)

    def block(q, k, v):       # the processor's layout change after the attention, around the op
        return ops.quant_attention(q * 1.0, k, v, 0.25, scale_tab, zero_tab, 0, 255, step, False, [], 0,
                                   255).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    comp = torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v)
    assert torch.equal(comp, want.transpose(1, 2).reshape(2, 20, -1))
