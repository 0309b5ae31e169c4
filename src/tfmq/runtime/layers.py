"""Deployable quantized modules: packed weights, static activation parameters, no FP copy.

:class:`QuantizedLinear` / :class:`QuantizedConv2d` hold a :class:`~tfmq.runtime.packed.PackedWeight`
(or, for a layer whose weight the policy keeps in full precision, that weight), the bias, and an
:class:`ActQuant` for the input (or none). :class:`AttentionActQuant` holds the static parameters of
an attention's q / k / v inputs and softmax output. How a layer computes is its ``backend``
(:mod:`tfmq.runtime.backends`); every backend computes what the calibrated fake-quant model did.

Activation parameters with one set per calibrated step (FSC) are indexed with the denoiser's
:class:`~tfmq.runtime.steps.StepIndex` buffer: tensor indexing, no Python state per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.layers import QuantAttnProcessor
from .backends import get_backend
from .guards import register_frozen
from .packed import PackedWeight
from .steps import StepIndex


class ActQuant(nn.Module):
    """Static per-tensor activation quantization: ``q = clamp(round(x / s) + z, qmin, qmax)``,
    computed value ``(q - z) * s``. ``scale`` / ``zero_point``: float32 ``[n_sets]``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
                 steps: StepIndex | None = None):
        super().__init__()
        scale, zero_point = scale.reshape(-1).float(), zero_point.reshape(-1).float()
        if scale.shape != zero_point.shape or scale.numel() < 1:
            raise ValueError(f"activation scale {tuple(scale.shape)} and zero-point "
                             f"{tuple(zero_point.shape)} must be two equal 1-d tensors")
        if not torch.isfinite(scale).all() or not torch.isfinite(zero_point).all() or (scale <= 0).any():
            raise ValueError("activation quantization parameters must be finite with positive scales")
        if scale.numel() > 1 and (steps is None or len(steps) != scale.numel()):
            raise ValueError(f"{scale.numel()} activation parameter sets need a step index of as many steps")
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        register_frozen(self, "scale", scale)
        register_frozen(self, "zero_point", zero_point)
        self._steps = [steps] if scale.numel() > 1 else []   # a list: not a submodule

    @property
    def n_sets(self) -> int:
        return self.scale.numel()

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def step_index(self) -> torch.Tensor | None:
        """The denoiser's step-index buffer that selects this quantizer's parameter set (a 0-d long
        tensor), or None when there is one set."""
        return self._steps[0].index if self._steps else None

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point of the current step (1-element float32 tensors)."""
        if self._steps:
            i = self._steps[0].index.reshape(1)
            return self.scale.index_select(0, i), self.zero_point.index_select(0, i)
        return self.scale[:1], self.zero_point[:1]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (a float tensor of x's dtype holding integers)."""
        s, z = self.params()
        s, z = s.to(x.dtype), z.to(x.dtype)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize in ``x``'s dtype, operation for operation as the fake-quant
        calibration quantizer computes it."""
        s, z = self.params()
        s, z = s.to(x.dtype), z.to(x.dtype)
        q = torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def extra_repr(self) -> str:
        sets = f", sets={self.n_sets}" if self.n_sets > 1 else ""
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}{sets}"


class GroupActQuant(nn.Module):
    """Separate activation parameters for two channel groups (Q-Diffusion's split shortcut):
    channels ``[:split]`` and ``[split:]`` of dimension 1."""

    def __init__(self, groups: list[ActQuant], split: int):
        super().__init__()
        if len(groups) != 2:
            raise ValueError("a split activation quantizer has two groups")
        self.split = int(split)
        self.groups = nn.ModuleList(groups)

    @property
    def bits(self) -> int:
        return self.groups[0].bits

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : self.split], x[:, self.split:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(c) for q, c in zip(self.groups, self.chunks(x))], dim=1)


class _QuantizedLayer(nn.Module):
    """Common part of the quantized Linear / Conv2d."""

    kind = ""

    def __init__(self, weight: PackedWeight | torch.Tensor, bias: torch.Tensor | None,
                 act: ActQuant | GroupActQuant | None, backend: str = "reference", compact: bool = False):
        super().__init__()
        if isinstance(weight, PackedWeight):
            self.qweight = weight
            self.weight = None
        else:
            self.qweight = None
            if compact:      # a full-precision weight kept in a narrower storage dtype: a buffer, so
                # the model's dtype (its parameters') stays the compute dtype
                self.register_buffer("weight", weight.detach())
            else:
                self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.act = act
        self.backend = backend
        #: a full-precision layer calibration never wrapped, held here compactly (its checkpoint
        #: tensors are named ``<name>.weight`` / ``<name>.bias``, not ``<name>.layer.*``)
        self.unwrapped = False
        self.prepared: dict = {}        # backend-specific derived tensors (e.g. int8 kernel layouts)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.qweight.shape if self.qweight is not None else tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the FP weight parameter or the bias; float32 when the layer has
        neither; a compact weight buffer is the storage dtype, not the compute one)."""
        if isinstance(self.weight, nn.Parameter):
            return self.weight.dtype
        return self.bias.dtype if self.bias is not None else torch.float32

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with, expanded from its packed codes (or the FP one)."""
        if self.qweight is not None:
            return self.qweight.dequantize(dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_backend(self.backend).run(self, x)

    def extra_repr(self) -> str:
        w = f"w{self.qweight.bits}" if self.qweight is not None else "w-fp"
        a = f"a{self.act.bits}" if self.act is not None else "a-fp"
        return f"{self.kind} {tuple(self.weight_shape)}, {w}{a}, backend={self.backend}"


class QuantizedLinear(_QuantizedLayer):
    """A Linear layer with a packed quantized weight and a static input quantizer."""

    kind = "linear"

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class QuantizedConv2d(_QuantizedLayer):
    """A Conv2d layer with a packed quantized weight and a static input quantizer."""

    kind = "conv"

    def __init__(self, weight, bias, act, stride, padding, dilation, groups, padding_mode="zeros",
                 backend: str = "reference", compact: bool = False):
        super().__init__(weight, bias, act, backend, compact)
        if padding_mode != "zeros":
            raise ValueError(f"quantized conv supports zero padding only, got {padding_mode!r}")
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)

    def compute(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None if self.bias is None else self.bias.to(x.dtype), self.stride,
                        self.padding, self.dilation, self.groups)


class AttentionActQuant(nn.Module):
    """Static parameters of one attention's quantized matmul inputs: q and k (of q·kᵀ), the
    softmax output and v (of softmax·v). Attached as ``attn.tfmq_attn``; the attention processor
    (:class:`RuntimeAttnProcessor`) calls them."""

    def __init__(self, q: ActQuant, k: ActQuant, v: ActQuant, softmax: ActQuant):
        super().__init__()
        self.q, self.k, self.v, self.softmax = q, k, v, softmax
        self.backend = "reference"

    def quantizers(self) -> dict[str, ActQuant]:
        return {"q": self.q, "k": self.k, "v": self.v, "softmax": self.softmax}


def runtime_layers(model: nn.Module) -> dict[str, _QuantizedLayer]:
    """Name -> quantized Linear / Conv2d of a converted denoiser, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantizedLayer)}


