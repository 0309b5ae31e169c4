"""Deployment outside PyTorch: the quantized denoiser as an ONNX QDQ graph, run by ONNX Runtime
or OpenVINO inside tfmq's sampler loop.

* :mod:`~tfmq.export.qdq`: export-mode modules (QuantizeLinear / DequantizeLinear, integer weights);
* :mod:`~tfmq.export.graph`: the denoiser with its temporal block taken out (features as inputs);
* :mod:`~tfmq.export.table`: the temporal feature table fed to the graph;
* :mod:`~tfmq.export.onnx`: :func:`export_onnx`, the export folder and its checks;
* :mod:`~tfmq.export.runners`: :func:`load_onnx`, ONNX Runtime / OpenVINO behind a denoiser.

Needs the optional dependencies ``pip install "tfmq[deploy]"`` (onnx, onnxruntime, openvino).
"""

from .onnx import ExportError, export_onnx
from .runners import load_onnx

__all__ = ["ExportError", "export_onnx", "load_onnx"]
