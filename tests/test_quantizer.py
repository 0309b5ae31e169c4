"""Quantizer numerics against direct formulas, range searches, and bit packing round trips."""

import pytest
import torch

from tfmq.quant.packing import pack, packed_nbytes, unpack
from tfmq.quant.quantizer import UniformQuantizer, init_range, mse_range, round_ste


def direct_fake_quant(x, lo, hi, bits, symmetric):
    """Reference: the textbook formula written out with plain Python floats."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    out = []
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = max(abs(lo), hi) / ((qmax - qmin) / 2)
        z = 0.0
    else:
        qmin, qmax = 0, 2 ** bits - 1
        s = (hi - lo) / (qmax - qmin)
        z = float(round(-lo / s))
    for v in x.tolist():
        q = min(max(round(v / s) + z, qmin), qmax)
        out.append((q - z) * s)
    return torch.tensor(out)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_fake_quant_matches_formula(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(500, generator=g, dtype=torch.float64).float() * 3 + 0.5
    q = UniformQuantizer(bits, symmetric)
    init_range(q, x, "minmax")
    ref = direct_fake_quant(x, x.min().item(), x.max().item(), bits, symmetric)
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=1e-5)
    # every output is on the grid: at most 2^bits distinct values
    assert q(x).unique().numel() <= 2 ** bits


def test_per_channel_weights_use_their_own_ranges():
    w = torch.stack([torch.linspace(-1.1, 0.9, 50), torch.linspace(-10.3, 29.7, 50)])  # [2, 50]
    q = UniformQuantizer(4, channel_axis=0)
    init_range(q, w, "minmax")
    for c in range(2):
        ref = direct_fake_quant(w[c], w[c].min().item(), w[c].max().item(), 4, False)
        torch.testing.assert_close(q(w)[c], ref, atol=1e-5, rtol=1e-5)
    assert q.scale.shape == (1, 2, 1)


def test_ste_passes_gradient_through_rounding():
    x = torch.tensor([0.2, 1.7, -3.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0, -3.0]))


def test_mse_range_beats_minmax_on_outliers_and_picks_best_candidate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2000, generator=g)
    x[:, 0] = 40.0  # one outlier per channel
    q = UniformQuantizer(4, channel_axis=0)
    init_range(q, x, "minmax")
    err_minmax = (q(x) - x).abs().pow(2.4).mean(dim=1)
    lo, hi = mse_range(q, x, channel_axis=0)
    init_range(q, x, "mse")
    err_mse = (q(x) - x).abs().pow(2.4).mean(dim=1)
    assert (err_mse < err_minmax).all()
    # brute force over the 80 candidates for channel 0 agrees with the vectorised search
    best = None
    for i in range(80):
        f = 1 - 0.01 * i
        s, z = q.params_from_range(x[0].min() * f, x[0].max() * f)
        e = ((torch.clamp(torch.round(x[0] / s) + z, 0, 15) - z) * s - x[0]).abs().pow(2.4).mean()
        if best is None or e < best[0]:
            best = (e, x[0].max() * f)
    torch.testing.assert_close(hi[0], best[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mse_range_search_on_the_gpu_matches_the_cpu_search():
    """Activation range searches run where the quantizer lives (the GPU during GPU calibration):
    the range found on the GPU is as good as the CPU's (its L_p error, evaluated on the CPU,
    within 1e-5 relative: only near-ties can differ, through the order of the GPU's sums), and
    one of the candidates next to it at most."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 17, generator=g) * torch.linspace(0.1, 3, 1 << 17)
    x[::997] *= 8                                                   # a tail, as activations have
    for bits in (4, 8):
        q = UniformQuantizer(bits)
        lo_c, hi_c = mse_range(q, x)
        lo_g, hi_g = (v.cpu() for v in mse_range(UniformQuantizer(bits).cuda(), x.cuda()))

        def err(lo, hi):
            s, z = q.params_from_range(lo, hi)
            return ((torch.clamp(torch.round(x / s) + z, q.qmin, q.qmax) - z) * s - x).abs().pow(2.4).mean()
        assert abs(float(err(lo_g, hi_g) - err(lo_c, hi_c))) <= 1e-5 * float(err(lo_c, hi_c))
        assert abs(float(hi_g / x.max()) - float(hi_c / x.max())) <= 0.0100001   # same or next candidate


def test_percentile_range_clips_outliers():
    x = torch.cat([torch.linspace(-1, 1, 100000), torch.tensor([1000.0])])
    q = UniformQuantizer(8)
    init_range(q, x, "percentile", percentile=99.9)
    scale, _ = q.current()
    assert scale.item() < 0.02  # range about [-1, 1], not [-1, 1000]


def test_bad_bits_and_method_are_refused():
    with pytest.raises(ValueError, match="bit width"):
        UniformQuantizer(1)
    with pytest.raises(ValueError, match="range method"):
        init_range(UniformQuantizer(8), torch.randn(10), "median")
    with pytest.raises(RuntimeError, match="initialised"):
        UniformQuantizer(8)(torch.randn(3))


def test_parameter_sets_are_selected_by_index():
    q = UniformQuantizer(8, n_sets=3)
    for i in range(3):
        q.set_range(torch.tensor([-(i + 1.0)]), torch.tensor([i + 1.0]), torch.zeros(1), set_index=i)
    scales = []
    for i in range(3):
        q.set_index = i
        scales.append(q.current()[0].item())
    assert scales[0] < scales[1] < scales[2]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 1000, 12345):
        codes = torch.randint(0, 2 ** bits, (n,), generator=g)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
        assert torch.equal(unpack(packed, bits, n), codes)


def test_four_bit_packing_is_two_codes_per_byte_low_nibble_first():
    packed = pack(torch.tensor([0x3, 0xA, 0xF, 0x1]), 4)
    assert packed.tolist() == [0xA3, 0x1F]


def test_pack_rejects_out_of_range_and_unpack_rejects_wrong_size():
    with pytest.raises(ValueError):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 10)


def test_per_row_parameter_sets_match_one_set_per_row():
    """A LongTensor set_index quantizes row i with set steps[i]: the same as quantizing each row
    alone with an int index (how calibration batches that mix steps are handled)."""
    g = torch.Generator().manual_seed(0)
    q = UniformQuantizer(4, n_sets=3)
    for i in range(3):
        q.set_range(torch.tensor([-(i + 1.0)]), torch.tensor([2.0 * (i + 1)]), torch.zeros(1), set_index=i)
    x = torch.randn(5, 2, 3, generator=g) * 3
    steps = torch.tensor([2, 0, 1, 1, 0])
    q.set_index = steps
    got = q(x)
    for r, s in enumerate(steps.tolist()):
        q.set_index = s
        assert torch.equal(got[r], q(x[r:r + 1])[0])
    q.set_index = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="batch first"):
        q(x)


def test_row_steps_sets_and_restores_the_indices():
    from torch import nn
    from tfmq.quant.model import row_steps
    model = nn.Module()
    model.a, model.b = UniformQuantizer(8, n_sets=4), UniformQuantizer(8)
    model.a.set_index = 2
    with row_steps(model, torch.tensor([0, 3])):
        assert model.a.set_index.tolist() == [0, 3] and model.b.set_index == 0
    assert model.a.set_index == 2
    with pytest.raises(IndexError):
        with row_steps(model, torch.tensor([4])):
            pass
