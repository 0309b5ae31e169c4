"""Resumable calibration: progress written after every unit, continued after an interruption.

``tfmq.quantize(pipe, config, work_dir=DIR)`` keeps its progress in ``DIR/.tfmq-progress/``:

  * ``manifest.json``: the config (and its hash), the FP denoiser's fingerprint and the list of
    finished work items, each with its file and wall time;
  * one safetensors file per finished item (e.g. ``weights:up_blocks.0.resnets.1``): the
    unit's learned state only (hard rounding decisions as packed bits, learned activation
    scales), so the folder grows by the size of what was learned, not by model copies.

Every file is written next to its final name and renamed into place, and the manifest is
rewritten (same way) only after the item's file is complete: a kill at any moment loses at
most the item in progress.

``resume=True`` reopens the folder, refuses it if the config or the model differ, and lets the
stages skip every finished item by restoring its state. Cheap, deterministic stages (range
initialisation) simply run again; the random stream of each unit is seeded from the config's
seed and the unit's index, so a resumed run draws exactly what an uninterrupted one draws and
ends with the same checkpoint (bit for bit on CPU; on CUDA up to the GPU's own
non-determinism).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROGRESS_DIR = ".tfmq-progress"
MANIFEST = "manifest.json"
FORMAT = "tfmq-progress"
FORMAT_VERSION = 1


class ResumeError(ValueError):
    """Progress that cannot be continued: made with another config or another model."""


def config_key(config_dict: dict) -> str:
    """Stable hash of a config (as a dict)."""
    blob = json.dumps(config_dict, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(denoiser: torch.nn.Module) -> str:
    """Hash of the FP denoiser's architecture and weights (cheap statistics of every tensor)."""
    from ..checkpoint import denoiser_fingerprint
    h = hashlib.sha256(denoiser_fingerprint(denoiser).encode())
    for name, p in denoiser.state_dict().items():
        if p.is_floating_point():
            d = p.detach().double()
            h.update(f"{name}:{d.sum().item():.10e}:{d.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _file_name(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.safetensors"


class ProgressStore:
    """Finished work items of one calibration run, kept in ``<work_dir>/.tfmq-progress``.

    Use :meth:`open`. Stages ask :meth:`done` before a unit, :meth:`load` its state to skip it,
    and :meth:`save` it after finishing one.
    """

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.restored: list[str] = []

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, work_dir, config_dict: dict, fingerprint: str, resume: bool) -> "ProgressStore":
        """Open the progress folder of ``work_dir``.

        ``resume=False`` starts afresh (earlier progress there is deleted). ``resume=True``
        continues the progress found there; a folder without progress starts afresh; progress
        made with another config or model raises :class:`ResumeError`.
        """
        root = Path(work_dir) / PROGRESS_DIR
        key = config_key(config_dict)
        manifest_path = root / MANIFEST
        if resume and manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as exc:
                raise ResumeError(f"{manifest_path} is corrupt ({exc}); start without resume") from exc
            if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
                raise ResumeError(f"{root} holds progress of another tfmq format; start without resume")
            if manifest.get("config_key") != key:
                old = manifest.get("config", {})
                diff = sorted(k for k in set(old) | set(config_dict)
                              if json.dumps(old.get(k), default=str) != json.dumps(config_dict.get(k), default=str))
                raise ResumeError(f"cannot resume: the progress in {root} was made with another config "
                                  f"(differs in: {', '.join(diff) or 'unknown'}); use the same options "
                                  f"or start without --resume")
            if manifest.get("fingerprint") != fingerprint:
                raise ResumeError(f"cannot resume: the progress in {root} was made for another model "
                                  f"(weights or architecture differ); start without --resume")
            return cls(root, manifest)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        store = cls(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "config_key": key,
                           "config": config_dict, "fingerprint": fingerprint, "done": {}})
        store._write_manifest()
        return store

    @classmethod
    def mirror(cls, work_dir) -> "ProgressStore":
        """Another process's view of the progress rank 0 keeps (several processes, see
        :mod:`tfmq.distributed`): it reads rank 0's manifest and unit files and writes nothing."""
        root = Path(work_dir) / PROGRESS_DIR
        return _MirrorStore(root, json.loads((root / MANIFEST).read_text()))

    # ---- items ------------------------------------------------------------------------------
    def done(self, key: str) -> bool:
        """Whether work item ``key`` finished in an earlier (or this) run."""
        return key in self.manifest["done"]

    def seconds(self, key: str) -> float:
        """Wall time the item took when it ran."""
        return float(self.manifest["done"][key].get("seconds", 0.0))

    def save(self, key: str, tensors: dict[str, torch.Tensor], seconds: float = 0.0,
             meta: dict | None = None) -> None:
        """Record item ``key`` as finished with its state ``tensors``."""
        name = _file_name(key)
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write_bytes(self.root / name, lambda p: save_file(payload, str(p)))
        self.manifest["done"][key] = {"file": name, "seconds": round(seconds, 4), **(meta or {})}
        self._write_manifest()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The state saved for item ``key``."""
        entry = self.manifest["done"].get(key)
        if entry is None:
            raise KeyError(f"no saved progress for {key!r}")
        path = self.root / entry["file"]
        if not path.exists():
            raise ResumeError(f"progress file {path} is missing; start without --resume")
        self.restored.append(key)
        return load_file(str(path))

    def meta(self, key: str) -> dict:
        return dict(self.manifest["done"].get(key, {}))

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1, default=str)
        _atomic_write_bytes(self.root / MANIFEST, lambda p: p.write_text(text))

    def clear(self) -> None:
        """Delete the progress folder (after the final checkpoint is safely written)."""
        shutil.rmtree(self.root, ignore_errors=True)


class _MirrorStore(ProgressStore):
    """A read-only :class:`ProgressStore`: saving records the item in memory only."""

    def save(self, key: str, tensors: dict[str, torch.Tensor], seconds: float = 0.0,
             meta: dict | None = None) -> None:
        self.manifest["done"][key] = {"seconds": round(seconds, 4), **(meta or {})}

    def _write_manifest(self) -> None:
        pass

    def clear(self) -> None:
        pass
