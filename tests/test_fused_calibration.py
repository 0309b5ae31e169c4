"""The fused CUDA paths of the calibration loops compute what the torch reference computes.

* AdaRound's soft weight and regulariser (tfmq.quant.fused, Triton): forward values and
  gradients against the torch code (``fused_kernels(False)``) on the same device;
* the loops' Adam on CUDA (torch's fused, capturable Adam) against the CPU update written out in
  tfmq.calib.loop;
* the activation fake-quant (tfmq.quant.fused.fake_quant) forward and gradients (input and scale).

All need a GPU (marked ``cuda``; run on the GPU machine by hand). Random tensors: numerics only.
"""

import pytest
import torch
from test_adaround import output_error, worked_example

from tfmq.calib.loop import Adam
from tfmq.calib.reconstruction import optimize_rounding
from tfmq.quant.adaround import AdaRound
from tfmq.quant.fused import fused_kernels
from tfmq.quant.quantizer import UniformQuantizer, init_range

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rounding(shape, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).cuda()
    q = UniformQuantizer(bits, channel_axis=0).cuda()
    init_range(q, w, "minmax")
    r = AdaRound(w, q).cuda()
    with torch.no_grad():       # spread alpha over the sigmoid's clamped and unclamped parts
        r.alpha.add_(torch.randn(r.alpha.shape, generator=g).cuda() * 3)
    return w, q, r


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (40, 33), (7, 1, 1, 1)])
def test_fused_soft_weight_and_regulariser_match_torch(shape):
    w, q, r = _rounding(shape)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(shape, generator=g).cuda()
    out = {}
    for fused in (False, True):
        with fused_kernels(fused), r.fixed_grid(w, q):
            r.alpha.grad = None
            r.alpha.requires_grad_(True)
            soft = r(w, q)
            beta = torch.tensor(7.5, device="cuda")
            reg = r.regularizer(beta)
            (soft * upstream).sum().backward(retain_graph=True)
            g_soft = r.alpha.grad.clone()
            r.alpha.grad = None
            (3.0 * reg).backward()
            out[fused] = (soft.detach(), reg.detach(), g_soft, r.alpha.grad.clone())
    (s0, r0, gs0, gr0), (s1, r1, gs1, gr1) = out[False], out[True]
    assert torch.allclose(s1, s0, rtol=1e-6, atol=1e-6)
    assert torch.allclose(r1, r0, rtol=1e-5)
    assert torch.allclose(gs1, gs0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gr1, gr0, rtol=1e-4, atol=1e-6)
    assert (gs0 != 0).any() and (gs0 == 0).any()        # both sides of the clamps were exercised


def test_fused_adaround_loop_matches_torch_loop():
    res = {}
    for fused in (False, True):
        layer, x = worked_example(3, k=64, out=16)
        layer, x = layer.cuda(), x.cuda()
        with fused_kernels(fused):
            stats = optimize_rounding([layer], lambda it: output_error(layer, x), 400, lr=2e-2,
                                      reg_weight=1.0, progress=False, graphs=True)
        res[fused] = (layer.rounding.alpha.detach().clone(), stats)
    (a0, s0), (a1, s1) = res[False], res[True]
    assert s1["loop"] == "graph"
    assert (a0 >= 0).eq(a1 >= 0).float().mean() > 0.99
    assert s1["final_loss"] == pytest.approx(s0["final_loss"], rel=1e-2)


def test_cuda_adam_matches_the_cpu_update():
    g = torch.Generator().manual_seed(0)
    p_cpu = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in p_cpu] for _ in range(30)]
    p_gpu = [p.clone().cuda() for p in p_cpu]
    a_cpu, a_gpu = Adam(p_cpu), Adam(p_gpu)
    assert a_gpu.fused is not None and a_cpu.fused is None
    lrs = torch.linspace(1e-2, 1e-3, 30, dtype=torch.float64)
    for i in range(30):
        a_cpu.step(grads[i], lrs[i])
        a_gpu.step([t.cuda() for t in grads[i]], lrs[i].cuda())
    for c, d in zip(p_cpu, p_gpu):
        assert torch.allclose(d.cpu(), c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, True)])
def test_fused_fake_quant_matches_torch(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(4, 8, 9, 9, generator=g) * 3).cuda()
    q = UniformQuantizer(bits, symmetric).cuda()
    init_range(q, x * 0.6, "minmax")            # part of x falls outside the grid
    upstream = torch.randn(x.shape, generator=g).cuda()
    out = {}
    for fused in (False, True):
        xi = x.clone().requires_grad_(True)
        q.scale.requires_grad_(True)
        q.scale.grad = None
        with fused_kernels(fused):
            y = q(xi)
        (y * upstream).sum().backward()
        out[fused] = (y.detach(), xi.grad.clone(), q.scale.grad.clone())
        q.scale.requires_grad_(False)
    (y0, gx0, gs0), (y1, gx1, gs1) = out[False], out[True]
    assert torch.equal(y1, y0)                          # the forward is the torch expression
    assert torch.allclose(gx1, gx0, rtol=1e-6, atol=1e-7)
    assert torch.allclose(gs1, gs0, rtol=1e-4, atol=1e-5)
    assert (gx0 == 0).any() and (gx0 != 0).any()        # values inside and outside the grid


def test_fused_act_step_loop_matches_torch_loop():
    from test_fast_loop import _act_problem
    from tfmq.calib.act_learning import learn_act_steps
    from tfmq.calib.reconstruction import recon_loss
    res = {}
    for fused in (False, True):
        layer, q, x, target = _act_problem(5)
        layer, x, target = layer.cuda(), x.cuda(), target.cuda()
        with fused_kernels(fused):
            stats = learn_act_steps([q], lambda it: recon_loss(layer(x), target, 2.4), 200, 5e-3,
                                    progress=False, graphs=True)
        res[fused] = (q.scale.detach().clone(), stats)
    assert res[True][1]["loop"] == "graph"
    assert torch.allclose(res[True][0], res[False][0], rtol=1e-4)
