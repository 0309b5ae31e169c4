"""The compact checkpoint: a diffusers pipeline folder whose denoiser weights are packed integers.

Layout of a checkpoint folder::

    model_index.json, scheduler/, vae/, text_encoder/, ...   the pipeline's own files
    unet/config.json                                         the denoiser's config (no FP weights)
    quantization_config.json                                 method, bits, policy, sampler, timesteps
    tfmq_denoiser.safetensors                                packed weight codes + scales, activation
                                                             parameters, the remaining FP tensors

The safetensors metadata hold the SHA-256 of every tensor's bytes (``tensor_sha256``), verified
on load: a checkpoint whose tensor data changed after it was written is refused.

The FP32 weights of quantized layers are not stored: their integer codes are, packed
(8-bit: a byte each; 4-bit: two a byte; other widths as a bit stream), with per-channel scales
and zero-points. Other tensors (biases, norms, layers the policy keeps) are stored in fp16 where
that is lossless, else in their own dtype. Reloading recomputes exactly the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .quant.model import WrapSpec, quant_layers, wrap_denoiser
from .quant.packing import pack, unpack
from .quant.quantizer import UniformQuantizer

FORMAT = "tfmq-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "quantization_config.json"
TENSOR_FILE = "tfmq_denoiser.safetensors"
CHECKSUMS_KEY = "tensor_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, another version, or another model."""


