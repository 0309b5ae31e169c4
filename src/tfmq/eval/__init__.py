"""Offline evaluation: real data, FID / sFID / IS, and FP-vs-quantized deviation metrics.

Modules, one job each:

- :mod:`~tfmq.eval.datasets`: Fashion-MNIST and MNIST-5k as uint8 NHWC arrays.
- :mod:`~tfmq.eval.images`: image-batch conventions (uint8 NHWC, float -> uint8).
- :mod:`~tfmq.eval.inception`: the FID Inception network, loaded offline.
- :mod:`~tfmq.eval.fid`: Frechet distance, FID and sFID.
- :mod:`~tfmq.eval.reference`: cached statistics of real data sets.
- :mod:`~tfmq.eval.inception_score`: IS (reported unavailable without a classifier).
- :mod:`~tfmq.eval.metrics`: MSE, PSNR, cosine similarity.
- :mod:`~tfmq.eval.fid_bootstrap`: bootstrap interval of an FID, paired FID differences.
- :mod:`~tfmq.eval.classifier`: shipped (Fashion-)MNIST classifiers for class accuracy.
- :mod:`~tfmq.eval.evaluate`: the evaluation matrix; :mod:`~tfmq.eval.report` and
  :mod:`~tfmq.eval.report_settings`: its report.md; :mod:`~tfmq.eval.grid`: sample grids.
"""

from .datasets import DATASETS, DatasetUnavailable, load_dataset, load_fashion_mnist, load_mnist_5k, pad_to
from .fid import (
    FeatureStats,
    ImageStats,
    feature_stats,
    fid_from_features,
    fid_from_images,
    fid_from_stats,
    frechet_distance,
    image_stats,
    sfid_from_images,
)
from .images import to_uint8
from .inception import InceptionFeatures, NetworkUnavailable, find_fid_network
from .inception_score import inception_score, inception_score_from_logits
from .metrics import cosine_similarity, mse, psnr
from .reference import cache_dir, reference_stats
from .result import MetricResult

__all__ = [
    "DATASETS", "DatasetUnavailable", "load_dataset", "load_fashion_mnist", "load_mnist_5k", "pad_to",
    "FeatureStats", "ImageStats", "feature_stats", "fid_from_features", "fid_from_images", "fid_from_stats",
    "frechet_distance", "image_stats", "sfid_from_images",
    "to_uint8",
    "InceptionFeatures", "NetworkUnavailable", "find_fid_network",
    "inception_score", "inception_score_from_logits",
    "cosine_similarity", "mse", "psnr",
    "cache_dir", "reference_stats",
    "MetricResult",
]
