"""AdaRound: initialisation, a brute-forced worked example, hard == soft at the end, freezing."""

import itertools

import pytest
import torch
from torch import nn

from tfmq.calib.reconstruction import beta_at, optimize_rounding, recon_loss
from tfmq.quant.adaround import AdaRound, pack_mask, rectified_sigmoid, unpack_mask
from tfmq.quant.layers import QuantLayer
from tfmq.quant.quantizer import UniformQuantizer, init_range


pytestmark = pytest.mark.usefixtures("one_thread")


def quant_linear(weight: torch.Tensor, bits: int) -> QuantLayer:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    wq = UniformQuantizer(bits, channel_axis=0)
    with torch.no_grad():
        init_range(wq, lin.weight, "minmax")
    return QuantLayer(lin, wq, None)


def worked_example(seed: int, bits: int = 4, k: int = 6, out: int = 2, rows: int = 128):
    """A linear layer whose inputs are strongly correlated (a shared component plus noise), so
    that rounding each weight to nearest is not optimal for the layer's output."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    x = torch.randn(rows, 1, generator=g) * torch.ones(1, k) + 0.5 * torch.randn(rows, k, generator=g)
    return quant_linear(w, bits), x


def brute_force_optimum(layer: QuantLayer, x: torch.Tensor) -> float:
    """Lowest output error over all 2^k floor / ceil choices of every output channel."""
    wq, w = layer.weight_quantizer, layer.weight.detach()
    s, z = wq.current()
    floor = torch.floor(w / s)
    target = x @ w.T
    combos = torch.tensor(list(itertools.product([0.0, 1.0], repeat=w.shape[1])))
    total = 0.0
    for c in range(w.shape[0]):
        q = torch.clamp(floor[c] + combos + z[c], wq.qmin, wq.qmax)
        err = ((x @ ((q - z[c]) * s[c]).T - target[:, c:c + 1]) ** 2).mean(0)
        total += float(err.min())
    return total


def output_error(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    return recon_loss(x @ layer.quantized_weight().T, (x @ layer.weight.T).detach())


def error_value(layer: QuantLayer, x: torch.Tensor) -> float:
    return float(output_error(layer, x).detach())


def test_init_reproduces_the_fp_weight_and_nearest_rounding():
    layer = quant_linear(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), 4)
    wq, w = layer.weight_quantizer, layer.weight.detach()
    r = AdaRound(w, wq)
    s, z = wq.current()
    inside = ((w / s + z) >= wq.qmin) & ((w / s + z) <= wq.qmax - 1)
    soft = r(w, wq).detach()
    assert torch.allclose(soft[inside], w[inside], atol=1e-6)       # h(alpha) = frac(w / s)
    r.hard = True
    nearest = wq.to_int(w)
    assert torch.equal(r.codes(w, wq), nearest)                     # alpha >= 0 <=> frac >= 0.5
    assert torch.equal(r(w, wq), wq.dequantize(nearest))


@pytest.mark.parametrize("seed", [1, 2, 3, 6, 8])
def test_adaround_finds_the_brute_force_optimum(seed):
    layer, x = worked_example(seed)
    nearest = error_value(layer, x)
    optimum = brute_force_optimum(layer, x)
    assert optimum < 0.9 * nearest                                  # nearest rounding is not optimal here
    stats = optimize_rounding([layer], lambda it: output_error(layer, x), 800, lr=2e-2, reg_weight=1.0,
                              progress=False)
    assert error_value(layer, x) == pytest.approx(optimum, rel=1e-5, abs=1e-7)
    assert stats["undecided"] == 0.0 and stats["final_loss"] == pytest.approx(optimum, rel=1e-4, abs=1e-6)


def test_adaround_never_worse_than_nearest_and_hard_equals_soft():
    for seed in range(6):
        layer, x = worked_example(seed)
        nearest = error_value(layer, x)
        stats = optimize_rounding([layer], lambda it: output_error(layer, x), 1500, lr=2e-2, reg_weight=1.0,
                                  progress=False)
        assert error_value(layer, x) <= nearest + 1e-7
        # at the end of the schedule every offset is exactly 0 or 1: hard == soft
        assert stats["undecided"] == 0.0
        r, w, wq = layer.rounding, layer.weight, layer.weight_quantizer
        assert r.hard
        hard = r(w, wq)
        r.hard = False
        assert torch.equal(r(w, wq).detach(), hard)
        r.hard = True


def test_freeze_stores_the_learned_codes():
    layer, x = worked_example(2)
    optimize_rounding([layer], lambda it: output_error(layer, x), 300, lr=2e-2, reg_weight=1.0, progress=False)
    learned = layer.quantized_weight().detach().clone()
    codes = layer.rounding.codes(layer.weight, layer.weight_quantizer)
    layer.freeze()
    assert layer.rounding is None and layer.frozen
    assert torch.equal(layer.weight, learned)
    assert torch.equal(layer.weight_codes.float(), codes)
    assert codes.min() >= layer.weight_quantizer.qmin and codes.max() <= layer.weight_quantizer.qmax


def test_regularizer_and_beta_schedule():
    r = AdaRound(torch.zeros(3, 2), quant_linear(torch.randn(3, 2), 4).weight_quantizer)
    with torch.no_grad():
        r.alpha.copy_(torch.tensor([[-10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    assert torch.equal(rectified_sigmoid(r.alpha), (r.alpha > 0).float())  # saturates exactly
    assert float(r.regularizer(2.0).detach()) == 0.0
    with torch.no_grad():
        r.alpha.zero_()                                             # h = 0.5: the largest penalty
    assert float(r.regularizer(20.0).detach()) == pytest.approx(6.0)
    assert beta_at(0, 100, 0.2, (20, 2)) is None and beta_at(19, 100, 0.2, (20, 2)) is None
    assert beta_at(20, 100, 0.2, (20, 2)) == pytest.approx(20.0)
    assert beta_at(99, 100, 0.2, (20, 2)) == pytest.approx(2.0 + 18.0 / 80)
    assert beta_at(60, 100, 0.2, (20, 2)) == pytest.approx(11.0)


def test_zero_iterations_is_nearest_rounding():
    layer, x = worked_example(1)
    nearest = layer.weight_quantizer(layer.weight).detach()
    stats = optimize_rounding([layer], lambda it: output_error(layer, x), 0, progress=False)
    assert stats["initial_loss"] is None
    assert torch.equal(layer.quantized_weight(), nearest)


def test_pack_mask_roundtrip_and_restore():
    layer, _ = worked_example(3)
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    r = AdaRound(layer.weight, layer.weight_quantizer)
    r.set_hard_offsets(unpack_mask(pack_mask(mask), mask.shape))
    assert r.hard and torch.equal(r.alpha >= 0, mask)
    with pytest.raises(ValueError, match="does not match"):
        r.set_hard_offsets(mask[:1])


def test_adaround_needs_an_initialised_quantizer():
    with pytest.raises(RuntimeError, match="initialised"):
        AdaRound(torch.randn(2, 2), UniformQuantizer(4, channel_axis=0))


def test_fixed_weight_computes_what_the_layer_computes_without_it():
    """QuantLayer.fixed_weight (used by passes that change no weight) caches the fake-quantized
    weight: same outputs as without it, nearest or learned rounding; with the weight quantizer
    off inside the block the layer still computes with its FP weight; after the block nothing is
    cached."""
    from tfmq.quant.model import fixed_weights
    layer, x = worked_example(4, k=12, out=5)
    nearest = layer(x)
    with fixed_weights(layer):
        assert torch.equal(layer(x), nearest)
        layer.weight_quantizer.enabled = False
        assert torch.equal(layer(x), x @ layer.weight.T)
        layer.weight_quantizer.enabled = True
    optimize_rounding([layer], lambda it: output_error(layer, x), 30, lr=5e-2, progress=False)
    learned = layer(x)
    assert not torch.equal(learned, nearest)          # the rounding changed something
    with layer.fixed_weight():
        assert torch.equal(layer(x), learned)
    assert layer._fixed_weight is None
