"""W8A8 int8 kernels (tfmq.runtime.kernels.int8): reference algebra on CPU, Triton kernels on CUDA.

The CPU tests check that the integer decomposition used by the kernels (int8 offsets, ``ca``/``cb``
corrections, the padding code) equals fake quantization in float64. The kernel tests run on a CUDA
GPU, or on CPU tensors through Triton's interpreter where there is none (tests/conftest.py sets
``TRITON_INTERPRET=1`` when Triton is installed; without Triton they are skipped).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tfmq.runtime.kernels import int8 as K

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_KERNELS = K.available() or INTERPRET
DEV = "cuda" if K.available() else "cpu"
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="needs a CUDA GPU (cc >= 8.0) with Triton")
needs_cuda = pytest.mark.skipif(not K.available(), reason="needs a CUDA GPU (cc >= 8.0) with Triton")

GRIDS = {"unsigned": (0, 255), "signed": (-128, 127)}


def _problem(gen, qmin, qmax, n, wshape, asym_w=True):
    """Random activation grid params and weight codes (the weight grid is [0,255] asym or signed)."""
    zx = torch.randint(qmin, qmax + 1, (1,), generator=gen).float() if qmin == 0 else torch.zeros(1)
    sx = torch.rand(1, generator=gen) * 0.05 + 0.01
    if asym_w:
        wq = torch.randint(0, 256, wshape, generator=gen).float()
        zw = torch.randint(0, 256, (n,), generator=gen).float()
        ow = 128
    else:
        wq = torch.randint(-128, 128, wshape, generator=gen).float()
        zw = torch.zeros(n)
        ow = 0
    sw = torch.rand(n, generator=gen) * 0.02 + 0.001
    return sx, zx, wq, zw, ow, sw


# ------------------------------------------------------------------------------------------ CPU

@pytest.mark.parametrize("grid", ["unsigned", "signed"])
@pytest.mark.parametrize("asym_w", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ref_linear_equals_fake_quant(grid, asym_w, with_bias):
    gen = torch.Generator().manual_seed(0)
    qmin, qmax = GRIDS[grid]
    m, n, k = 13, 7, 29
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, n, (n, k), asym_w)
    xq = torch.randint(qmin, qmax + 1, (m, k), generator=gen).float()
    bias = torch.randn(n, generator=gen) if with_bias else None
    ox = K.offset_for(qmin, qmax)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    assert b.dtype == torch.int8 and torch.equal(bsum, b.int().sum(1))
    a = (xq - ox).to(torch.int8)
    ca = ox - zx
    out = K.ref_linear(a, b, sx, ca, sw, cb, bias)
    d = torch.float64
    ref = F.linear((xq - zx).to(d) * sx.to(d), (wq - zw[:, None]).to(d) * sw[:, None].to(d),
                   None if bias is None else bias.to(d))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ksize,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 2)])
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
def test_ref_conv2d_equals_fake_quant(ksize, stride, padding, grid):
    gen = torch.Generator().manual_seed(1)
    qmin, qmax = GRIDS[grid]
    bsz, cin, h, w, cout = 2, 5, 7, 6, 4
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, cout, (cout, cin, ksize, ksize))
    if grid == "unsigned":
        zx = torch.tensor([200.0])  # far from ox: a wrong padding code would show
    xq = torch.randint(qmin, qmax + 1, (bsz, cin, h, w), generator=gen).float()
    bias = torch.randn(cout, generator=gen)
    ox = K.offset_for(qmin, qmax)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    assert b.shape == (cout, ksize, ksize, cin)
    a = (xq - ox).to(torch.int8).permute(0, 2, 3, 1).contiguous()      # NHWC
    out = K.ref_conv2d(a, b, stride, padding, sx, ox - zx, sw, cb, bias)
    d = torch.float64
    ref = F.conv2d((xq - zx).to(d) * sx.to(d), (wq - zw.view(-1, 1, 1, 1)).to(d) * sw.view(-1, 1, 1, 1).to(d),
                   bias.to(d), stride=stride, padding=padding)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_ref_quantize_act_codes():
    x = torch.tensor([-1.0, -0.25, 0.0, 0.25, 0.5, 0.75, 100.0, -100.0])
    sx, zx = torch.tensor([0.5]), torch.tensor([3.0])
    # round half to even: -0.5 -> -0, 0.5 -> 0, 1.5 -> 2; then + 3, clamp [0, 255], - 128
    codes = K.ref_quantize_act(x, sx, zx, 0, 255).long() + 128
    assert codes.tolist() == [1, 3, 3, 3, 4, 5, 203, 0]
    assert K.ref_quantize_act(x, sx, torch.zeros(1), -128, 127).tolist() == [-2, 0, 0, 0, 1, 2, 127, -128]


def test_prepare_weight_and_grid_errors():
    with pytest.raises(ValueError, match="integers"):
        K.prepare_weight(torch.full((2, 3), 0.5), torch.zeros(2), 128)
    with pytest.raises(ValueError, match="outside"):
        K.prepare_weight(torch.full((2, 3), 256.0), torch.zeros(2), 128)
    with pytest.raises(ValueError, match="outside"):
        K.prepare_weight(torch.full((2, 3), -1.0), torch.zeros(2), 128)
    with pytest.raises(ValueError, match="elements"):
        K.prepare_weight(torch.zeros(2, 3), torch.zeros(3), 128)
    with pytest.raises(ValueError, match="8 bits"):
        K.offset_for(0, 511)
    assert K.offset_for(0, 255) == 128 and K.offset_for(-128, 127) == 0


@pytest.mark.skipif(HAS_KERNELS, reason="checks the error raised where the kernels cannot run")
def test_unavailable_raises_clearly():
    assert not K.available()
    with pytest.raises(RuntimeError, match="CUDA"):
        K.quantize_act(torch.randn(4, 8), torch.ones(1), torch.zeros(1), 0, 255)
    with pytest.raises(RuntimeError, match="CUDA"):
        K.int8_linear(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(1),
                      torch.zeros(1), torch.ones(3), torch.zeros(3, dtype=torch.int32),
                      torch.zeros(3, dtype=torch.int32))


# ------------------------------------------------------------------------------------- kernels

def _dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _tol(dtype):
    return {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


@needs_kernels
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_act_matches_reference(grid, dtype):
    gen = torch.Generator().manual_seed(2)
    qmin, qmax = GRIDS[grid]
    x = (torch.randn(3, 5, 37, generator=gen) * 3).to(dtype)
    x.view(-1)[:8] = torch.tensor([0.5, 1.5, -0.5, 2.5, 0.0, -1e6, 1e6, 0.25]).to(dtype)  # ties, clamps
    sx = torch.tensor([0.5 if dtype == torch.float32 else 0.03])
    zx = torch.tensor([17.0]) if grid == "unsigned" else torch.zeros(1)
    x, sx, zx = _dev(x, sx, zx)
    q, sums = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    ref = K.ref_quantize_act(x, sx, zx, qmin, qmax)
    assert q.dtype == torch.int8 and torch.equal(q, ref)
    assert torch.equal(sums, ref.int().sum(-1))
    # rows wider than one channel block (sums by atomic adds), and codes without sums
    wide = _dev((torch.randn(4, 150, generator=gen) * 3).to(dtype))[0]
    q, sums = K.quantize_act(wide, sx, zx, qmin, qmax, return_sums=True)
    ref = K.ref_quantize_act(wide, sx, zx, qmin, qmax)
    assert torch.equal(q, ref) and torch.equal(sums, ref.int().sum(-1))
    assert torch.equal(K.quantize_act(wide, sx, zx, qmin, qmax), ref)
    # NHWC from an NCHW tensor, contiguous or channels_last
    x4 = (torch.randn(2, 24, 5, 3, generator=gen) * 3).to(dtype).to(DEV)
    for xin in (x4, x4.contiguous(memory_format=torch.channels_last)):
        q4, s4 = K.quantize_act(xin, sx, zx, qmin, qmax, nhwc=True, return_sums=True)
        ref4 = K.ref_quantize_act(x4, sx, zx, qmin, qmax).permute(0, 2, 3, 1)
        assert q4.shape == (2, 5, 3, 24) and q4.is_contiguous() and torch.equal(q4, ref4)
        assert torch.equal(s4, ref4.int().sum(-1))


@needs_kernels
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
def test_quantize_act_into_a_padded_buffer(grid):
    """pad=(ph, pw): the codes of the input padded with real zeros (border = the zero-point's
    code), and the per-pixel sums over the padded pixels."""
    gen = torch.Generator().manual_seed(4)
    qmin, qmax = GRIDS[grid]
    sx, zx = _dev(torch.tensor([0.03]), torch.tensor([17.0]) if grid == "unsigned" else torch.zeros(1))
    # 24 channels: one channel block; 150: three blocks (the last partial), sums by atomic adds
    cases = _dev(*[(torch.randn(2, c, 5, 3, generator=gen) * 3).contiguous(memory_format=torch.channels_last)
                   for c in (24, 150)])
    for x in cases:
        _check_padded_quantize(x, sx, zx, qmin, qmax)
    x = cases[0]
    with pytest.raises(ValueError, match="only used with nhwc"):
        K.quantize_act(x, sx, zx, qmin, qmax, pad=1)
    with pytest.raises(ValueError, match="pad must be"):
        K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, pad=-1)


def _check_padded_quantize(x, sx, zx, qmin, qmax):
    c = x.shape[1]
    for pad in (1, (2, 1), 0):
        ph, pw = (pad, pad) if isinstance(pad, int) else pad
        q, sums = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=pad)
        ref = K.ref_quantize_act(torch.nn.functional.pad(x, (pw, pw, ph, ph)), sx, zx, qmin, qmax)
        ref = ref.permute(0, 2, 3, 1)
        assert q.shape == (2, 5 + 2 * ph, 3 + 2 * pw, c) and torch.equal(q, ref)
        assert torch.equal(sums, ref.int().sum(-1))


@pytest.mark.parametrize("grid", ["unsigned", "signed"])
def test_quantize_act_ops_equals_the_reference_codes_and_sums(grid):
    """The torch-operations quantizer (fused into the graph under torch.compile) gives the
    reference codes and sums bit for bit: rows of a linear input, and a padded NHWC conv input
    (ties to even, clamps, the zero-point's code at the border). Runs on the CPU (no Triton)."""
    gen = torch.Generator().manual_seed(6)
    qmin, qmax = GRIDS[grid]
    sx = torch.tensor([0.03])
    zx = torch.tensor([17.0]) if grid == "unsigned" else torch.zeros(1)
    x = torch.randn(3, 7, 40, generator=gen) * 3
    x.view(-1)[:6] = torch.tensor([0.015, 0.045, -0.015, 1e6, -1e6, 0.0])
    a, sums = K.quantize_act_ops(x, sx, zx, qmin, qmax)
    ref = K.ref_quantize_act(x, sx, zx, qmin, qmax)
    assert torch.equal(a, ref) and torch.equal(sums, ref.int().sum(-1)) and sums.dtype == torch.int32
    x4 = (torch.randn(2, 24, 5, 3, generator=gen) * 3).to(torch.bfloat16)
    a4, s4 = K.quantize_act_ops(x4, sx, zx, qmin, qmax, nhwc=True, pad=(1, 2))
    ref4 = K.ref_quantize_act(torch.nn.functional.pad(x4, (2, 2, 1, 1)), sx, zx, qmin, qmax).permute(0, 2, 3, 1)
    assert a4.shape == (2, 7, 7, 24) and a4.is_contiguous() and torch.equal(a4, ref4)
    assert torch.equal(s4, ref4.int().sum(-1)) and s4.is_contiguous()
    with pytest.raises(ValueError, match="only used with nhwc"):
        K.quantize_act_ops(x, sx, zx, qmin, qmax, pad=1)


LIN_SHAPES = [(1, 1, 1), (37, 45, 70), (130, 200, 333), (154, 64, 128)]


@needs_kernels
@pytest.mark.parametrize("mnk", LIN_SHAPES)
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
@pytest.mark.parametrize("mode", ["int8", "int8+asum", "fused"])
def test_int8_linear_matches_reference(mnk, grid, mode):
    m, n, k = mnk
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    qmin, qmax = GRIDS[grid]
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, n, (n, k), asym_w=(grid == "unsigned"))
    ox = K.offset_for(qmin, qmax)
    x = torch.randn(m, k, generator=gen) * sx * 60 + (zx - ox) * 0.1 * sx
    bias = torch.randn(n, generator=gen) if (m + n) % 2 else None
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, bias, b, cb, bsum, ca = _dev(x, sx, zx, sw, bias, b, cb, bsum, ca)
    a, asum = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    ref = K.ref_linear(a, b, sx, ca, sw, cb, bias)
    for out_dtype, split in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, 3)):
        if mode == "fused":
            out = K.int8_linear(x, b, sx, None, sw, cb, bsum, bias, out_dtype, zx=zx, qmin=qmin, qmax=qmax,
                                split_k=split)
        else:
            out = K.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, out_dtype,
                                asum=asum if mode == "int8+asum" else None, split_k=split)
        assert out.shape == (m, n) and out.dtype == out_dtype
        assert torch.isfinite(out).all()
        err = _rel_err(out, ref)
        assert err < _tol(out_dtype), (mode, out_dtype, split, err)


