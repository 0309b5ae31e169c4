"""The FID bootstrap (tfmq.eval.fid_bootstrap) and what the report makes of it, on synthetic
features (small dimension, so the tests are fast; the code does not depend on D)."""

import numpy as np
import pytest

from tfmq.eval.fid import feature_stats, fid_from_stats
from tfmq.eval.fid_bootstrap import (bootstrap_indices, bootstrap_interval, fid_and_bootstrap,
                                     paired_difference)
from tfmq.eval.report import MIN_FID_N, markdown_report, ranking_warning

D = 24


def gaussian(n, seed, shift=0.0, scale=1.0, d=D):
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)   # fixed covariance
    return (rng.standard_normal((n, d)) @ mix) * scale + shift


@pytest.fixture(scope="module")
def ref():
    return feature_stats(gaussian(4000, 1))


@pytest.mark.parametrize("n", [10, D, 300])        # Gram path (N <= D) and covariance path (N > D)
def test_point_equals_the_exact_fid(ref, n):
    feats = gaussian(n, 2, shift=0.1)
    point, boot = fid_and_bootstrap(feats, ref, resamples=5, seed=0)
    exact = fid_from_stats(feature_stats(feats), ref, method="sqrtm")
    assert point == pytest.approx(exact, rel=1e-7, abs=1e-8)
    # every resample is the exact FID of the resampled features
    idx = bootstrap_indices(n, 5, 0)
    for b, i in zip(boot, idx):
        assert b == pytest.approx(fid_from_stats(feature_stats(feats[i]), ref, method="eigh"), rel=1e-7, abs=1e-8)


def test_bootstrap_spread_matches_the_sampling_spread(ref):
    # the spread over bootstrap resamples of ONE set of N images estimates how much the FID moves
    # between independent sets of N images from the same model
    n = 200
    independent = [fid_from_stats(feature_stats(gaussian(n, 100 + k, shift=0.05)), ref, method="eigh")
                   for k in range(60)]
    _, boot = fid_and_bootstrap(gaussian(n, 7, shift=0.05), ref, resamples=60, seed=0)
    ratio = np.std(boot) / np.std(independent)
    print(f"bootstrap std / independent std = {ratio:.2f}")
    assert 0.5 < ratio < 2.0, ratio
    lo, hi = bootstrap_interval(independent[0], boot)
    assert lo < independent[0] < hi


def test_seeded_and_paired():
    a = bootstrap_indices(50, 4, 3)
    assert (a == bootstrap_indices(50, 4, 3)).all() and not (a == bootstrap_indices(50, 4, 4)).all()
    # identical cells: difference exactly 0, never separable
    same = paired_difference(10.0, [9, 11, 12, 10], 10.0, [9, 11, 12, 10])
    assert same.difference == 0 and same.low == same.high == 0 and not same.separable
    shifted = paired_difference(15.0, [14, 16, 17, 15], 10.0, [9, 11, 12, 10])
    assert shifted.separable and shifted.low == shifted.high == 5.0
    with pytest.raises(ValueError):
        paired_difference(1.0, [1, 2], 1.0, [1, 2, 3])


def _row(method, feats, ref, fp_feats=None):
    point, boot = fid_and_bootstrap(feats, ref, resamples=40, seed=0)
    row = {"cell": method if method == "fp" else f"{method}-w4a8", "method": method,
           "wbits": 32 if method == "fp" else 4, "abits": 32 if method == "fp" else 8, "n": len(feats),
           "fid": point, "fid_ci": list(bootstrap_interval(point, boot)),
           "fid_bootstrap": {"resamples": 40, "seed": 0, "samples": boot.tolist()}}
    if fp_feats is not None:
        row["psnr_vs_fp"], row["mse_vs_fp"] = 25.0, 200.0
    return row


def _report(rows):
    from tfmq.eval.evaluate import EvalSettings
    return {"settings": EvalSettings(num_images=rows[0]["n"]).to_dict(), "rows": rows,
            "fid_bootstrap": {"resamples": 40, "seed": 0, "level": 0.95}, "metric_notes": {}}


def test_small_n_warning_at_16_not_at_1000(ref):
    # the quantized cell's features are the FP cell's plus a clear shift: paired, as in evaluate
    for n, warned in ((16, True), (1000, False)):
        fp = gaussian(n, 5)
        q = fp + 0.4
        rows = [_row("fp", fp, ref), _row("naive", q, ref, fp)]
        md = markdown_report(_report(rows))
        assert ("FID cannot rank these methods" in md) == warned, md
        assert (ranking_warning(rows) is not None) == warned
        assert f"FID (N = {n}) [95% CI]" in md and "FID - FP [paired CI]" in md
        line = next(x for x in md.splitlines() if x.startswith("- **naive W4A8**"))
        assert line.index("PSNR 25.0 dB") < line.index("FID")       # fidelity to FP first
        if not warned:
            assert "worse than FP" in line
    assert 16 < MIN_FID_N <= 1000


def test_warning_when_fid_cannot_separate_a_cell_at_large_n(ref):
    fp = gaussian(1000, 5)
    q = fp + np.random.default_rng(0).standard_normal(fp.shape) * 1e-3      # all but identical
    rows = [_row("fp", fp, ref), _row("tfmq", q, ref, fp)]
    warning = ranking_warning(rows)
    assert warning is not None and "tfmq W4A8" in warning and "below" not in warning
    assert "not separable from FP at N = 1000" in markdown_report(_report(rows))


def test_warning_without_bootstrap(ref):
    fp, q = gaussian(1000, 5), gaussian(1000, 5) + 0.4
    rows = [_row("fp", fp, ref), _row("naive", q, ref, fp)]
    for r in rows:
        r["fid_ci"] = r["fid_bootstrap"] = None
    warning = ranking_warning(rows)
    assert warning is not None and "unchecked" in warning
