"""Integer GPU kernels for quantized inference (see :mod:`tfmq.runtime.kernels.int8`)."""