CONV_CASES = [  # B, H, W, Cin, Cout, k, stride, pad
    (2, 9, 7, 20, 36, 3, 1, 1),
    (1, 10, 11, 64, 70, 3, 2, 1),
    (2, 8, 8, 48, 33, 1, 1, 0),
    (1, 5, 6, 130, 17, 3, 1, 1),
    (1, 6, 5, 128, 40, 3, 1, 1),       # channels a multiple of the K tile: no channel masks
]


@needs_kernels
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
@pytest.mark.parametrize("mode", ["int8", "int8+asum", "fused", "padded"])
def test_int8_conv2d_matches_reference(case, grid, mode):
    bsz, h, w, cin, cout, ks, stride, pad = case
    gen = torch.Generator().manual_seed(h * 100 + cin + cout)
    qmin, qmax = GRIDS[grid]
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, cout, (cout, cin, ks, ks), asym_w=(grid == "unsigned"))
    if grid == "unsigned":
        zx = torch.tensor([190.0])
    ox = K.offset_for(qmin, qmax)
    x = (torch.randn(bsz, cin, h, w, generator=gen) * sx * 50).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=gen) if cin % 2 == 0 else None
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, bias, b, cb, bsum, ca = _dev(x, sx, zx, sw, bias, b, cb, bsum, ca)
    a, psum = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True)
    ref = K.ref_conv2d(a, b, stride, pad, sx, ca, sw, cb, bias)
    for out_dtype, split in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, 3)):
        if mode == "fused":
            out = K.int8_conv2d(x, b, stride, pad, sx, None, sw, cb, bsum, bias, out_dtype,
                                zx=zx, qmin=qmin, qmax=qmax, split_k=split)
        elif mode == "padded":      # the runtime's path: codes written into the padded buffer
            ap, pp = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=pad)
            out = K.int8_conv2d(ap, b, stride, pad, sx, ca, sw, cb, bsum, bias, out_dtype, asum=pp,
                                split_k=split, padded=True)
        else:
            out = K.int8_conv2d(a, b, stride, pad, sx, ca, sw, cb, bsum, bias, out_dtype,
                                asum=psum if mode == "int8+asum" else None, split_k=split)
        assert out.shape == ref.shape and out.dtype == out_dtype
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(out).all()
        err = _rel_err(out, ref)
        assert err < _tol(out_dtype), (mode, out_dtype, split, err)


