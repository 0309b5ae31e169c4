"""tfmq: post-training quantization of diffusers pipelines (naive PTQ, Q-Diffusion, TFMQ-DM).

Public API::

    import tfmq
    pipe = tfmq.load_pipeline("path/or/hub-id")
    qpipe = tfmq.quantize(pipe, tfmq.QuantConfig.for_method("naive", wbits=8, abits=8))
    tfmq.save(qpipe, "out_dir")
    qpipe = tfmq.load("out_dir", backend="reference")   # runtime modules: packed weights
    tfmq.export_onnx("out_dir", "onnx_dir")               # ONNX QDQ graph + temporal feature table
    opipe = tfmq.load_onnx("onnx_dir", "onnxruntime")     # tfmq.generate(opipe, ...) runs the graph
"""

__version__ = "0.1.0"

from .api import convert, default_model_path, load, quantize, save  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .export import export_onnx, load_onnx  # noqa: E402
from .models.adapter import load_pipeline  # noqa: E402
from .sampling import SamplerConfig, generate  # noqa: E402

__all__ = ["QuantConfig", "SamplerConfig", "convert", "default_model_path", "export_onnx", "generate", "load",
           "load_onnx", "load_pipeline", "quantize", "save", "__version__"]
