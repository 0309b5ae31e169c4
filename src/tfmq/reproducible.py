"""Bit-reproducible runs on a GPU: PyTorch's deterministic algorithms.

On a CUDA GPU some kernels (backward passes of convolutions, index and scatter operations) add
with atomics, so two runs of the same calibration differ in the last bits, and AdaRound and
activation step learning can turn that into other rounding choices or scales: two 1-GPU runs of
the bundled model's tfmq calibration differed in 119 of 895 checkpoint tensors (2 x H200, session
6, benchmarks/results/multi_gpu/). With deterministic algorithms the same job gave the same
checkpoint, bit for bit, on one GPU and on two, and the 1-GPU run took 44.3 s instead of 38.0 /
39.7 s (same machine, separate launches). On the CPU tfmq's runs are deterministic already.
"""

from __future__ import annotations

import os

import torch


def use_deterministic_algorithms() -> None:
    """Make this process use deterministic GPU algorithms (cuDNN and PyTorch's own): call it
    before any CUDA work. Operations without a deterministic implementation warn (PyTorch's
    ``warn_only``) instead of failing: such a warning names what may still vary."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when cuBLAS starts
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