def _tables(gen, val, sel, n=3):
    """A per-step table of ``n`` entries holding ``val`` (1 element) at ``sel``, other values elsewhere."""
    t = val.repeat(n) * (1 + torch.rand(n, generator=gen)) if val.is_floating_point() else val.repeat(n) + 7
    t[sel] = val[0]
    return t.contiguous()


@needs_kernels
@pytest.mark.parametrize("split", [None, 3])
def test_gemms_read_per_step_tables_at_the_step_index(split):
    """With ``step`` the GEMMs read sx and ca (or zx) from per-step tables at the index held in
    device memory: bit for bit the outputs of the same kernels given the selected scalars."""
    from tfmq.runtime.kernels import ops
    gen = torch.Generator().manual_seed(21)
    qmin, qmax = GRIDS["unsigned"]
    ox = K.offset_for(qmin, qmax)
    sel = 1
    step = torch.tensor(sel, device=DEV)
    # linear: int8 codes with sums, and fused-quantize mode
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 24, (24, 40))
    x = torch.randn(9, 40, generator=gen) * sx * 60
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = (ox - zx).to(torch.int32)
    sx_t, zx_t, ca_t = _tables(gen, sx, sel), _tables(gen, zx, sel), _tables(gen, ca, sel)
    x, sx, zx, sw, b, cb, bsum, ca, sx_t, zx_t, ca_t = _dev(x, sx, zx, sw, b, cb, bsum, ca, sx_t, zx_t, ca_t)
    a, asum = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    want = K.int8_linear(a, b, sx, ca, sw, cb, bsum, None, torch.float32, asum=asum, split_k=split)
    got = K.int8_linear(a, b, sx_t, ca_t, sw, cb, bsum, None, torch.float32, asum=asum, split_k=split, step=step)
    assert torch.equal(got, want)
    assert torch.equal(ops.int8_linear(a, b, sx_t, ca_t, sw, cb, bsum, None, torch.float32, asum, step), want)
    want = K.int8_linear(x, b, sx, None, sw, cb, bsum, None, torch.float32, zx=zx, qmin=qmin, qmax=qmax,
                         split_k=split)
    got = K.int8_linear(x, b, sx_t, None, sw, cb, bsum, None, torch.float32, zx=zx_t, qmin=qmin, qmax=qmax,
                        split_k=split, step=step)
    assert torch.equal(got, want)
    # padded conv (the runtime's path)
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 20, (20, 16, 3, 3))
    x = (torch.randn(2, 16, 6, 5, generator=gen) * sx * 50).contiguous(memory_format=torch.channels_last)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = (ox - zx).to(torch.int32)
    sx_t, ca_t = _tables(gen, sx, sel), _tables(gen, ca, sel)
    x, sx, zx, sw, b, cb, bsum, ca, sx_t, ca_t = _dev(x, sx, zx, sw, b, cb, bsum, ca, sx_t, ca_t)
    ap, pp = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=1)
    want = K.int8_conv2d(ap, b, 1, 1, sx, ca, sw, cb, bsum, None, torch.float32, asum=pp, padded=True,
                         split_k=split)
    got = K.int8_conv2d(ap, b, 1, 1, sx_t, ca_t, sw, cb, bsum, None, torch.float32, asum=pp, padded=True,
                        split_k=split, step=step)
    assert torch.equal(got, want)
    if split is None:
        args = (ap, b, (1, 1), (1, 1), sx_t, ca_t, sw, cb, bsum, None, torch.float32, pp, step)
        assert torch.equal(ops.int8_conv2d_padded(*args), want)
        torch.library.opcheck(ops.int8_conv2d_padded, args)


