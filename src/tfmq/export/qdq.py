"""Export-mode quantized modules: the runtime representation written as ONNX QDQ operators.

Each module here is built from a runtime module (:mod:`tfmq.runtime.layers`) and computes in
PyTorch what its ONNX graph computes; while ``torch.onnx.export`` traces it, two autograd
functions emit the standard operators instead of their PyTorch arithmetic:

* :class:`QDQActivation` (from an :class:`~tfmq.runtime.layers.ActQuant` with one parameter set):
  ``QuantizeLinear -> DequantizeLinear`` with the calibrated static scale and zero-point (uint8
  for unsigned grids, int8 for symmetric ones). Grids narrower than 8 bits are clipped to their
  range first (``Clip``), which makes ONNX's 8-bit saturation equal to our clamp. Grids wider than
  8 bits (a 16-bit softmax) have no 8-bit operator: they are written as the float arithmetic
  ``(clamp(round(x / s) + z) - z) * s``.
* :class:`ExportWeight` (from a :class:`~tfmq.runtime.packed.PackedWeight`): the integer codes as
  an initializer feeding ``DequantizeLinear`` with per-output-channel scales. Its *form*:

  ``native``  the codes as they are (uint8 with their zero-points, int8 for symmetric grids):
              layers whose input is not quantized (weight-only), which no runtime computes in int8;
  ``int8``    ``code - zero`` as int8 with zero-point 0, for layers whose input is quantized:
              CPU int8 kernels (OpenVINO, oneDNN) need zero-free weights. Exact whenever
              ``code - zero`` fits int8: symmetric grids and asymmetric grids of up to 7 bits;
  ``int8+offset``  asymmetric 8-bit grids, where ``code - zero`` spans [-255, 255]: the int8
              initializer holds ``code - 128`` and the layer adds the exact remainder
              ``(128 - zero) * scale * sum(input window)``, the window sum being a one-output-channel
              conv (a matmul for Linear) with an int8 kernel of ones.

  Every form dequantizes to the layer's weight: ``native`` exactly, the int8 forms up to float
  rounding of the split sum (the integer codes are recoverable exactly, and the export checks them).
* :class:`QDQConv2d` / :class:`QDQLinear` (from ``QuantizedConv2d`` / ``QuantizedLinear``):
  ``DQ(x) , DQ(W) -> Conv / MatMul``. A Linear's weight is stored transposed (``[in, out]``,
  ``DequantizeLinear`` axis 1) so that the ``DequantizeLinear`` feeds ``MatMul`` directly. A split
  input quantizer (Q-Diffusion's split shortcut) gives one conv / matmul per channel group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.layers import ActQuant, GroupActQuant, QuantizedConv2d, QuantizedLinear
from ..runtime.packed import PackedWeight


class ExportError(ValueError):
    """A model (or a part of it) that cannot be written as the requested ONNX graph."""


# ---- the two ONNX-emitting operations ------------------------------------------------------------
class _QuantDequant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; exported as [Clip ->] Q -> DQ."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, clip_min, clip_max):
        s, z = scale.to(x.dtype), zero.to(x.dtype)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return (q - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero, qmin, qmax, clip_min, clip_max):
        if clip_min is not None:
            x = g.op("Clip", x, clip_min, clip_max)
        q = g.op("QuantizeLinear", x, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)


class _Dequantize(torch.autograd.Function):
    """``(codes - zero) * scale`` along ``axis``; exported as DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero, axis):
        shape = [1] * codes.dim()
        if scale.dim() > 0:
            shape[axis] = -1
        return (codes.float() - zero.float().reshape(shape)) * scale.float().reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero, axis):
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)


def _integral(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.equal(t, torch.round(t)):
        raise ExportError(f"{what} has non-integer zero-points; ONNX QuantizeLinear needs integers")
    return t


# ---- activations -------------------------------------------------------------------------------
class QDQActivation(nn.Module):
    """A static per-tensor activation quantizer as ``[Clip ->] QuantizeLinear -> DequantizeLinear``."""

    def __init__(self, act: ActQuant, name: str = "activation"):
        super().__init__()
        if act.n_sets != 1:
            raise ExportError(f"{name} holds {act.n_sets} per-step parameter sets; an ONNX graph has "
                              "one static set")
        self.bits, self.qmin, self.qmax = act.bits, act.qmin, act.qmax
        scale = act.scale.reshape(()).float()
        zero = _integral(act.zero_point.reshape(()).float(), name)
        self.register_buffer("scale", scale.clone())
        self.is_qdq = act.bits <= 8
        if not self.is_qdq:                  # e.g. a 16-bit softmax: float arithmetic, exact
            self.register_buffer("zero_point", zero.clone())
            self.clip_min = self.clip_max = None
            return
        lo, hi, dtype = (-128, 127, torch.int8) if self.qmin < 0 else (0, 255, torch.uint8)
        if not lo <= float(zero) <= hi:
            raise ExportError(f"{name}: zero-point {float(zero)} outside the {dtype} range")
        self.register_buffer("zero_point", zero.to(dtype))
        if (self.qmin, self.qmax) != (lo, hi):                # narrower grid: clip to it first
            self.register_buffer("clip_min", ((self.qmin - zero) * scale).float())
            self.register_buffer("clip_max", ((self.qmax - zero) * scale).float())
        else:
            self.clip_min = self.clip_max = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_qdq:
            s, z = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
            return (torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax) - z) * s
        return _QuantDequant.apply(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                   self.clip_min, self.clip_max)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=[{self.qmin}, {self.qmax}], {'QDQ' if self.is_qdq else 'float'}"


