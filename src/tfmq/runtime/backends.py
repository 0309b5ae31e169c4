"""How a converted layer computes: the runtime backends.

``reference``
    Expand the packed codes to the weight (``(code - zero) * scale``, float32, then the model
    dtype), fake-quantize the input, compute in the model dtype: the calibrated model's numbers
    exactly. The accuracy reference for every other backend.
``weight-only``
    The memory-first backend: weights stay packed in memory (uint8, two 4-bit codes a byte) and
    each layer expands its own weight when it runs, so the resident denoiser is its packed codes,
    scales and the layers kept in full precision. Numerically identical to ``reference``; on CPU
    and CUDA the expansion uses tensor operations (no fused kernel yet).
``w8a8``
    Real 8-bit compute on CUDA (compute capability >= 8.0, Triton): the layer's input is
    quantized to its calibrated int8 grid with the static (per-step) scale, the product runs on
    INT8 tensor cores with int32 accumulation (Triton GEMM for Linear, implicit-GEMM for Conv2d),
    and the zero-point corrections and scales are applied in the kernel's epilogue. Convolutions
    with 8-bit weights whose input the layer policy keeps in full precision (``tfmq-official``: every
    resnet ``conv1``) keep their weight expanded once in the model dtype and run cuDNN on it
    (``dense_fp_input_convs``, the default: the reference numbers bit for bit, none of the per-call
    expansion that cost about 48 us a layer in compiled SD graphs on an H200, for those weights'
    memory in the model dtype, counted by ``runtime_nbytes`` as ``backend_extra``: SD v1.5's 22
    conv1 hold 288 M weights, 550 MiB in bf16 beside the UNet's 820 MiB of 8-bit codes). With
    ``dense_fp_input_convs = False`` they run a W8A16 kernel in eager bf16 / fp16 calls
    (:mod:`.kernels.w8a16`: int8 codes dequantized tile by tile in registers, no full-precision
    weight; the SD UNet's 22 conv1 5.3 ms vs 7.4 ms expanded + cuDNN on an H200) and the reference
    math under ``torch.compile``. In compiled graphs the
    int8 GEMMs are called as custom operators (:mod:`.kernels.ops`): opaque to the compiler, so
    each launch is autotuned per shape by Triton as in eager mode. Other layers (other bit
    widths, grouped / dilated convolutions) compute as in ``reference``; the int8 layers run in
    float32 models too (the GEMMs' epilogue writes the model dtype); :func:`~tfmq.runtime.selection.backend_summary` says which ran how.

Every backend is tested against ``reference`` on the same inputs (tests/test_runtime.py).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
from torch import nn

from ..choices import COMPILE_MODES
from .guards import SkipGuardsAfterFirstCall, frozen


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (no GPU, no Triton, unsupported layer)."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str

    def available(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else the reason it cannot."""
        return None

    def prepare(self, layer) -> None:
        """Derive what the backend needs from the layer's packed representation (once)."""
        layer.prepared = {}

    def handles(self, layer) -> bool:
        """Whether this backend's own kernels run ``layer`` (else it computes as ``reference``)."""
        return True

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.act is not None:
            x = layer.act(x)
        return layer.compute(x, layer.dequantized_weight(x.dtype))


class WeightOnlyBackend(Backend):
    pass