@needs_kernels
def test_w8a8_layers_follow_the_step_index(monkeypatch):
    """A W8A8 conv and linear with three per-step activation parameter sets (scales 2x apart):
    at every step the w8a8 backend (the GEMM reading the tables at the step index), eager and
    captured as one graph, computes what the reference backend computes with that step's set."""
    from tfmq.runtime.backends import BACKENDS, W8A8Backend
    from tfmq.runtime.layers import ActQuant, QuantizedConv2d, QuantizedLinear
    from tfmq.runtime.packed import PackedWeight
    from tfmq.runtime.steps import StepIndex

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    gen = torch.Generator().manual_seed(3)
    steps = StepIndex([750, 500, 250], {"name": "ddim", "steps": 3}).to(DEV)

    def layer(cls, shape, **kw):
        codes = torch.randint(0, 256, shape, generator=gen)
        w = PackedWeight(codes.to(torch.uint8), torch.rand(shape[0], generator=gen) * 0.01 + 0.001,
                         torch.randint(100, 156, (shape[0],), generator=gen).float(), shape, 8, 0)
        act = ActQuant(torch.tensor([0.02, 0.04, 0.08]), torch.tensor([120.0, 128.0, 140.0]), 8, False, steps)
        return cls(w, torch.randn(shape[0], generator=gen), act, **kw).to(DEV)
    conv = layer(QuantizedConv2d, (20, 16, 3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    lin = layer(QuantizedLinear, (24, 40))
    xc = (torch.randn(2, 16, 6, 5, generator=gen) * 2).to(DEV).contiguous(memory_format=torch.channels_last)
    xl = (torch.randn(3, 9, 40, generator=gen) * 2).to(DEV)
    for m in (conv, lin):
        BACKENDS["w8a8"].prepare(m)
    graphed = [torch.compile(lambda x, m=m: BACKENDS["w8a8"].run(m, x), backend="eager", fullgraph=True)
               for m in (conv, lin)]
    for s in range(3):
        steps.set(s)
        for m, x, g in zip((conv, lin), (xc, xl), graphed):
            ref = BACKENDS["reference"].run(m, x).double()
            for out in (BACKENDS["w8a8"].run(m, x), g(x)):
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                assert err < 1e-4, (m.kind, s, err)


@needs_kernels
def test_custom_ops_equal_the_kernels_and_compile_opaquely():
    """tfmq::int8_linear / tfmq::int8_conv2d_padded (what compiled graphs call): the same outputs
    as the functions, fake implementations that agree with the real ones (torch.library.opcheck:
    schema, fake shapes / strides / dtypes, dynamic shapes), and a fullgraph compile of quantize +
    GEMM that computes what eager mode does."""
    from tfmq.runtime.kernels import ops
    gen = torch.Generator().manual_seed(11)
    qmin, qmax = GRIDS["unsigned"]
    ox = K.offset_for(qmin, qmax)
    # linear, a 3-d input as attention projections have
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 24, (24, 40))
    x = torch.randn(2, 9, 40, generator=gen) * sx * 60
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    bias = torch.randn(24, generator=gen)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, bias, b, cb, bsum, ca = _dev(x, sx, zx, sw, bias, b, cb, bsum, ca)
    a, asum = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    want = K.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, torch.float32, asum=asum)
    args = (a, b, sx, ca, sw, cb, bsum, bias, torch.float32, asum)
    assert torch.equal(ops.int8_linear(*args), want)
    torch.library.opcheck(ops.int8_linear, args)

    def lin(x):
        a, s = K.quantize_act_ops(x, sx, zx, qmin, qmax)
        return ops.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, torch.float32, s)
    assert torch.equal(torch.compile(lin, backend="aot_eager", fullgraph=True)(x), want)
    # padded conv, stride 2
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 20, (20, 16, 3, 3))
    x = (torch.randn(2, 16, 7, 6, generator=gen) * sx * 50).contiguous(memory_format=torch.channels_last)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, b, cb, bsum, ca = _dev(x, sx, zx, sw, b, cb, bsum, ca)
    ap, pp = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=1)
    want = K.int8_conv2d(ap, b, 2, 1, sx, ca, sw, cb, bsum, None, torch.float32, asum=pp, padded=True)
    args = (ap, b, (2, 2), (1, 1), sx, ca, sw, cb, bsum, None, torch.float32, pp)
    got = ops.int8_conv2d_padded(*args)
    assert torch.equal(got, want) and got.stride() == want.stride()
    torch.library.opcheck(ops.int8_conv2d_padded, args)

    def conv(x):
        a, s = K.quantize_act_ops(x, sx, zx, qmin, qmax, nhwc=True, pad=1)
        return ops.int8_conv2d_padded(a, b, (2, 2), (1, 1), sx, ca, sw, cb, bsum, None, torch.float32, s)
    assert torch.equal(torch.compile(conv, backend="aot_eager", fullgraph=True)(x), want)


