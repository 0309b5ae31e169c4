"""Calling a compiled denoiser without re-evaluating Dynamo's guards (tfmq/runtime/guards.py), and
the runtime's tensors kept as frozen parameters (which keeps that cheap)."""

import pytest
import torch
from torch import nn

import tfmq
from conftest import tiny_ddpm_pipeline
from tfmq.runtime.backends import BACKENDS
from tfmq.runtime.guards import CAN_SKIP_GUARDS, SkipGuardsAfterFirstCall, call_signature
from tfmq.runtime.layers import runtime_layers
from test_runtime import CONFIGS

pytestmark = pytest.mark.skipif(not CAN_SKIP_GUARDS, reason="this PyTorch has no skip_guard_eval_unsafe")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.gain = 2.0                         # a Python attribute: Dynamo guards on its value

    def forward(self, x):
        return (x @ self.w) * self.gain


def _compiled(module, skip):
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    fn = torch.compile(module.forward, backend=counter, fullgraph=True)
    return (SkipGuardsAfterFirstCall(fn) if skip else fn), counter


def test_a_seen_signature_skips_the_guard_check():
    """The second call of a signature skips the guards: a change of a guarded attribute (which the
    docstring forbids) is not noticed, where the plain compiled function recompiles. Outputs of
    the allowed calls equal eager."""
    torch._dynamo.reset()
    m = Scaled()
    x = torch.randn(3, 4)
    fn, counter = _compiled(m, skip=True)
    torch.testing.assert_close(fn(x), m.forward(x))
    torch.testing.assert_close(fn(x + 1), m.forward(x + 1))      # same signature, new values
    assert (fn.skipped, counter.frame_count) == (1, 1)
    m.gain = 3.0
    fn(x)
    assert counter.frame_count == 1                 # not re-checked: the model must not change
    torch._dynamo.reset()
    m = Scaled()
    plain, counter = _compiled(m, skip=False)
    plain(x)
    m.gain = 3.0
    torch.testing.assert_close(plain(x), m.forward(x))
    assert counter.frame_count == 2


def test_a_new_signature_runs_with_the_full_check():
    """A new shape, dtype, memory layout or grad mode is a new signature: its first call is
    checked (and compiled where it must), and gives eager's result."""
    torch._dynamo.reset()
    m = Scaled()
    fn, counter = _compiled(m, skip=True)
    x = torch.randn(3, 4)
    fn(x)
    for y in (torch.randn(5, 4), torch.randn(4, 3).t()):
        torch.testing.assert_close(fn(y), m.forward(y))
    with torch.no_grad():
        torch.testing.assert_close(fn(x), m.forward(x))
    assert fn.skipped == 0
    assert len(fn.seen) == 4
    assert counter.frame_count >= 2                 # at least the new shape compiled


def test_call_signature():
    x = torch.randn(2, 3)
    assert call_signature((x,), {"t": 1}) == call_signature((torch.zeros(2, 3),), {"t": 1})
    assert call_signature((x,), {"t": 1}) != call_signature((x,), {"t": 2})
    assert call_signature((x,), {}) != call_signature((x.double(),), {})
    assert call_signature((x,), {}) != call_signature((x.t().contiguous().t(),), {})
    with_grad = call_signature((x,), {})
    with torch.no_grad():
        assert call_signature((x,), {}) != with_grad
    assert call_signature((x, object()), {}) is None            # unknown kinds: always checked


def test_per_step_denoiser_follows_the_step_index_without_guard_checks(tmp_path):
    """A tfmq checkpoint with per-step activation parameters, compiled (aot_eager: no C++ compiler
    needed) and called through SkipGuardsAfterFirstCall: every sampling step after the first
    skips the guard check and still equals eager mode at that step (the step index is data the
    graph reads, not a guarded attribute)."""
    torch._dynamo.reset()
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, CONFIGS["tfmq-fsc-all"](), progress=False)
    unet = tfmq.load(tfmq.save(pipe, tmp_path / "ckpt")).unet
    assert any(layer.act is not None and getattr(layer.act, "n_sets", 1) > 1
               for layer in runtime_layers(unet).values())
    assert_compiled_follows_the_steps(unet)


def assert_compiled_follows_the_steps(unet):
    """Compile a loaded tiny-DDPM denoiser's forward (aot_eager: no C++ compiler needed) behind
    SkipGuardsAfterFirstCall and call it at every calibrated timestep in order: each call equals
    eager mode at that step and every call after the first skipped the guard check."""
    ts = unet.tfmq_info["timesteps"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = [unet(x, torch.full((2,), t)).sample for t in ts]
        unet.tfmq_steps.reset()
        unet.forward = SkipGuardsAfterFirstCall(torch.compile(unet.forward, backend="aot_eager", fullgraph=True))
        for t, want in zip(ts, eager):
            torch.testing.assert_close(unet(x, torch.full((2,), t)).sample, want, rtol=0, atol=1e-5)
    assert unet.forward.skipped == len(ts) - 1


def test_runtime_tensors_are_frozen_parameters(tmp_path):
    """Codes, scales and zero points of a loaded checkpoint are parameters without gradients (so
    Dynamo does not check each one per call), and the model's dtype is still the load dtype."""
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, CONFIGS["naive-w4a8"](), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    for dtype in (torch.float32, torch.bfloat16):
        unet = tfmq.load(ckpt, dtype=dtype).unet
        assert unet.dtype == dtype
        layers = runtime_layers(unet)
        assert layers
        for layer in layers.values():
            for part in (layer.qweight, layer.act):
                if part is None:
                    continue
                assert not list(part.buffers())
                for p in part.parameters():
                    assert isinstance(p, nn.Parameter) and not p.requires_grad
    w8 = tfmq.load(tfmq.save(_w8a8_pipe(), tmp_path / "w8")).unet
    prepared = 0
    for layer in runtime_layers(w8).values():        # the w8a8 backend's kernel tables (built on CPU here)
        BACKENDS["w8a8"].prepare(layer)
        for t in [t for v in layer.prepared.values() for item in v
                  for t in (item if isinstance(item, tuple) else (item,)) if t is not None]:
            assert isinstance(t, nn.Parameter) and not t.requires_grad
            prepared += 1
    assert prepared > 0


def _w8a8_pipe():
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, layer_policy="all", calib_size=2,
                                                    sampler=tfmq.SamplerConfig("ddim", 3)), progress=False)
    return pipe