class W8A8Backend(Backend):
    #: inside ``torch.compile``, quantize activations with torch operations (``quantize_act_ops``, the
    #: same codes bit for bit) that the compiler fuses into the producing kernel, instead of the
    #: separate Triton quantize pass; eager calls always use the Triton pass
    fuse_quantize: bool = True
    #: run attention projections of one input with one input grid as one GEMM (:mod:`.projections`)
    fuse_projections: bool = True
    #: convolutions with 8-bit weights whose input stays in full precision keep their weight
    #: expanded in the model dtype (once, at preparation) and run the library convolution on it:
    #: the reference numbers with no per-call expansion, for that weight's memory in the model
    #: dtype. False: the W8A16 kernel in eager 16-bit calls, the expansion per call otherwise
    dense_fp_input_convs: bool = True

    def available(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return ("the w8a8 backend runs INT8 tensor-core kernels on a CUDA GPU; this model is on "
                    f"{device}. Use the reference or weight-only backend on CPU")
        from .kernels import int8
        if not int8.available():
            return "the w8a8 backend needs Triton and a GPU of compute capability 8.0 or newer"
        return None

    @staticmethod
    def _plain_conv(layer) -> bool:
        return layer.groups == 1 and not isinstance(layer.padding, str) and layer.dilation == (1, 1)

    @staticmethod
    def _act_groups(layer) -> list:
        """The layer's input quantizers: one, or one per channel group of a split input."""
        return list(layer.act.groups) if hasattr(layer.act, "groups") else [layer.act]

    def _int8(self, layer) -> bool:
        act = layer.act
        if layer.qweight is None or layer.qweight.bits != 8 or act is None or act.bits != 8:
            return False
        return layer.kind != "conv" or self._plain_conv(layer)

    def _fp_input_conv(self, layer) -> bool:
        """A plain convolution with 8-bit weights whose input the policy keeps in full precision."""
        return (layer.kind == "conv" and layer.act is None and layer.qweight is not None
                and layer.qweight.bits == 8 and self._plain_conv(layer))

    def _w8a16(self, layer) -> bool:
        from .kernels.w8a16 import IN_DTYPES
        return not self.dense_fp_input_convs and self._fp_input_conv(layer) and layer.dtype in IN_DTYPES

    def handles(self, layer) -> bool:
        if self.dense_fp_input_convs:
            return self._int8(layer) or self._fp_input_conv(layer)
        return self._int8(layer) or self._w8a16(layer)

    def prepare(self, layer) -> None:
        from .kernels import int8
        layer.prepared = {}
        if self.dense_fp_input_convs and self._fp_input_conv(layer):
            layer.prepared = {"dense": frozen(layer.dequantized_weight(layer.dtype))}
            return
        if self._w8a16(layer):
            from .kernels import w8a16
            q = layer.qweight
            w8, zo = w8a16.prepare_weight(q.codes(), q.zero_point, int8.offset_for(q.qmin, q.qmax))
            layer.prepared = {"w8a16": (frozen(w8), frozen(zo))}
            return
        if not self._int8(layer):
            return
        q = layer.qweight
        codes = q.codes()                                     # int16, PyTorch weight layout
        ow = int8.offset_for(q.qmin, q.qmax)
        acts = self._act_groups(layer)
        if len(acts) > 1:                                     # split input: one GEMM per channel group
            s = layer.act.split
            parts = [codes[:, :s], codes[:, s:]]
        else:
            parts = [codes]
        # per-step tables the GEMM kernels index with the step-index buffer themselves: sx and
        # ca = offset - zero_point (an integer), so a compiled graph computes no scalars per layer
        # (frozen parameters, as every runtime tensor: see .guards.frozen)
        # cb = offset - zero point is 0 for a symmetric weight grid: the GEMMs then need no
        # activation sums (cb None), and the quantizer feeding them is elementwise only
        prepared = [int8.prepare_weight(p.contiguous(), q.zero_point, ow) for p in parts]
        layer.prepared = {"parts": [(frozen(w8), frozen(cb) if bool(cb.any()) else None, frozen(bsum))
                                    for w8, cb, bsum in prepared],
                          "ca": [frozen((int8.offset_for(a.qmin, a.qmax) - a.zero_point).to(torch.int32))
                                 for a in acts]}

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        dense = layer.prepared.get("dense")
        if dense is not None and x.dtype == dense.dtype:
            return layer.compute(x, dense)
        w8a16 = layer.prepared.get("w8a16")
        if w8a16 is not None and x.dtype == layer.dtype and not torch.compiler.is_compiling():
            from .kernels.w8a16 import w8a16_conv2d
            return w8a16_conv2d(x, *w8a16, layer.qweight.scale, layer.bias, layer.stride, layer.padding)
        parts = layer.prepared.get("parts")
        if parts is None:                                    # not a W8A8 layer: reference math
            return Backend.run(self, layer, x)
        quants = self._act_groups(layer)
        inputs = layer.act.chunks(x) if len(quants) > 1 else [x]
        conv = (layer.stride, layer.padding) if layer.kind == "conv" else None
        out = None
        for i, (aq, xi, (w8, cb, bsum), ca) in enumerate(zip(quants, inputs, parts, layer.prepared["ca"])):
            y = self.int8_product(aq, xi, w8, cb, bsum, ca, layer.qweight.scale, layer.bias if i == 0 else None,
                                  x.dtype, conv)
            out = y if out is None else out + y
        return out

    def int8_product(self, aq, x: torch.Tensor, w8, cb, bsum, ca, sw, bias, out_dtype: torch.dtype,
                     conv: tuple | None = None) -> torch.Tensor:
        """``x`` quantized to the grid of its input quantizer ``aq`` times a prepared int8 weight
        (``w8``, ``cb`` (None: symmetric weights), ``bsum``; ``ca`` the per-step ``offset - zx``
        table), scaled by ``sx * sw`` plus ``bias``: one quantize pass and one int8 GEMM (an
        implicit-GEMM convolution for ``conv = (stride, padding)``)."""
        from .kernels import int8
        in_graph = torch.compiler.is_compiling()
        linear, conv_fn = self._int8_linear, self._int8_conv2d
        if in_graph:       # the GEMMs as custom operators: opaque to the compiler, Triton tunes each shape
            from .kernels import ops
            linear, conv_fn = ops.int8_linear, ops.int8_conv2d_padded
        sx, zx = aq.params()                  # this step's: for the quantizer
        step = aq.step_index                  # the GEMM reads its sx / ca (= offset - zx) tables at it
        s_tab, ca_tab = (aq.scale, ca) if step is not None else (aq.scale[:1], ca[:1])
        sums = cb is not None                 # symmetric weights (cb None): no activation sums
        fused = self.fuse_quantize and in_graph
        quantize = functools.partial(int8.quantize_act_ops if fused else int8.quantize_act, return_sums=sums)
        if conv is not None:
            stride, padding = conv
            q = quantize(x, sx, zx, aq.qmin, aq.qmax, nhwc=True, pad=padding)
            a, asum = q if sums else (q, None)
            return conv_fn(a, w8, stride, padding, s_tab, ca_tab, sw, cb, bsum, bias, out_dtype, asum, step)
        q = quantize(x, sx, zx, aq.qmin, aq.qmax)
        a, asum = q if sums else (q, None)
        return linear(a, w8, s_tab, ca_tab, sw, cb, bsum, bias, out_dtype, asum, step)

    @staticmethod
    def _int8_linear(a, w8, sx, ca, sw, cb, bsum, bias, out_dtype, asum, step):
        from .kernels import int8
        return int8.int8_linear(a, w8, sx, ca, sw, cb, bsum, bias, out_dtype, asum=asum, step=step)

    @staticmethod
    def _int8_conv2d(a, w8, stride, padding, sx, ca, sw, cb, bsum, bias, out_dtype, asum, step):
        from .kernels import int8
        return int8.int8_conv2d(a, w8, stride, padding, sx, ca, sw, cb, bsum, bias, out_dtype, asum=asum,
                                padded=True, step=step)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "packed weights expanded per call, fake-quantized activations, "
                                      "model dtype: the calibrated numbers exactly"),
    "weight-only": WeightOnlyBackend("weight-only", "packed weights resident, expanded per layer at run "
                                                    "time (lowest memory); same numbers as reference"),
    "w8a8": W8A8Backend("w8a8", "INT8 tensor cores (CUDA, Triton) for W8A8 layers with the calibrated "
                                "integer grids; other layers as reference"),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def compile_denoiser(denoiser: nn.Module, mode: str | None = None, skip_guards: bool = True) -> nn.Module:
    """Compile a converted denoiser's forward with ``torch.compile(fullgraph=True)`` (in place).

    Only ``forward`` is compiled: the forward pre-hooks (the step index's check of each call's
    timestep, the temporal cache's row lookup) keep running in eager mode before it, and the
    compiled graph reads the per-step parameters through the step-index buffer, so one graph
    serves every sampling step. ``mode`` is passed to ``torch.compile``: ``"reduce-overhead"``
    replays each call as a CUDA graph (the step index is a buffer the graph reads, so replays
    follow the sampler's steps), ``"max-autotune"`` also tunes Inductor's kernels.

    ``skip_guards`` (default): after the first call of each input signature, Dynamo's guards are
    not re-evaluated on the model (:mod:`.guards`; a converted denoiser's guard check costs
    milliseconds of host time a call, as much as the GPU's work at small batches). The denoiser
    must not be changed afterwards (load it again instead); ``skip_guards=False`` keeps the full
    check on every call.
    """
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    mode = None if mode == "default" else mode
    if getattr(denoiser, "_tfmq_compiled", False):
        if getattr(denoiser, "_tfmq_compile_mode", None) != mode:
            raise ValueError(f"this denoiser is already compiled with mode "
                             f"{getattr(denoiser, '_tfmq_compile_mode', None)!r}; load it again to use {mode!r}")
        return denoiser
    compiled = torch.compile(denoiser.forward, fullgraph=True, mode=mode)
    denoiser.forward = SkipGuardsAfterFirstCall(compiled) if skip_guards else compiled
    denoiser._tfmq_compiled = True
    denoiser._tfmq_compile_mode = mode
    return denoiser