@needs_kernels
@pytest.mark.parametrize("weight_symmetric", [False, True])
def test_w8a8_denoiser_compiles_fullgraph_around_the_custom_ops(tmp_path, monkeypatch, weight_symmetric):
    """A whole W8A8 denoiser (every layer int8) under torch.compile(fullgraph=True): the GEMMs are
    the custom operators and the quantizers torch operations in one captured graph; the output
    equals the eager w8a8 call's (same codes, same kernels). With symmetric weights no layer keeps
    a ``cb`` table (its GEMMs take no activation sums) and the call stays within 1e-5 of the
    reference backend's."""
    import tfmq
    from conftest import tiny_ddpm_pipeline
    from tfmq.runtime import backend_summary, runtime_layers
    from tfmq.runtime.backends import BACKENDS, W8A8Backend

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    pipe = tiny_ddpm_pipeline()
    config = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, layer_policy="all", calib_size=2,
                                         sampler=tfmq.SamplerConfig("ddim", 4), weight_symmetric=weight_symmetric)
    tfmq.quantize(pipe, config, progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    unet = tfmq.load(ckpt, DEV, backend="w8a8").unet
    summary = backend_summary(unet)
    assert summary["reference_math"] == 0 and summary["backend_kernels"] == summary["layers"], summary
    cbs = [cb for layer in runtime_layers(unet).values() for _, cb, _ in layer.prepared["parts"]]
    assert all((cb is None) == weight_symmetric for cb in cbs), weight_symmetric
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(DEV)
    t = torch.full((1,), 500, device=DEV)
    with torch.no_grad():
        eager = unet(x, t).sample
        if weight_symmetric:          # layer by layer on the reference model's inputs (the whole
            ref_unet = tfmq.load(ckpt, DEV).unet  # model would compound single-code flips)
            seen = {}
            hooks = [m.register_forward_pre_hook(lambda m, args, n=n: seen.setdefault(n, args[0]))
                     for n, m in runtime_layers(ref_unet).items()]
            ref_unet(x, t)
            for h in hooks:
                h.remove()
            w8 = runtime_layers(unet)
            for n, layer in runtime_layers(ref_unet).items():
                want = BACKENDS["reference"].run(layer, seen[n]).double()
                err = float((BACKENDS["w8a8"].run(w8[n], seen[n]).double() - want).abs().max() / want.abs().max())
                assert err < 1e-4, (n, err)
        # Dynamo's graph capture without AOT tracing (the ops' fakes are checked above): one graph,
        # no break, run as captured
        unet.forward = torch.compile(unet.forward, backend="eager", fullgraph=True)
        compiled = unet(x, t).sample
    assert torch.isfinite(eager).all()
    assert float((compiled - eager).abs().max()) <= 1e-5 * float(eager.abs().max())


@needs_kernels
@pytest.mark.parametrize("grid", ["unsigned", "signed"])
def test_symmetric_weights_need_no_activation_sums(grid):
    """Symmetric weight codes (zero-points 0, so ``cb = 0``) with ``cb=None``: the GEMMs form and
    read no activation sums and give, bit for bit, what the same kernels give with ``cb`` zeros and
    the sums; every mode (int8 codes, fused quantize, padded conv, split-K) and the custom
    operators, eager and compiled (the quantizer then elementwise only)."""
    from tfmq.runtime.kernels import ops
    gen = torch.Generator().manual_seed(31)
    qmin, qmax = GRIDS[grid]
    ox = K.offset_for(qmin, qmax)
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 36, (36, 70), asym_w=False)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    assert not cb.any()
    x = torch.randn(2, 9, 70, generator=gen) * sx * 60
    bias = torch.randn(36, generator=gen)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, bias, b, cb, bsum, ca = _dev(x, sx, zx, sw, bias, b, cb, bsum, ca)
    a, asum = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    assert torch.equal(K.quantize_act_ops(x, sx, zx, qmin, qmax, return_sums=False), a)
    ref = K.ref_linear(a, b, sx, ca, sw, None, bias)
    for split in (None, 3):
        want = K.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, torch.float32, asum=asum, split_k=split)
        got = K.int8_linear(a, b, sx, ca, sw, None, bsum, bias, torch.float32, split_k=split)
        assert torch.equal(got, want) and _rel_err(got, ref) < _tol(torch.float32)
        fused = K.int8_linear(x, b, sx, None, sw, None, bsum, bias, torch.float32, zx=zx, qmin=qmin, qmax=qmax,
                              split_k=split)
        assert torch.equal(fused, want)
    args = (a, b, sx, ca, sw, None, bsum, bias, torch.float32, None)
    assert torch.equal(ops.int8_linear(*args), want)
    torch.library.opcheck(ops.int8_linear, args)

    def lin(x):
        return ops.int8_linear(K.quantize_act_ops(x, sx, zx, qmin, qmax, return_sums=False), b, sx, ca, sw, None,
                               bsum, bias, torch.float32, None)
    assert torch.equal(torch.compile(lin, backend="aot_eager", fullgraph=True)(x), want)
    with pytest.raises(ValueError, match="asum is only used with cb"):
        K.int8_linear(a, b, sx, ca, sw, None, bsum, bias, torch.float32, asum=asum)
    # convolutions: 3x3 stride 2 (padded, unpadded, fused) and 1x1
    for ks, stride, pad in ((3, 2, 1), (1, 1, 0)):
        sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 20, (20, 16, ks, ks), asym_w=False)
        if grid == "unsigned":
            zx = torch.tensor([190.0])      # far from the offset: a wrong padding code would show
        b, cb, bsum = K.prepare_weight(wq, zw, ow)
        x = (torch.randn(2, 16, 7, 6, generator=gen) * sx * 50).contiguous(memory_format=torch.channels_last)
        ca = torch.tensor([float(ox)]) - zx
        x, sx, zx, sw, b, cb, bsum, ca = _dev(x, sx, zx, sw, b, cb, bsum, ca)
        ap, pp = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=pad)
        assert torch.equal(K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, pad=pad), ap)
        a, _ = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True)
        ref = K.ref_conv2d(a, b, stride, pad, sx, ca, sw, None, None)
        for split in (None, 3):
            want = K.int8_conv2d(ap, b, stride, pad, sx, ca, sw, cb, bsum, None, torch.float32, asum=pp,
                                 padded=True, split_k=split)
            assert _rel_err(want, ref) < _tol(torch.float32)
            for got in (K.int8_conv2d(ap, b, stride, pad, sx, ca, sw, None, bsum, None, torch.float32, padded=True,
                                      split_k=split),
                        K.int8_conv2d(a, b, stride, pad, sx, ca, sw, None, bsum, None, torch.float32, split_k=split),
                        K.int8_conv2d(x, b, stride, pad, sx, None, sw, None, bsum, None, torch.float32, zx=zx,
                                      qmin=qmin, qmax=qmax, split_k=split)):
                assert torch.equal(got, want)
        args = (ap, b, (stride, stride), (pad, pad), sx, ca, sw, None, bsum, None, torch.float32, None)
        assert torch.equal(ops.int8_conv2d_padded(*args), want)
        torch.library.opcheck(ops.int8_conv2d_padded, args)