class RuntimeAttnProcessor(QuantAttnProcessor):
    """The attention of a converted denoiser: explicit matmuls with q, k, v and the softmax
    output quantized as calibrated (exactly the fake-quant computation), except under the
    ``w8a8`` backend, where q, k, v are quantized as calibrated and then
    - probabilities of 16 bits or more, no upcasting: one fused ``scaled_dot_product_attention``
      (flash attention) whose probabilities are not rounded to the 16-bit grid (a difference of at
      most half a 16-bit step per probability; the benchmark states the measured output difference);
    - fewer bits, no attention mask, head dims <= 256: one fused kernel that rounds q, k, v as
      it loads them and the probabilities to their calibrated grids without writing the score or
      probability matrices
      (:func:`tfmq.runtime.kernels.attention.quant_attention`: the same arithmetic in the model
      dtype, upcast as the attention asks, other summation order); with a mask or wider heads
      the explicit matmuls."""

    @staticmethod
    def project(attn, hidden_states, encoder_hidden_states):
        """As the fake-quant processor's, but projections of one input fused by the ``w8a8``
        backend (:mod:`tfmq.runtime.projections`) run as one GEMM."""
        fused = getattr(attn, "_tfmq_fused", None)
        if fused is not None and fused.kind == "qkv" and encoder_hidden_states is None:
            query, key, value = fused(hidden_states)
            return query, key, value
        if fused is not None and fused.kind == "kv" and encoder_hidden_states is not None:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = fused(encoder_hidden_states)
            return attn.to_q(hidden_states), key, value
        return QuantAttnProcessor.project(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def path(attn) -> str:
        """How this attention computes, as far as its configuration decides: ``"flash"``,
        ``"fused"`` (the quantized-probability kernel; calls with an attention mask or a head
        wider than the kernel takes run ``"explicit"`` instead) or ``"explicit"``."""
        from .kernels.attention import MAX_HEAD_DIM
        quant = getattr(attn, "tfmq_attn", None)
        if quant is None or quant.backend != "w8a8":
            return "explicit"
        if quant.softmax.bits >= 16:
            return "explicit" if attn.upcast_attention or attn.upcast_softmax else "flash"
        head_dim = max(attn.inner_dim, getattr(attn, "inner_kv_dim", attn.inner_dim)) // attn.heads
        return "fused" if head_dim <= MAX_HEAD_DIM else "explicit"

    @staticmethod
    def attend(attn, query, key, value, attention_mask):
        from .kernels import attention as fused_attention
        path = RuntimeAttnProcessor.path(attn)
        if path == "fused" and (attention_mask is not None or not fused_attention.supports(query, key, value)):
            path = "explicit"
        if path == "explicit":
            return QuantAttnProcessor.attend(attn, query, key, value, attention_mask)
        quant = attn.tfmq_attn
        sm = quant.softmax
        if path == "flash":
            query, key, value = quant.q(query), quant.k(key), quant.v(value)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
            return out, query.dtype
        step = sm.step_index                  # the kernel reads the grids' tables at the step index

        def tables(aq):
            return (aq.scale, aq.zero_point) if step is not None else (aq.scale[:1], aq.zero_point[:1])
        inputs = (quant.q, quant.k, quant.v)
        # q, k, v rounded in the kernel when their grids are one and their parameter sets follow the
        # softmax's (calibration gives them all per-step sets, or none); else rounded here first
        in_kernel = (len({(a.qmin, a.qmax) for a in inputs}) == 1
                     and all(a.n_sets == sm.n_sets for a in inputs))
        if in_kernel:
            qkv = [t for a in inputs for t in tables(a)]
        else:
            qkv = []
            query, key, value = quant.q(query), quant.k(key), quant.v(value)
        if torch.compiler.is_compiling():     # opaque to the compiler, as the GEMMs are
            from .kernels.ops import quant_attention
        else:
            quant_attention = fused_attention.quant_attention
        return (quant_attention(query, key, value, float(attn.scale), *tables(sm), sm.qmin, sm.qmax, step,
                                bool(attn.upcast_attention), qkv, quant.q.qmin, quant.q.qmax), query.dtype)