def export_activation(act: ActQuant | GroupActQuant | None, name: str):
    """The export module of a layer's input quantizer: a list of per-group quantizers (one for
    a plain quantizer) and the channel split (None without groups)."""
    if act is None:
        return [None], None
    if isinstance(act, GroupActQuant):
        return [QDQActivation(g, f"{name} (group {i})") for i, g in enumerate(act.groups)], act.split
    return [QDQActivation(act, name)], None


# ---- weights ---------------------------------------------------------------------------------
WEIGHT_FORMS = ("fp", "native", "int8", "int8+offset")


class ExportWeight(nn.Module):
    """A weight (or an input-channel slice of it) as the ONNX file stores it: see the module
    docstring for the forms. ``transpose``: a Linear's weight, stored ``[in, out]``.

    Buffers: ``codes`` (the integer initializer), ``scale`` (float32 per output channel),
    ``zero_point`` (uint8 / int8 per output channel); form ``int8+offset`` adds ``offset_scale``
    (``(128 - zero) * scale``; ``[1, out, 1, 1]`` for a conv), ``ones`` (the int8 window-sum kernel)
    and ``unit`` / ``unit_zero`` (its scale 1 and zero-point 0).
    """

    def __init__(self, packed: PackedWeight | None, fp: torch.Tensor | None, in_slice: slice,
                 int8_compute: bool, transpose: bool, groups: int = 1, name: str = "weight"):
        super().__init__()
        self.transpose = transpose
        self.axis = 1 if transpose else 0
        self.in_slice = in_slice
        if packed is None:
            w = fp.detach().float()[:, in_slice]
            self.form, self.bits, self.source_zero = "fp", 32, None
            self.register_buffer("weight", (w.t() if transpose else w).contiguous())
            return
        self.bits = packed.bits
        codes = packed.codes()[:, in_slice].to(torch.int16)           # [out, in_slice, ...]
        zero = _integral(packed.zero_point.float(), name).to(torch.int16)
        self.source_zero = zero                                         # for the check, not stored
        self._packed = [packed]                                         # a list: not a submodule
        zshape = (-1,) + (1,) * (codes.dim() - 1)
        diff = codes - zero.reshape(zshape)
        if not int8_compute:
            self.form = "native"
            lo, dtype = (-128, torch.int8) if packed.qmin < 0 else (0, torch.uint8)
            if int(zero.min()) < lo or int(zero.max()) > lo + 255:
                raise ExportError(f"{name}: zero-points outside the {dtype} range")
            stored, zp = codes.to(dtype), zero.to(dtype)
        elif int(diff.min()) >= -128 and int(diff.max()) <= 127:
            self.form = "int8"
            stored, zp = diff.to(torch.int8), torch.zeros_like(zero, dtype=torch.int8)
        else:
            if packed.qmin != 0 or packed.bits != 8 or groups != 1:
                raise ExportError(f"{name}: codes minus zero-points do not fit int8 ({packed.bits}-bit "
                                  f"grid from {packed.qmin}, {groups} conv groups)")
            self.form = "int8+offset"
            stored, zp = (codes - 128).to(torch.int8), torch.zeros_like(zero, dtype=torch.int8)
            offset_scale = (128 - zero).float() * packed.scale.float()
            self.register_buffer("offset_scale", offset_scale if transpose else offset_scale.reshape(1, -1, 1, 1))
            ones_shape = ((codes.shape[1], 1) if transpose else (1,) + tuple(codes.shape[1:]))
            self.register_buffer("ones", torch.ones(ones_shape, dtype=torch.int8))
            self.register_buffer("unit", torch.ones((), dtype=torch.float32))
            self.register_buffer("unit_zero", torch.zeros((), dtype=torch.int8))
        if transpose:
            stored = stored.t()
        self.register_buffer("codes", stored.contiguous())
        self.register_buffer("scale", packed.scale.float().clone())
        self.register_buffer("zero_point", zp.contiguous())

    def value(self) -> torch.Tensor:
        """The float weight the graph computes with (dequantized codes)."""
        if self.form == "fp":
            return self.weight
        return _Dequantize.apply(self.codes, self.scale, self.zero_point, self.axis)

    @property
    def reference_codes(self) -> torch.Tensor:
        """The runtime's integer codes of this weight (slice), int16."""
        return self._packed[0].codes()[:, self.in_slice].to(torch.int16)

    def reference_tensors(self) -> dict[str, torch.Tensor]:
        """What the other initializers of this weight must hold, from the runtime's packed weight:
        ``scale``, ``zero_point`` and (form ``int8+offset``) ``offset_scale``."""
        packed = self._packed[0]
        out = {"scale": packed.scale.float(),
               "zero_point": self.source_zero if self.form == "native" else torch.zeros_like(self.source_zero)}
        if self.form == "int8+offset":
            out["offset_scale"] = ((128 - self.source_zero).float() * packed.scale.float()).reshape(
                self.offset_scale.shape)
        return out

    def recover_codes(self, stored: torch.Tensor) -> torch.Tensor:
        """Our integer codes (``[out, in_slice, ...]``, int16) from a tensor holding what this
        weight's ``codes`` initializer holds: the export's exactness check inverts the form with
        the source zero-points."""
        stored = stored.to(torch.int16)
        stored = stored.t() if self.transpose else stored
        if self.form == "native":
            return stored
        if self.form == "int8":
            return stored + self.source_zero.reshape((-1,) + (1,) * (stored.dim() - 1))
        if self.form == "int8+offset":
            return stored + 128
        raise ValueError("a full-precision weight has no codes")

    def correction(self, x: torch.Tensor, conv: dict | None) -> torch.Tensor | None:
        """``offset_scale[o] * sum(x over o's input window)`` for form ``int8+offset``."""
        if self.form != "int8+offset":
            return None
        ones = _Dequantize.apply(self.ones, self.unit, self.unit_zero, 0)
        if conv is None:                                            # Linear: [..., in] @ [in, 1]
            return torch.matmul(x, ones) * self.offset_scale
        s = F.conv2d(x, ones, None, conv["stride"], conv["padding"], conv["dilation"], 1)
        return s * self.offset_scale

    def extra_repr(self) -> str:
        return f"form={self.form}, bits={self.bits}"