@needs_kernels
@pytest.mark.parametrize("model", ["ddpm-self-attention", "sd-cross-attention"])
def test_fused_attention_projections_equal_the_separate_ones(tmp_path, monkeypatch, model):
    """Projections of one input with one calibrated input grid (q/k/v of a self-attention, k/v of
    a cross-attention) run as one W8A8 GEMM: the denoiser's output equals, bit for bit, the one
    with every projection on its own GEMM, eager and compiled; switching backends drops them."""
    import tfmq
    from conftest import tiny_ddpm_pipeline, tiny_sd_pipeline
    from tfmq.models.adapter import get_denoiser
    from tfmq.runtime import backend_summary, set_backend
    from tfmq.runtime.backends import W8A8Backend

    if INTERPRET:
        monkeypatch.setattr(W8A8Backend, "available", lambda self, device: None)
    kw = {}
    if model.startswith("sd"):
        (tmp_path / "tok").mkdir()
        pipe = tiny_sd_pipeline(tmp_path / "tok")
        kw = {"prompts": ["a photo"]}
    else:
        pipe = tiny_ddpm_pipeline()
    config = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, layer_policy="all", calib_size=2,
                                         sampler=tfmq.SamplerConfig("ddim", 2), weight_symmetric=True, **kw)
    tfmq.quantize(pipe, config, progress=False)
    den = get_denoiser(tfmq.load(tfmq.save(pipe, tmp_path / "ckpt"), DEV, backend="w8a8"))
    groups = backend_summary(den)["fused_projection_groups"]
    kinds = {m._tfmq_fused.kind for m in den.modules() if getattr(m, "_tfmq_fused", None) is not None}
    assert groups > 0 and kinds == ({"qkv", "kv"} if model.startswith("sd") else {"qkv"}), (groups, kinds)
    gen = torch.Generator().manual_seed(2)
    c = den.config
    args = [torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=gen).to(DEV),
            torch.full((2,), 500, device=DEV)]
    if model.startswith("sd"):
        args.append(torch.randn(2, 5, c.cross_attention_dim, generator=gen).to(DEV))
    with torch.no_grad():
        fused = den(*args).sample
        compiled = torch.compile(den.forward, backend="eager", fullgraph=True)(*args).sample
        monkeypatch.setattr(W8A8Backend, "fuse_projections", False)
        set_backend(den, "w8a8")
        assert backend_summary(den)["fused_projection_groups"] == 0
        separate = den(*args).sample
    assert torch.equal(fused, separate) and torch.equal(compiled, separate)
    monkeypatch.setattr(W8A8Backend, "fuse_projections", True)
    set_backend(den, "w8a8")
    assert backend_summary(den)["fused_projection_groups"] == groups
    set_backend(den, "reference")
    assert backend_summary(den)["fused_projection_groups"] == 0


