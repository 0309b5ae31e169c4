"""The deployable quantized denoiser, independent of calibration (imports nothing from ``calib``).

* :mod:`~tfmq.runtime.packed`: packed integer weights (uint8, two 4-bit codes a byte) + scales;
* :mod:`~tfmq.runtime.layers`: ``QuantizedLinear`` / ``QuantizedConv2d`` / attention parameters;
* :mod:`~tfmq.runtime.steps`: the per-step index as a tensor and the sampler check;
* :mod:`~tfmq.runtime.temporal_cache`: the temporal feature table (stored, or tabulated at load);
* :mod:`~tfmq.runtime.backends`: ``reference``, ``weight-only``, ``w8a8``;
* :mod:`~tfmq.runtime.selection`: choosing a converted denoiser's backend, and what runs how;
* :mod:`~tfmq.runtime.convert`: calibrated model / checkpoint tensors <-> runtime modules;
* :mod:`~tfmq.runtime.pipeline`: the diffusers pipeline around a quantized denoiser.
"""

from .backends import BACKENDS, BackendUnavailable, compile_denoiser, get_backend
from .convert import ConversionError, build_runtime, convert, runtime_nbytes, runtime_tensors
from .layers import ActQuant, AttentionActQuant, QuantizedConv2d, QuantizedLinear, runtime_layers
from .packed import PackedWeight
from .selection import backend_summary, set_backend
from .steps import CalibrationMismatchError, StepIndex, check_timesteps, is_step_dependent
from .temporal_cache import tabulate_temporal

__all__ = ["ActQuant", "AttentionActQuant", "BACKENDS", "BackendUnavailable", "CalibrationMismatchError",
           "ConversionError", "PackedWeight", "QuantizedConv2d", "QuantizedLinear", "StepIndex",
           "backend_summary", "build_runtime", "compile_denoiser", "check_timesteps", "convert", "get_backend",
           "is_step_dependent", "runtime_layers", "runtime_nbytes", "runtime_tensors", "set_backend",
           "tabulate_temporal"]
