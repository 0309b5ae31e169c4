"""Between the calibrated (fake-quant) model, the checkpoint tensors and the runtime modules.

One representation, three places: the checkpoint's tensors (packed codes ``codes.<layer>``,
everything else under ``state.<key>`` with the fake-quant model's names) are what
:func:`build_runtime` turns into runtime modules, what :func:`fakequant_tensors` reads from a
frozen calibrated model and what :func:`runtime_tensors` writes back from runtime modules, so
``save -> load -> save`` reproduces the same file.

:func:`convert` turns a frozen calibrated denoiser into runtime modules in place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.layers import AttentionQuantizers, QuantLayer
from ..quant.packing import pack
from .selection import set_backend
from .layers import (ActQuant, AttentionActQuant, GroupActQuant, QuantizedConv2d, QuantizedLinear,
                     RuntimeAttnProcessor, runtime_layers)
from .packed import PackedWeight
from .steps import StepIndex, attach_step_index, detach_step_index
from .temporal_cache import install_from_info


class ConversionError(ValueError):
    """Tensors that do not describe a quantized model of this architecture."""


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp16 when that loses nothing (floating tensors), else unchanged; on the CPU."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point() and t.dtype != torch.float16:
        h = t.to(torch.float16)
        if torch.equal(h.to(t.dtype), t):
            return h
    return t


# ---- calibrated (fake-quant) model -> tensors ------------------------------------------------------
def fakequant_tensors(denoiser: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Checkpoint tensors and layer metadata of a frozen fake-quant denoiser."""
    skip, tensors, meta = set(), {}, {}
    for name, layer in denoiser.named_modules():
        if not isinstance(layer, QuantLayer) or layer.weight_quantizer is None:
            continue
        if not layer.frozen or layer.weight_codes is None:
            raise RuntimeError(f"layer {name} is not frozen; call tfmq.quant.model.freeze first")
        wq = layer.weight_quantizer
        tensors[f"codes.{name}"] = pack(layer.weight_codes.to(torch.int64) - wq.qmin, wq.bits)
        meta[name] = {"shape": list(layer.weight.shape), "bits": wq.bits}
        skip.add(f"{name}.layer.weight")
    for key, value in denoiser.state_dict().items():
        if key not in skip:
            tensors[f"state.{key}"] = _compact(value)
    return tensors, meta