@needs_kernels
def test_int8_kernels_reject_bad_input():
    a = torch.zeros(4, 16, dtype=torch.int8, device=DEV)
    w = torch.zeros(8, 16, dtype=torch.int8, device=DEV)
    one = torch.ones(1, device=DEV)
    sw = torch.ones(8, device=DEV)
    i8 = torch.zeros(8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="shape mismatch"):
        K.int8_linear(a, w[:, :8].contiguous(), one, one, sw, i8, i8)
    with pytest.raises(ValueError, match="cb"):
        K.int8_linear(a, w, one, one, sw, i8.float(), i8)
    with pytest.raises(ValueError, match="1-element"):
        K.int8_linear(a, w, sw, one, sw, i8, i8)
    with pytest.raises(ValueError, match="int8"):
        K.int8_linear(a.float(), w, one, one, sw, i8, i8)
    with pytest.raises(ValueError, match="split_k"):
        K.int8_linear(a, w, one, one, sw, i8, i8, split_k=0)
    with pytest.raises(ValueError, match="padded=True takes"):      # padded mode needs the sums
        K.int8_conv2d(a.view(1, 2, 2, 16), w.view(8, 1, 1, 16), 1, 0, one, one, sw, i8, i8, padded=True)
    with pytest.raises(ValueError, match="smaller than its padding"):
        K.int8_conv2d(a.view(1, 2, 2, 16), w.view(8, 1, 1, 16), 1, 1, one, one, sw, i8, i8,
                      asum=torch.zeros(1, 2, 2, dtype=torch.int32, device=DEV), padded=True)
    with pytest.raises(ValueError, match="step must be"):               # a float step index
        K.int8_linear(a, w, one, one, sw, i8, i8, step=torch.zeros((), device=DEV))
    with pytest.raises(ValueError, match="differ in length"):          # tables of unequal length
        K.int8_linear(a, w, torch.ones(3, device=DEV), one, sw, i8, i8,
                      step=torch.zeros((), dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="1-d table"):
        K.int8_linear(a, w, torch.ones(1, 3, device=DEV), one, sw, i8, i8,
                      step=torch.zeros((), dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="NHWC"):
        K.int8_conv2d(a.view(1, 2, 2, 16).permute(0, 3, 1, 2), w.view(8, 1, 1, 16), 1, 0, one, one, sw, i8, i8)


@needs_cuda
def test_int8_conv2d_cuda_graph_replay():
    gen = torch.Generator().manual_seed(5)
    qmin, qmax = 0, 255
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 40, (40, 32, 3, 3))
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    bias = torch.randn(40, generator=gen)
    x = (torch.randn(2, 32, 12, 12, generator=gen) * 2).contiguous(memory_format=torch.channels_last)
    x, sx, zx, sw, bias, b, cb, bsum = _dev(x, sx, zx, sw, bias, b, cb, bsum)
    ca = 128 - zx

    def step():
        a, psum = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True)
        return K.int8_conv2d(a, b, 2, 1, sx, ca, sw, cb, bsum, bias, torch.bfloat16, asum=psum)

    step()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    # new inputs and new step-dependent scale / zero-point, written in place
    x.copy_(torch.randn(x.shape, generator=gen).to(DEV) * 3)
    sx.fill_(0.07)
    zx.fill_(100.0)
    ca.copy_(128 - zx)
    g.replay()
    torch.cuda.synchronize()
    eager = step()
    assert torch.equal(out, eager)
    a = K.ref_quantize_act(x, sx, zx, qmin, qmax).permute(0, 2, 3, 1)
    assert _rel_err(out, K.ref_conv2d(a, b, 2, 1, sx, ca, sw, cb, bias)) < 8e-3