# ---- layers ----------------------------------------------------------------------------------
class _ExportLayer(nn.Module):
    """Common part of the export Conv2d / Linear: per input group, ``[QDQ(x)] -> op(x, DQ(W))``."""

    transpose = False

    def __init__(self, layer, name: str, int4_weights: bool = False):
        super().__init__()
        self.name = name
        acts, split = export_activation(layer.act, f"{name} input")
        self.split = split
        int8_compute = layer.act is not None and all(a.is_qdq for a in acts)
        if int4_weights and layer.qweight is not None and layer.qweight.bits <= 4:
            int8_compute = False                  # native codes, stored as ONNX 4-bit types
        n_in = layer.weight_shape[1]
        slices = [slice(0, n_in)] if split is None else [slice(0, split), slice(split, n_in)]
        groups = getattr(layer, "groups", 1)
        self.acts = nn.ModuleList([a if a is not None else nn.Identity() for a in acts])
        self.weights = nn.ModuleList([
            ExportWeight(layer.qweight, layer.weight, sl, int8_compute, self.transpose, groups,
                         f"{name} weight") for sl in slices])
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.split is None:
            return [x]
        return [x[:, : self.split], x[:, self.split:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for i, (act, w, xi) in enumerate(zip(self.acts, self.weights, self.inputs(x))):
            xi = act(xi)
            y = self.compute(xi, w, self.bias if i == 0 else None)
            corr = w.correction(xi, self.conv_args())
            if corr is not None:
                y = y + corr
            out = y if out is None else out + y
        return out

    def conv_args(self) -> dict | None:
        return None


class QDQConv2d(_ExportLayer):
    """A runtime ``QuantizedConv2d`` as ``[QDQ(x)] , DQ(W) -> Conv``."""

    def __init__(self, layer: QuantizedConv2d, name: str, int4_weights: bool = False):
        super().__init__(layer, name, int4_weights)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.groups = layer.groups

    def conv_args(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def compute(self, x, w: ExportWeight, bias):
        return F.conv2d(x, w.value(), bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(_ExportLayer):
    """A runtime ``QuantizedLinear`` as ``[QDQ(x)] , DQ(Wᵀ) -> MatMul (+ bias)``."""

    transpose = True

    def compute(self, x, w: ExportWeight, bias):
        y = torch.matmul(x, w.value())
        return y if bias is None else y + bias


def export_layer(layer, name: str, int4_weights: bool = False) -> _ExportLayer:
    """The export module of a runtime quantized layer (``int4_weights``: see
    :func:`tfmq.export.graph.graph_denoiser`)."""
    if isinstance(layer, QuantizedConv2d):
        return QDQConv2d(layer, name, int4_weights)
    if isinstance(layer, QuantizedLinear):
        return QDQLinear(layer, name, int4_weights)
    raise TypeError(f"{name}: not a runtime quantized layer ({type(layer).__name__})")
