"""The sync-free, graph-capturable optimisation loop (tfmq.calib.loop) computes what the
one-iteration-at-a-time loops it replaced computed.

The reference loops below are the pre-issue-12 implementations (torch.optim.Adam, a Python
``beta`` per iteration, ``torch.randperm`` per batch, LambdaLR cosine decay), kept here as the
specification. On the CPU the new loop runs eagerly; on CUDA the same step is captured in a CUDA
graph (tests marked ``cuda``). Tiny models have RANDOM weights: machinery, not quality.
"""

import math

import pytest
import torch
from conftest import tiny_ddpm_pipeline
from test_adaround import brute_force_optimum, output_error, worked_example

import tfmq
import tfmq.sampling
from tfmq.calib.act_learning import MIN_SCALE, learn_act_steps
from tfmq.calib.loop import Adam, at, batch_indices, beta_table, cosine_lr_table, use_graphs
from tfmq.calib.reconstruction import (UnitSettings, _unit_loss, attach_rounding, beta_at, capture,
                                       optimize_rounding, prepare_units, recon_loss, unit_output,
                                       _call_args)
from tfmq.quant.layers import QuantLayer
from tfmq.quant.model import quant_state, set_quant_state
from tfmq.quant.quantizer import UniformQuantizer, init_range


pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# ---- the pre-issue-12 loops (the specification) -------------------------------------------------
def reference_rounding(layers, loss_fn, iters, lr, reg_weight=0.01, warmup=0.2, beta=(20.0, 2.0)):
    roundings = attach_rounding(layers)
    opt = torch.optim.Adam([r.alpha for r in roundings], lr=lr)
    losses = []
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        rec = loss_fn(it)
        b = beta_at(it, iters, warmup, beta)
        loss = rec if b is None else rec + reg_weight * sum(r.regularizer(b) for r in roundings)
        loss.backward()
        opt.step()
        losses.append(float(rec.detach()))
    for r in roundings:
        r.hard = True
        r.alpha.requires_grad_(False)
    return losses


def reference_act_steps(quantizers, loss_fn, iters, lr):
    params = [q.scale for q in quantizers]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    losses = []
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(it)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min=MIN_SCALE)
        losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return losses