@needs_kernels
def test_autotune_drops_only_tiles_wider_than_the_problem():
    """The GEMM autotuner's pruning: a 64-channel convolution keeps the BLOCK_N = 64 tiles whose K
    block fits 64 input channels; SD-sized linears keep every tile; a tiny problem keeps one."""
    from tfmq.runtime.kernels import _int8_triton as T
    configs = T._configs()

    def kept(**shape):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in T._prune(configs, shape)}
    every = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}
    small = kept(Bsz=250, CIN=64, N=64)
    assert small and all(bn == 64 and bk <= 64 for _, bn, bk in small), small
    assert small == {t for t in every if t[1] == 64 and t[2] <= 64}
    assert kept(M=8192, N=320, K=320) == every
    assert len(kept(CIN=4, N=4)) == 1 and kept(M=128, N=1280, K=1280) == {t for t in every if t[0] <= 128}


@needs_cuda
@pytest.mark.cuda
def test_autotuned_kernels_match_the_reference(monkeypatch):
    """With Triton's autotuner on (the default; other tests may run with TFMQ_INT8_AUTOTUNE=0):
    a pruned shape (64 channels in and out, as the bundled model's convolutions) and an SD-sized
    linear compute what the references compute."""
    monkeypatch.setenv("TFMQ_INT8_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(8)
    qmin, qmax = GRIDS["unsigned"]
    ox = K.offset_for(qmin, qmax)
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 64, (64, 64, 3, 3))
    x = (torch.randn(4, 64, 16, 16, generator=gen) * sx * 60).contiguous(memory_format=torch.channels_last)
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, b, cb, bsum, ca = _dev(x, sx, zx, sw, b, cb, bsum, ca)
    ap, pp = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True, return_sums=True, pad=1)
    out = K.int8_conv2d(ap, b, 1, 1, sx, ca, sw, cb, bsum, None, torch.float32, asum=pp, padded=True)
    a = K.quantize_act(x, sx, zx, qmin, qmax, nhwc=True)
    ref = K.ref_conv2d(a, b, 1, 1, sx, ca, sw, cb, None)
    assert _rel_err(out, ref) < _tol(torch.float32)
    sx, zx, wq, zw, ow, sw = _problem(gen, qmin, qmax, 320, (320, 320))
    x = torch.randn(4096, 320, generator=gen) * sx * 60
    b, cb, bsum = K.prepare_weight(wq, zw, ow)
    ca = torch.tensor([float(ox)]) - zx
    x, sx, zx, sw, b, cb, bsum, ca = _dev(x, sx, zx, sw, b, cb, bsum, ca)
    a, asum = K.quantize_act(x, sx, zx, qmin, qmax, return_sums=True)
    out = K.int8_linear(a, b, sx, ca, sw, cb, bsum, None, torch.bfloat16, asum=asum)
    assert _rel_err(out, K.ref_linear(a, b, sx, ca, sw, cb, None)) < _tol(torch.bfloat16)
