"""The shipped class-accuracy classifiers (tfmq.eval.classifier): accurate on real held-out images,
at chance on noise, the input layout, and class accuracy inside `evaluate`."""

import json

import numpy as np
import pytest
import torch

from tfmq.eval.classifier import (CLASSIFIERS, ClassifierUnavailable, class_accuracy, classifier_dir,
                                  classifier_for_reference, load_classifier, to_classifier_input)
from tfmq.eval.datasets import DatasetUnavailable, load_fashion_mnist, load_mnist_5k, pad_to


def _fmnist_test():
    try:
        return load_fashion_mnist("test", labels=True)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))


def _mnist_held_out(meta):
    try:
        x, y = load_mnist_5k(labels=True)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    test = np.random.default_rng(meta["training"]["seed"]).permutation(len(x))[:1000]   # as the script
    return x[test], y[test]


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_shipped_files_are_small_and_documented(name):
    weights = classifier_dir() / f"{name}.safetensors"
    meta = json.loads((classifier_dir() / f"{name}.json").read_text())
    assert weights.stat().st_size == meta["weights_bytes"] < 1_000_000
    for key in ("seed", "epochs", "train_wall_time_s"):
        assert key in meta["training"]
    assert len(meta["classes"]) == 10 and meta["test_accuracy"] > 0.9


def test_fashion_mnist_classifier_on_the_real_test_set():
    x, y = _fmnist_test()
    clf = load_classifier("fashion-mnist")
    acc = clf.accuracy(x, y)
    assert acc > 0.90
    assert acc == pytest.approx(clf.meta["test_accuracy"], abs=2e-3)       # what the json claims
    # padded to 32x32 (the bundled models' layout) reads the same
    assert (clf.predict(pad_to(x[:500], 32)) == clf.predict(x[:500])).all()
    # asked-for labels that do not match the images: chance
    shuffled = np.random.default_rng(0).permutation(y)
    assert class_accuracy(clf, x, shuffled)["class_accuracy"] < 0.15


def test_mnist_classifier_on_held_out_digits():
    clf = load_classifier("mnist")
    x, y = _mnist_held_out(clf.meta)
    acc = clf.accuracy(x, y)
    assert acc > 0.90 and acc == pytest.approx(clf.meta["test_accuracy"], abs=2e-3)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_uniform_noise_is_near_chance(name):
    clf = load_classifier(name)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(2000, 32, 32, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=2000)
    acc = class_accuracy(clf, noise, labels)
    assert acc["class_accuracy_n"] == 2000 and 0.06 < acc["class_accuracy"] < 0.14      # chance 0.1 +- 4 sd


def test_input_layout_and_refusals():
    x = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    t = to_classifier_input(x)
    assert t.shape == (3, 1, 28, 28) and t.min() >= -1 and t.max() <= 1
    assert torch.equal(to_classifier_input(pad_to(x, 32)), t)
    assert torch.equal(to_classifier_input(np.repeat(x, 3, axis=-1)), t)     # grey stored as RGB
    colour = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 3), dtype=np.uint8)
    for bad, match in ((colour, "colour"), (x[:, :16, :16], "16x16"), (x.astype(np.float32), "uint8")):
        with pytest.raises(ClassifierUnavailable, match=match):
            to_classifier_input(bad)
    clf = load_classifier("mnist")
    with pytest.raises(ClassifierUnavailable, match="outside"):
        class_accuracy(clf, x, [0, 1, 10])
    with pytest.raises(ClassifierUnavailable, match="no classifier"):
        load_classifier("cifar10")
    assert classifier_for_reference("fashion-mnist-test") == "fashion-mnist"
    assert classifier_for_reference("mnist-5k") == "mnist" and classifier_for_reference(None) is None


def _tiny_gray_cond_pipe(path):
    """A RANDOM-weight class-conditional 1-channel 32x32 pipeline (plumbing only)."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def test_class_accuracy_in_evaluate(tmp_path, tiny_pipe_dir):
    from tfmq.api import load_any
    from tfmq.eval.evaluate import EvalSettings, evaluate
    from tfmq.sampling import SamplerConfig, build_conditioning
    model = _tiny_gray_cond_pipe(tmp_path / "cond")

    def run(out, **kw):
        s = EvalSettings(**{**dict(model=str(model), methods=["fp"], bits=["w8a8"], num_images=6, seed=2,
                                   sampler=SamplerConfig(steps=2), batch_size=6, reference=None,
                                   classifier="mnist", grid_images=2), **kw})
        return evaluate(s, tmp_path / out, progress=False), (tmp_path / out / "report.md").read_text()

    report, md = run("a")
    row = report["rows"][0]
    with np.load(tmp_path / "a" / "cells" / "fp" / "samples.npz") as z:
        images, labels = z["arr_0"], z["class_labels"]
    expected = build_conditioning(load_any(str(model)), 6, 2).class_labels.numpy()
    assert (labels == expected).all()                                  # the labels the sampler used
    assert row["class_accuracy"] == load_classifier("mnist").accuracy(images, labels)
    assert "class acc." in md and "mnist classifier assigns" in md
    # auto without a reference: said why, no number
    report, md = run("b", classifier="auto")
    assert report["rows"][0]["class_accuracy"] is None
    assert "Class accuracy: skipped: no reference data set" in md
    # an unconditional model: the metric does not apply and the report does not mention it
    report, md = run("c", model=str(tiny_pipe_dir))
    assert "class_accuracy" not in report["rows"][0] and "lass acc" not in md
