"""The compact checkpoint: a diffusers pipeline folder whose denoiser weights are packed integers.

Layout of a checkpoint folder::

    model_index.json, scheduler/, vae/, text_encoder/, ...   the pipeline's own files
    <denoiser>/config.json                                   the denoiser's config (no FP weights)
    quantization_config.json                                 method, bits, policy, sampler, timesteps
    tfmq_denoiser.safetensors                                packed weight codes + scales, activation
                                                             parameters, the remaining FP tensors

The safetensors metadata hold the SHA-256 of every tensor's bytes (``tensor_sha256``), verified
on load: a checkpoint whose tensor data changed after it was written is refused.

The FP32 weights of quantized layers are not stored: their integer codes are, packed
(8-bit: a byte each; 4-bit: two a byte; other widths as a bit stream), with per-channel scales
and zero-points. Other tensors (biases, norms, layers the policy keeps) are stored in fp16 where
that is lossless, else in their own dtype.

Loading builds the runtime modules (:mod:`tfmq.runtime`) straight from these tensors: the
denoiser's architecture is created without allocating its FP weights, the quantized layers keep
their codes packed, and the result computes exactly what the calibrated model did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .finite import check_finite_checkpoint
from .folders import refuse_nonempty, written_whole
from .models.adapter import denoiser_component
from .models.fingerprint import denoiser_fingerprint  # noqa: F401  (re-exported)
from .runtime.convert import ConversionError, build_runtime, fakequant_tensors, runtime_tensors
from .runtime.layers import runtime_layers

FORMAT = "tfmq-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "quantization_config.json"
TENSOR_FILE = "tfmq_denoiser.safetensors"
CHECKSUMS_KEY = "tensor_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, another version, or another model."""


def checkpoint_tensors(denoiser) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and layer metadata of a quantized denoiser: a frozen calibrated (fake-quant) one or
    a converted runtime one (the same tensors for the same model)."""
    if runtime_layers(denoiser):
        return runtime_tensors(denoiser)
    return fakequant_tensors(denoiser)


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
    component = denoiser_component(pipe)
    denoiser = getattr(pipe, component)
    info = getattr(denoiser, "tfmq_info", None)
    if info is None:
        raise ValueError("this pipeline is not quantized (use tfmq.quantize first)")
    if getattr(getattr(denoiser, "tfmq_temporal_cache", None), "derived", False):
        raise ValueError("this denoiser's temporal block was replaced by a table at load (temporal_table=True): "
                         "its layers are gone, so it cannot be written as a checkpoint; save the "
                         "checkpoint loaded without the table")
    out_dir = Path(out_dir)
    refuse_nonempty(out_dir, overwrite)
    with written_whole(out_dir) as tmp:
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
        check_finite_checkpoint(tensors)                 # never write a non-finite parameter
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layer_meta),
            CHECKSUMS_KEY: json.dumps(tensor_checksums(tensors))})
        cfg = dict(info)
        cfg.update({"format": FORMAT, "format_version": FORMAT_VERSION, "tfmq_version": __version__,
                    "denoiser_component": component, "denoiser_class": type(denoiser).__name__,
                    "denoiser_fingerprint": denoiser_fingerprint(denoiser)})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
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


def read_tensors(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors (no pickle: safetensors) and its layer metadata, format checked."""
    path = Path(ckpt_dir) / TENSOR_FILE
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir} has no {TENSOR_FILE}: the checkpoint is incomplete")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        layer_meta = json.loads(meta.get("layers", "null"))
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt or unreadable: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{TENSOR_FILE} has format {meta.get('format')!r} "
                              f"version {meta.get('format_version')!r}; expected {FORMAT} {FORMAT_VERSION}")
    verify_checksums(tensors, meta, path)
    if not isinstance(layer_meta, dict):
        raise CheckpointError(f"{path} has no layer metadata: it is corrupt")
    return tensors, layer_meta


def config_info(cfg: dict) -> dict:
    """The quantization info of a checkpoint config (``denoiser.tfmq_info``)."""
    return {k: v for k, v in cfg.items()
            if k not in ("format", "format_version", "tfmq_version", "denoiser_component",
                         "denoiser_class", "denoiser_fingerprint")}


def load_denoiser(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, backend: str = "reference",
                  device: str | torch.device = "cpu", cfg: dict | None = None, compact_fp: bool = False):
    """The checkpoint's quantized denoiser as runtime modules (``backend``), on ``device``.
    ``compact_fp``: full-precision Linear / Conv2d weights stay in the checkpoint's narrower
    storage dtype until they run (see :func:`tfmq.runtime.convert.build_runtime`).

    The architecture is built from its config with no FP weights allocated (the parameters live
    on the meta device until the checkpoint's tensors are assigned), so the peak memory is the
    checkpoint's. Raises :class:`CheckpointError` for a corrupt checkpoint or another model."""
    import diffusers
    from accelerate import init_empty_weights
    ckpt_dir = Path(ckpt_dir)
    cfg = cfg or read_config(ckpt_dir)
    cls = getattr(diffusers, cfg.get("denoiser_class", ""), None)
    if cls is None:
        raise CheckpointError(f"unknown denoiser class {cfg.get('denoiser_class')!r}")
    tensors, layer_meta = read_tensors(ckpt_dir)
    with init_empty_weights(include_buffers=False):
        denoiser = cls.from_config(cls.load_config(str(ckpt_dir / cfg["denoiser_component"])))
    denoiser = denoiser.to(dtype).eval() if dtype != torch.float32 else denoiser.eval()
    if denoiser_fingerprint(denoiser) != cfg["denoiser_fingerprint"]:
        raise CheckpointError("checkpoint was made for another model (config or parameter shapes differ)")
    denoiser.tfmq_fp_fingerprint = cfg["denoiser_fingerprint"]
    info = config_info(cfg)
    try:
        build_runtime(denoiser, tensors, layer_meta, cfg["wrap_spec"], info, "reference", compact_fp)
    except ConversionError as exc:
        raise CheckpointError(f"{ckpt_dir}: {exc}") from exc
    if getattr(denoiser, "dtype", dtype) != dtype:   # diffusers: the first floating parameter's dtype
        first = next((n for n, p in denoiser.named_parameters() if p.dtype == denoiser.dtype), "a buffer")
        raise CheckpointError(f"the loaded denoiser reports dtype {denoiser.dtype}, not {dtype}: its first "
                              f"floating-point parameter is {first} ({denoiser.dtype})")
    denoiser.tfmq_info = info
    denoiser.to(device)
    if backend != "reference":
        from .runtime.selection import set_backend
        set_backend(denoiser, backend)
    return denoiser


def checkpoint_size(ckpt_dir: str | Path) -> int:
    """Bytes of the quantized denoiser's files (tensors + configs)."""
    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / TENSOR_FILE, ckpt_dir / CONFIG_FILE]
    if (ckpt_dir / CONFIG_FILE).exists():
        component = json.loads((ckpt_dir / CONFIG_FILE).read_text()).get("denoiser_component")
        if component:
            files.append(ckpt_dir / component / "config.json")
    return sum(f.stat().st_size for f in files if f.exists())