# ---- the pieces ---------------------------------------------------------------------------------
def test_adam_is_torch_adam_bit_for_bit_with_a_learning_rate_table():
    g = torch.Generator().manual_seed(0)
    shapes = [(300,), (7, 5), (1,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    iters = 120
    opt = torch.optim.Adam(theirs, lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    adam, lrs = Adam(ours), cosine_lr_table(3e-2, iters)
    for it in range(iters):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        opt.step()
        sched.step()
        adam.step(grads, at(lrs, torch.tensor(it)))
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), it


def test_batch_table_is_the_per_iteration_randperm_draws():
    table = batch_indices(50, 8, 30, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    assert table.shape == (30, 8)
    for row in table:
        assert torch.equal(row, torch.randperm(50, generator=g)[:8])
    assert batch_indices(5, 8, 2, torch.Generator()).shape == (2, 5)   # fewer rows than a batch
    assert at(table, torch.tensor(7)).tolist() == table[7].tolist()


def test_beta_table_is_the_schedule():
    on, b = beta_table(100, 0.2, (20.0, 2.0))
    for it in range(100):
        ref = beta_at(it, 100, 0.2, (20.0, 2.0))
        assert float(on[it]) == (0.0 if ref is None else 1.0)
        if ref is not None:
            assert float(b[it]) == pytest.approx(ref, rel=1e-7)


def test_graphs_on_the_cpu_are_refused():
    assert use_graphs(None, torch.device("cpu")) is False
    assert use_graphs(False, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="CUDA"):
        use_graphs(True, torch.device("cpu"))
    layer, x = worked_example(1)
    with pytest.raises(ValueError, match="CUDA"):
        optimize_rounding([layer], lambda it: output_error(layer, x), 5, progress=False, graphs=True)


# ---- AdaRound: the new loop against the old one ------------------------------------------------
@pytest.mark.parametrize("seed, k, out, iters", [(1, 6, 2, 800), (3, 6, 2, 800), (2, 64, 16, 500)])
def test_adaround_loop_matches_the_reference_loop(seed, k, out, iters):
    """Same hard rounding decisions and the same loss curve (the regulariser's exponent is a
    float32 tensor instead of a Python float: the only difference, a few ulps)."""
    layer_ref, x = worked_example(seed, k=k, out=out)
    ref = reference_rounding([layer_ref], lambda it: output_error(layer_ref, x), iters, lr=2e-2, reg_weight=1.0)
    layer, _ = worked_example(seed, k=k, out=out)
    stats = optimize_rounding([layer], lambda it: output_error(layer, x), iters, lr=2e-2, reg_weight=1.0,
                              progress=False)
    assert stats["loop"] == "eager"
    assert torch.equal(layer.rounding.alpha >= 0, layer_ref.rounding.alpha >= 0)
    assert stats["initial_loss"] == ref[0]                               # before any update: exact
    assert stats["final_loss"] == pytest.approx(ref[-1], rel=1e-4)
    assert (layer.rounding.alpha - layer_ref.rounding.alpha).abs().mean() < 1e-3
    if k == 6:                                                           # small enough to brute-force
        assert float(output_error(layer, x).detach()) == pytest.approx(brute_force_optimum(layer, x), rel=1e-5)


def test_without_the_rounding_term_the_loop_is_the_reference_bit_for_bit():
    """With the regulariser switched off (an all-warm-up schedule: the term is multiplied by 0)
    the iterates are the reference loop's exactly: same batches, same Adam, same gradients."""
    layer_ref, x = worked_example(2, k=32, out=8)
    ref = reference_rounding([layer_ref], lambda it: output_error(layer_ref, x), 300, lr=2e-2, reg_weight=1.0,
                             warmup=1.0)
    layer, _ = worked_example(2, k=32, out=8)
    stats = optimize_rounding([layer], lambda it: output_error(layer, x), 300, lr=2e-2, reg_weight=1.0,
                              warmup=1.0, progress=False)
    assert torch.equal(layer.rounding.alpha, layer_ref.rounding.alpha)
    assert stats["final_loss"] == ref[-1]


# ---- a real unit: the batches and losses of run_units -------------------------------------------
def _tiny_unit_setup(iters=6):
    pipe = tiny_ddpm_pipeline()
    cfg = tfmq.QuantConfig.for_method("qdiff", wbits=4, abits=32, layer_policy="all", calib_size=4,
                                      calib_steps=3, sampler=tfmq.sampling.SamplerConfig(steps=6),
                                      recon_iters=iters, act_learn_iters=0, recon_batch_size=8,
                                      calib_batch_size=8)
    captured = {}
    real = tfmq.recipes.STAGES["reconstruct"]

    def grab(ctx):                      # stop before reconstruction; keep the context
        captured["ctx"] = ctx
        raise KeyboardInterrupt
    tfmq.recipes.STAGES["reconstruct"] = grab
    try:
        with pytest.raises(KeyboardInterrupt):
            tfmq.quantize(pipe, cfg, progress=False)
    finally:
        tfmq.recipes.STAGES["reconstruct"] = real
    return captured["ctx"]


def test_unit_loss_draws_the_reference_batches_and_computes_the_reference_loss():
    ctx = _tiny_unit_setup()
    units, rows = prepare_units(ctx)
    unit = next(u for u in units if u.name == "down_blocks.0.resnets.0")
    model = ctx.denoiser
    set_quant_state(model, True, False)
    inputs = capture(model, unit, rows, "input", 1 << 40)
    with quant_state(model, weight=False, act=False):
        targets = capture(model, unit, rows, "output", 1 << 40)
    settings = UnitSettings(iters=6, batch_size=8, lr=1e-3)
    loss_fn, run = _unit_loss(unit, inputs, targets, None, torch.Generator().manual_seed(11), settings, "cpu")
    assert run.graphs is False and run.note is None
    gen = torch.Generator().manual_seed(11)
    for it in range(6):
        idx = torch.randperm(inputs.rows, generator=gen)[:8]              # the old loop's draw
        args, kw = _call_args(inputs.select(idx, "cpu"))
        with torch.no_grad():
            ref = recon_loss(unit_output(unit.module(*args, **kw)), targets.select(idx, "cpu")["out"])
            new = loss_fn(torch.tensor(it))
        assert torch.equal(new, ref), it


def test_reconstruction_is_deterministic_with_a_seed_and_depends_on_it():
    def run(seed):
        pipe = tiny_ddpm_pipeline()
        cfg = tfmq.QuantConfig.for_method("qdiff", wbits=4, abits=8, layer_policy="all", calib_size=4,
                                          calib_steps=3, sampler=tfmq.sampling.SamplerConfig(steps=6),
                                          recon_iters=12, act_learn_iters=6, recon_batch_size=8,
                                          calib_batch_size=8, seed=seed, recon_units=["down_blocks.0.*"])
        tfmq.quantize(pipe, cfg, progress=False)
        return {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    a, b, c = run(0), run(0), run(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- activation step learning: the new loop against the old one ---------------------------------
def _act_problem(seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 16, generator=g))
        lin.bias.copy_(torch.randn(8, generator=g))
    aq = UniformQuantizer(4)
    x = torch.randn(64, 16, generator=g) * 2
    init_range(aq, x, "minmax")
    layer = QuantLayer(lin, None, aq)
    target = lin(x).detach()
    return layer, aq, x, target


def test_act_step_loop_matches_the_reference_loop():
    layer_ref, q_ref, x, target = _act_problem(5)
    ref = reference_act_steps([q_ref], lambda it: recon_loss(layer_ref(x), target, 2.4), 200, 5e-3)
    layer, q, _, _ = _act_problem(5)
    stats = learn_act_steps([q], lambda it: recon_loss(layer(x), target, 2.4), 200, 5e-3, progress=False)
    assert stats["loop"] == "eager" and not q.scale.requires_grad
    assert stats["initial_loss"] == ref[0]
    assert stats["final_loss"] == pytest.approx(ref[-1], rel=1e-5)
    assert torch.allclose(q.scale, q_ref.scale, rtol=1e-5)
    assert ref[-1] < ref[0]                                               # it did learn something


# ---- CUDA: the captured graph computes what the eager loop computes -----------------------------
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_adaround_matches_eager(seed):
    results = {}
    for graphs in (False, True):
        layer, x = worked_example(seed, k=64, out=16)
        layer, x = layer.cuda(), x.cuda()
        stats = optimize_rounding([layer], lambda it: output_error(layer, x), 600, lr=2e-2, reg_weight=1.0,
                                  progress=False, graphs=graphs)
        results[graphs] = (layer.rounding.alpha.detach().clone(), stats)
    (a_e, s_e), (a_g, s_g) = results[False], results[True]
    assert s_e["loop"] == "eager" and s_g["loop"] == "graph"
    assert torch.equal(a_e >= 0, a_g >= 0)
    assert torch.allclose(a_e, a_g, atol=1e-4, rtol=1e-4)
    assert s_g["final_loss"] == pytest.approx(s_e["final_loss"], rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_act_steps_match_eager():
    out = {}
    for graphs in (False, True):
        layer, q, x, target = _act_problem(5)
        layer, x, target = layer.cuda(), x.cuda(), target.cuda()
        stats = learn_act_steps([q], lambda it: recon_loss(layer(x), target, 2.4), 200, 5e-3,
                                progress=False, graphs=graphs)
        out[graphs] = (q.scale.detach().clone(), stats)
    assert out[True][1]["loop"] == "graph"
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_tfmq_run_matches_eager_per_unit():
    """tfmq on the tiny UNet (TIAR, reconstruction with per-row FSC steps in act learning):
    every loop ran as a graph, and per-unit errors agree with the eager run."""
    STEPS = tfmq.sampling.SamplerConfig("ddim", 4)
    infos = {}
    for graphs in (False, True):
        pipe = tiny_ddpm_pipeline().to("cuda")
        cfg = tfmq.QuantConfig.for_method("tfmq", wbits=4, abits=8, calib_size=4, calib_batch_size=4,
                                          sampler=STEPS, fsc="tib", tiar_iters=50, recon_iters=40,
                                          act_learn_iters=20, interval_length=1, recon_cuda_graphs=graphs)
        tfmq.quantize(pipe, cfg, progress=False)
        infos[graphs] = pipe.unet.tfmq_info
    g, e = infos[True], infos[False]
    assert g["temporal"]["optimizer"]["loop"] == "graph"
    assert all(r["loop"] == "graph" for r in g["reconstruction"].values())
    assert all(r["loop"] == "graph" for r in g["act_learning"].values())
    for unit, r in g["reconstruction"].items():
        assert r["error_after"] == pytest.approx(e["reconstruction"][unit]["error_after"], rel=2e-2, abs=1e-6), unit
        assert r["error_after"] < r["error_before"], unit
    assert g["temporal"]["error_tiar"] == pytest.approx(e["temporal"]["error_tiar"], rel=2e-2, abs=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_iterations_are_faster_than_eager(capsys):
    """Not a benchmark: the captured loop must at least beat the eager one on a launch-bound
    unit (prints both)."""
    import time
    times = {}
    for graphs in (False, True, False, True):
        layer, x = worked_example(3, k=256, out=64, rows=32)
        layer, x = layer.cuda(), x.cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimize_rounding([layer], lambda it: output_error(layer, x), 400, progress=False, graphs=graphs)
        torch.cuda.synchronize()
        times[graphs] = time.perf_counter() - t0       # the second of each (warm)
    with capsys.disabled():
        print(f"\n400 AdaRound iterations of one linear: eager {times[False]:.3f} s, graph {times[True]:.3f} s")
    assert times[True] < times[False]