# ---- runtime modules -> tensors ------------------------------------------------------------------
def _act_state(prefix: str, act: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(act, GroupActQuant):
        out = {}
        for i, g in enumerate(act.groups):
            out.update(_act_state(f"{prefix}.groups.{i}", g))
        return out
    return {f"{prefix}.scale": act.scale, f"{prefix}.zero_point": act.zero_point,
            f"{prefix}.initialized": torch.ones(act.n_sets, dtype=torch.bool)}


def runtime_tensors(denoiser: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Checkpoint tensors and layer metadata of a converted (runtime) denoiser: the same names
    and values :func:`fakequant_tensors` gives for the calibrated model it came from."""
    tensors, meta, owned = {}, {}, set()
    layers = runtime_layers(denoiser)
    for name, layer in layers.items():
        owned.add(name + ".")
        state: dict[str, torch.Tensor] = {}
        if layer.qweight is not None:
            q = layer.qweight
            tensors[f"codes.{name}"] = q.packed.detach().cpu()
            meta[name] = {"shape": list(q.shape), "bits": q.bits}
            pshape = (1, q.shape[0]) + (1,) * (len(q.shape) - 1)
            state[f"{name}.weight_quantizer.scale"] = q.scale.reshape(pshape)
            state[f"{name}.weight_quantizer.zero_point"] = q.zero_point.reshape(pshape)
            state[f"{name}.weight_quantizer.initialized"] = torch.ones(1, dtype=torch.bool)
        prefix = f"{name}." if layer.unwrapped else f"{name}.layer."
        if layer.qweight is None:
            state[f"{prefix}weight"] = layer.weight
        if layer.bias is not None:
            state[f"{prefix}bias"] = layer.bias
        if layer.act is not None:
            state.update(_act_state(f"{name}.act_quantizer", layer.act))
        tensors.update({f"state.{k}": _compact(v) for k, v in state.items()})
    for name, m in denoiser.named_modules():
        if isinstance(m, AttentionActQuant):
            owned.add(name + ".")
            for qn, aq in m.quantizers().items():
                tensors.update({f"state.{k}": _compact(v) for k, v in _act_state(f"{name}.{qn}", aq).items()})
    for key, value in denoiser.state_dict().items():
        if not key.startswith(tuple(owned)):
            tensors[f"state.{key}"] = _compact(value)
    return tensors, meta


# ---- tensors -> runtime modules --------------------------------------------------------------------
def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class _Tensors:
    """The checkpoint's ``state.*`` tensors, tracking which were used."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        self.codes = {k[len("codes."):]: v for k, v in tensors.items() if k.startswith("codes.")}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"the checkpoint lacks {key}: it does not match this model")
        self.used.add(key)
        return self.state[key]

    def take_prefix(self, prefix: str) -> None:
        self.used.update(k for k in self.state if k.startswith(prefix))

    def unused(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k not in self.used}


def _act_from(t: _Tensors, prefix: str, bits: int, symmetric: bool, steps: StepIndex | None,
              split: int | None):
    if t.has(f"{prefix}.groups.0.scale"):
        if split is None:
            raise ConversionError(f"{prefix} has split (grouped) parameters but the checkpoint's "
                                  "structure names no split for it")
        groups = [_act_from(t, f"{prefix}.groups.{i}", bits, symmetric, steps, None) for i in range(2)]
        t.take_prefix(prefix + ".")
        return GroupActQuant(groups, split)
    scale, zero = t.take(f"{prefix}.scale").float(), t.take(f"{prefix}.zero_point").float()
    t.take_prefix(prefix + ".")
    try:
        return ActQuant(scale, zero, bits, symmetric, steps if scale.numel() > 1 else None)
    except ValueError as exc:
        raise ConversionError(f"{prefix}: {exc}") from exc


def build_runtime(denoiser: nn.Module, tensors: dict[str, torch.Tensor], layer_meta: dict,
                  spec: dict, info: dict, backend: str = "reference", compact_fp: bool = False) -> nn.Module:
    """Turn ``denoiser`` (the FP architecture; its parameters may be on the meta device, i.e.
    never materialised) into runtime modules holding the checkpoint ``tensors`` (in place).

    ``spec``: the quantized structure (``WrapSpec`` as a dict: bits, symmetry, splits);
    ``info``: the checkpoint's quantization info (timesteps, sampler, fsc, temporal).
    ``compact_fp``: the weights of the Linear / Conv2d layers kept in full precision stay in the
    narrower dtype the checkpoint stores them in (float16 where the model computes in float32)
    and are widened when the layer runs, as runtime layers with a full-precision weight: the same
    numbers (widening is exact either way), half the memory of those layers.
    """
    from diffusers.models.attention_processor import Attention
    dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)
    t = _Tensors(tensors)
    if info.get("temporal", {}).get("mode") == "cache" and getattr(denoiser, "tfmq_temporal_cache", None) is None:
        install_from_info(denoiser, info["temporal"])
    steps = None
    if info.get("fsc", {}).get("n_sets", 1) > 1:
        steps = attach_step_index(denoiser, info["timesteps"], info["sampler"])
    splits = spec.get("splits") or {}
    w_sym, a_sym = bool(spec.get("weight_symmetric")), bool(spec.get("act_symmetric"))
    modules = dict(denoiser.named_modules())
    width = torch.empty((), dtype=dtype).element_size()

    def narrower(key: str) -> bool:
        w = t.state.get(key)
        return compact_fp and w is not None and w.is_floating_point() and w.element_size() < width

    for name, m in modules.items():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        coded = name in t.codes
        wrapped = coded or t.has(f"{name}.layer.weight")
        fp_key = f"{name}.layer.weight" if t.has(f"{name}.layer.weight") else f"{name}.weight"
        compact = not coded and narrower(fp_key)
        if not wrapped and not (compact and (isinstance(m, nn.Linear) or m.padding_mode == "zeros")):
            continue                        # not a wrapped layer (nor a plain FP one to hold compactly)
        if coded:
            lm = layer_meta.get(name)
            if lm is None or list(lm["shape"]) != list(m.weight.shape):
                raise ConversionError(f"checkpoint has no matching weight codes for layer {name}")
            bits = int(lm["bits"])
            packed = t.codes[name]
            expected = (math.prod(lm["shape"]) * bits + 7) // 8
            if packed.dtype != torch.uint8 or packed.numel() != expected:
                raise ConversionError(f"weight codes of {name} are corrupt: {packed.numel()} bytes of "
                                      f"{packed.dtype}, {expected} uint8 expected")
            qmin = -(1 << (bits - 1)) if w_sym else 0
            weight = PackedWeight(packed, t.take(f"{name}.weight_quantizer.scale"),
                                  t.take(f"{name}.weight_quantizer.zero_point"), tuple(lm["shape"]), bits, qmin)
            t.take_prefix(f"{name}.weight_quantizer.")
        else:
            weight = t.take(fp_key)
            weight = weight if compact else weight.to(dtype)
        prefix = f"{name}.layer." if wrapped else f"{name}."
        bias = t.take(f"{prefix}bias").to(dtype) if m.bias is not None else None
        act = None
        if t.has(f"{name}.act_quantizer.scale") or t.has(f"{name}.act_quantizer.groups.0.scale"):
            act = _act_from(t, f"{name}.act_quantizer", int(spec["abits"]), a_sym, steps, splits.get(name))
        if isinstance(m, nn.Conv2d):
            new = QuantizedConv2d(weight, bias, act, m.stride, m.padding, m.dilation, m.groups, m.padding_mode,
                                  compact=compact)
        else:
            new = QuantizedLinear(weight, bias, act, compact=compact)
        new.unwrapped = not wrapped
        _set_submodule(denoiser, name, new)
    for name, m in modules.items():
        if not isinstance(m, Attention):
            continue
        m.set_processor(RuntimeAttnProcessor())
        if t.has(f"{name}.tfmq_attn.q.scale"):
            abits, sbits = int(spec["abits"]), int(spec["softmax_bits"])
            parts = {qn: _act_from(t, f"{name}.tfmq_attn.{qn}", sbits if qn == "softmax" else abits,
                                   False if qn == "softmax" else a_sym, steps, None)
                     for qn in ("q", "k", "v", "softmax")}
            if "tfmq_attn" in m._modules:
                del m._modules["tfmq_attn"]
            m.add_module("tfmq_attn", AttentionActQuant(**parts))
    rest = {k: v for k, v in t.unused().items()}
    own = denoiser.state_dict(keep_vars=True)
    unexpected = sorted(k for k in rest if k not in own)
    if unexpected:
        raise ConversionError(f"the checkpoint has tensors this model lacks, e.g. {unexpected[:5]}")
    fixed = {}
    for k, v in rest.items():
        ref = own[k]
        fixed[k] = v.to(ref.dtype) if ref.is_floating_point() and v.is_floating_point() else v.to(ref.dtype)
    denoiser.load_state_dict(fixed, strict=False, assign=True)
    left = [n for n, p in list(denoiser.named_parameters()) + list(denoiser.named_buffers()) if p.is_meta]
    if left:
        raise ConversionError(f"the checkpoint does not hold {len(left)} tensor(s) of this model, e.g. {left[:5]}")
    for p in denoiser.parameters():
        p.requires_grad_(False)
    if backend != "reference":
        set_backend(denoiser, backend)
    else:
        denoiser.tfmq_backend = "reference"
    return denoiser


# ---- frozen calibrated model -> runtime modules, in place --------------------------------------------
def _unwrap_fakequant(denoiser: nn.Module) -> None:
    """Put the plain FP modules back in place of the fake-quant wrappers (their weights are the
    frozen dequantized ones; the runtime build replaces them next)."""
    for name, m in list(denoiser.named_modules()):
        if isinstance(m, QuantLayer):
            _set_submodule(denoiser, name, m.layer)
        elif isinstance(getattr(m, "tfmq_attn", None), AttentionQuantizers):
            del m._modules["tfmq_attn"]
    detach_step_index(denoiser)
    denoiser.tfmq_spec = None


def convert(denoiser: nn.Module, backend: str = "reference") -> nn.Module:
    """Turn a calibrated, frozen fake-quant denoiser (after :func:`tfmq.quantize`) into runtime
    modules computing with ``backend`` (in place; returns it). The FP copies of quantized
    weights are dropped; the result computes exactly what the fake-quant model did (backend
    ``reference``)."""
    info = getattr(denoiser, "tfmq_info", None)
    spec = getattr(denoiser, "tfmq_spec", None)
    if runtime_layers(denoiser):
        return set_backend(denoiser, backend) if backend != getattr(denoiser, "tfmq_backend", None) else denoiser
    if info is None or spec is None:
        raise ValueError("this denoiser is not a calibrated quantized model (run tfmq.quantize first)")
    from dataclasses import asdict
    tensors, meta = fakequant_tensors(denoiser)
    device = next(denoiser.parameters()).device
    if getattr(denoiser, "tfmq_fp_fingerprint", None) is None:
        from ..models.fingerprint import denoiser_fingerprint
        denoiser.tfmq_fp_fingerprint = denoiser_fingerprint(denoiser)
    _unwrap_fakequant(denoiser)
    build_runtime(denoiser, {k: v.to(device) for k, v in tensors.items()}, meta, asdict(spec), info, "reference")
    denoiser.to(device)
    if backend != "reference":
        set_backend(denoiser, backend)
    return denoiser


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a backend's prepared data (nested dicts / lists / tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def runtime_nbytes(denoiser: nn.Module) -> dict[str, int]:
    """Resident bytes of a converted denoiser: packed weights (codes + scales), activation
    parameters and everything else (FP layers, biases, norms, caches)."""
    packed = sum(m.nbytes() for m in denoiser.modules() if isinstance(m, PackedWeight))
    act = sum(t.numel() * t.element_size() for m in denoiser.modules() if isinstance(m, ActQuant)
              for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    total = sum(t.numel() * t.element_size() for t in list(denoiser.parameters()) + list(denoiser.buffers()))
    prepared = sum(_tensor_bytes(layer.prepared) for layer in runtime_layers(denoiser).values())
    return {"packed_weights": packed, "activation_params": act, "other": total - packed - act,
            "backend_extra": prepared, "total": total + prepared}
