"""tfmq: post-training quantization of diffusers pipelines (naive PTQ, Q-Diffusion, TFMQ-DM).

Public API::

    import tfmq
    pipe = tfmq.load_pipeline("path/or/hub-id")
    qpipe = tfmq.quantize(pipe, tfmq.QuantConfig.for_method("naive", wbits=8, abits=8))
    tfmq.save(qpipe, "out_dir")
    qpipe = tfmq.load("out_dir", backend="reference")   # runtime modules: packed weights
    tfmq.export_onnx("out_dir", "onnx_dir")               # ONNX QDQ graph + temporal feature table
    opipe = tfmq.load_onnx("onnx_dir", "onnxruntime")     # tfmq.generate(opipe, ...) runs the graph

The names are imported on first use (torch and diffusers take seconds to import), so that
``import tfmq`` and ``tfmq --version`` stay instant.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "convert": ".api", "default_model_path": ".api", "load": ".api", "quantize": ".api", "save": ".api",
    "export_onnx": ".export", "load_onnx": ".export",
    "QuantConfig": ".config", "load_pipeline": ".models.adapter",
    "SamplerConfig": ".sampling", "generate": ".sampling",
    "use_deterministic_algorithms": ".reproducible",
}

__all__ = ["QuantConfig", "SamplerConfig", "convert", "default_model_path", "export_onnx", "generate", "load",
           "load_onnx", "load_pipeline", "quantize", "save", "use_deterministic_algorithms", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tfmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