def denoiser_fingerprint(denoiser) -> str:
    """Hash of the denoiser's class, config and parameter shapes (of its FP structure: a denoiser
    whose temporal block was replaced by a feature cache keeps the hash it had before)."""
    fixed = getattr(denoiser, "tfmq_fp_fingerprint", None)
    if fixed is not None:
        return fixed
    cfg = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    shapes = []
    for mod_name, m in denoiser.named_modules():
        if isinstance(m, UniformQuantizer):
            continue
        for p_name, p in m.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}".replace(".layer.", ".")
            shapes.append((name, tuple(p.shape)))
    blob = json.dumps([type(denoiser).__name__, cfg, sorted(shapes)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp16 when that loses nothing, else unchanged."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point() and t.dtype != torch.float16:
        h = t.to(torch.float16)
        if torch.equal(h.to(t.dtype), t):
            return h
    return t


def _quantizer_names(denoiser) -> list[str]:
    return [n for n, m in denoiser.named_modules() if isinstance(m, UniformQuantizer)]


def checkpoint_tensors(denoiser) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and layer metadata of a frozen quantized denoiser."""
    layers = quant_layers(denoiser)
    skip = set()
    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for name, layer in layers.items():
        if layer.weight_quantizer is None:
            continue
        if not layer.frozen or layer.weight_codes is None:
            raise RuntimeError(f"layer {name} is not frozen; call tfmq.quant.model.freeze first")
        wq = layer.weight_quantizer
        codes = (layer.weight_codes.to(torch.int64) - wq.qmin)
        tensors[f"codes.{name}"] = pack(codes, wq.bits)
        meta[name] = {"shape": list(layer.weight.shape), "bits": wq.bits}
        skip.add(f"{name}.layer.weight")
    for key, value in denoiser.state_dict().items():
        if key in skip:
            continue
        tensors[f"state.{key}"] = _compact(value) if value.is_floating_point() else value.detach().cpu().contiguous()
    return tensors, meta


def tensor_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (as stored in the file), by name."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        out[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def verify_checksums(tensors: dict[str, torch.Tensor], meta: dict, path) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` are exactly those whose checksums the
    file's metadata recorded when it was written."""
    raw = meta.get(CHECKSUMS_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no tensor checksums (written by an older tfmq); its data "
                              f"cannot be verified: write the checkpoint again")
    try:
        expected = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: unreadable checksums ({exc})") from exc
    found = tensor_checksums(tensors)
    if set(expected) != set(found):
        diff = sorted(set(expected) ^ set(found))
        raise CheckpointError(f"{path} is corrupt: its tensors differ from those recorded "
                              f"({', '.join(diff[:5])})")
    bad = [k for k in sorted(expected) if expected[k] != found[k]]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{path} is corrupt: the data of {len(bad)} tensor(s) changed since it was "
                              f"written ({', '.join(bad[:5])}{more}); write the checkpoint again")


def save(pipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized pipeline as a compact checkpoint folder.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; the folder is written
    next to it first and moved into place at the end, so a failure leaves nothing half-written.
    """
    denoiser = pipe.unet
    info = getattr(denoiser, "tfmq_info", None)
    if info is None:
        raise ValueError("this pipeline is not quantized (use tfmq.quantize first)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or allow overwriting")
    tmp = out_dir.with_name(out_dir.name + ".tfmq-partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        pipe.save_config(str(tmp))                       # model_index.json
        for comp_name, comp in pipe.components.items():
            if comp is None:
                continue
            target = tmp / comp_name
            if comp is denoiser:
                denoiser.save_config(str(target))
            elif hasattr(comp, "save_pretrained"):
                comp.save_pretrained(str(target))
        tensors, layer_meta = checkpoint_tensors(denoiser)
        from .calib.finite import check_finite_checkpoint
        check_finite_checkpoint(tensors)                 # never write a non-finite parameter
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layer_meta),
            CHECKSUMS_KEY: json.dumps(tensor_checksums(tensors))})
        cfg = dict(info)
        cfg.update({"format": FORMAT, "format_version": FORMAT_VERSION, "tfmq_version": __version__,
                    "denoiser_component": "unet", "denoiser_class": type(denoiser).__name__,
                    "denoiser_fingerprint": denoiser_fingerprint(denoiser)})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(ckpt_dir: str | Path) -> dict:
    """The checkpoint's quantization_config.json, with its format checked."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir} is not a tfmq checkpoint (no {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tfmq checkpoint (format {cfg.get('format')!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {cfg.get('format_version')!r}; this tfmq "
                              f"({__version__}) reads version {FORMAT_VERSION}")
    return cfg


def wrap_spec_from_config(cfg: dict) -> WrapSpec:
    return WrapSpec(**cfg["wrap_spec"])


def apply_checkpoint(denoiser, ckpt_dir: str | Path, cfg: dict | None = None) -> None:
    """Quantize ``denoiser`` (an FP denoiser of the same architecture) in place with the
    checkpoint's structure and tensors. Raises CheckpointError for another model or a corrupt file."""
    ckpt_dir = Path(ckpt_dir)
    cfg = cfg or read_config(ckpt_dir)
    if type(denoiser).__name__ != cfg["denoiser_class"]:
        raise CheckpointError(f"checkpoint is for a {cfg['denoiser_class']}, not a {type(denoiser).__name__}")
    if denoiser_fingerprint(denoiser) != cfg["denoiser_fingerprint"]:
        raise CheckpointError("checkpoint was made for another model (config or parameter shapes differ)")
    try:
        tensors = load_file(str(ckpt_dir / TENSOR_FILE))
        from safetensors import safe_open
        with safe_open(str(ckpt_dir / TENSOR_FILE), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt_dir / TENSOR_FILE} is corrupt or unreadable: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{TENSOR_FILE} has format {meta.get('format')!r} "
                              f"version {meta.get('format_version')!r}; expected {FORMAT} {FORMAT_VERSION}")
    verify_checksums(tensors, meta, ckpt_dir / TENSOR_FILE)
    layer_meta = json.loads(meta["layers"])
    wrap_denoiser(denoiser, wrap_spec_from_config(cfg))
    if cfg.get("temporal", {}).get("mode") == "cache":        # the TIB is replaced by its table
        from .models.temporal_cache import install_from_info
        install_from_info(denoiser, cfg["temporal"])
    modules = dict(denoiser.named_modules())
    # quantizer parameters are created lazily: give them their stored shapes first
    for qname in _quantizer_names(denoiser):
        q = modules[qname]
        for attr in ("scale", "zero_point"):
            key = f"state.{qname}.{attr}"
            if key not in tensors:
                raise CheckpointError(f"checkpoint lacks {qname}.{attr}: it does not match this model")
            t = tensors[key].float()
            if attr == "scale":
                q.scale.data = t.clone()
            else:
                q.zero_point = t.clone()
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    layers = quant_layers(denoiser)
    expected_missing = {f"{n}.layer.weight" for n, l in layers.items() if l.weight_quantizer is not None}
    ref = denoiser.state_dict()
    for k, v in state.items():
        if k in ref and ref[k].is_floating_point():
            state[k] = v.to(ref[k].dtype)
    result = denoiser.load_state_dict(state, strict=False)
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint does not match this model: missing "
                              f"{sorted(set(result.missing_keys) - expected_missing)[:5]}, unexpected "
                              f"{sorted(result.unexpected_keys)[:5]}")
    for name, layer in layers.items():
        if layer.weight_quantizer is None:
            continue
        m = layer_meta.get(name)
        if m is None or f"codes.{name}" not in tensors or m["shape"] != list(layer.weight.shape):
            raise CheckpointError(f"checkpoint has no matching weight codes for layer {name}")
        wq = layer.weight_quantizer
        numel = int(torch.tensor(m["shape"]).prod())
        try:
            codes = unpack(tensors[f"codes.{name}"], m["bits"], numel).reshape(m["shape"]) + wq.qmin
        except ValueError as exc:
            raise CheckpointError(f"weight codes of {name} are corrupt: {exc}") from exc
        codes = codes.to(layer.weight.device, torch.float32)
        w = wq.dequantize(codes).to(layer.weight.dtype)
        layer.set_codes(codes.to(torch.int16), w)
    denoiser.tfmq_info = {k: v for k, v in cfg.items()
                          if k not in ("format", "format_version", "tfmq_version", "denoiser_component",
                                       "denoiser_class", "denoiser_fingerprint")}
    from .calib.fsc import attach_from_info
    attach_from_info(denoiser)                                  # per-step (FSC) parameter selection


def checkpoint_size(ckpt_dir: str | Path) -> int:
    """Bytes of the quantized denoiser's files (tensors + configs)."""
    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / TENSOR_FILE, ckpt_dir / CONFIG_FILE, ckpt_dir / "unet" / "config.json"]
    return sum(f.stat().st_size for f in files if f.exists())
