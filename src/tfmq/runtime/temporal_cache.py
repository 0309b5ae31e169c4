"""The temporal feature cache at run time: the temporal information block (TIB) replaced by a
table of its full-precision outputs.

Every temporal feature ``g_i(h(t, c))`` depends only on the timestep and the class, both from
finite sets (the sampler's timesteps, the model's classes). The table
``feature_i[step, class]`` is computed once at calibration (:func:`tfmq.models.temporal_cache.build_cache`)
and stored in the checkpoint; at run time a forward pre-hook on the denoiser reads the call's
timesteps / class labels and picks the rows, each module whose output is a temporal feature (a
UNet resnet's ``time_emb_proj``, a DiT block's adaLN ``norm1.linear``, ...) is a
:class:`CachedProjection` returning its rows, and the removed embedding modules return
zero-width tensors. While compiling or capturing a CUDA graph the lookup is tensor-only (no check
that the timestep is in the table: :func:`tfmq.runtime.steps.check_timesteps` checked the
sampler before the first step).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import adapter_for
from ..models.fingerprint import denoiser_fingerprint
from .steps import _tracing, argument_picker, timestep_key


class CacheMissError(ValueError):
    """A (timestep, class) outside the cached finite set."""


class TemporalFeatureCache(nn.Module):
    """The table ``feature_i[step, class] = g_i(h(timesteps[step], classes[class]))``."""

    def __init__(self, timesteps: list[int], classes: list[int] | None, dims: list[int],
                 features: list[str], sampler: dict | None = None):
        super().__init__()
        self.features = list(features)          # feature i = the output of module features[i]
        self.sampler = dict(sampler or {})
        self.register_buffer("timesteps", torch.tensor([int(t) for t in timesteps], dtype=torch.long))
        self.register_buffer("classes", None if classes is None else torch.tensor(classes, dtype=torch.long))
        n_c = 1 if classes is None else len(classes)
        for i, d in enumerate(dims):
            self.register_buffer(f"feature_{i}", torch.zeros(len(timesteps), n_c, d))
        self.dims = list(dims)
        self.rows: torch.Tensor | None = None
        self._pickers: dict = {}                 # forward-argument readers, set by install_cache

    def feature_table(self, i: int) -> torch.Tensor:
        return getattr(self, f"feature_{i}")

    def _describe(self) -> str:
        ts = self.timesteps.tolist()
        shown = ", ".join(map(str, ts)) if len(ts) <= 4 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
        what = f"{self.sampler.get('name')} with {len(ts)} steps" if self.sampler else f"{len(ts)} timesteps"
        return f"{what} (timesteps {shown})"

    @staticmethod
    def _index(values: torch.Tensor, table: torch.Tensor, what: str, describe) -> torch.Tensor:
        match = values[:, None] == table[None, :].to(values.device)
        if _tracing():                     # compiled / captured: no host sync, no check
            return match.int().argmax(dim=1)
        found = match.any(dim=1)
        if not bool(found.all()):
            missing = sorted(set(values[~found].tolist()))[:5]
            raise CacheMissError(f"{what} {missing} not in the temporal feature cache, which holds "
                                 f"{describe()}; sample with the calibrated sampler and step count")
        return match.int().argmax(dim=1)

    def lookup_rows(self, timesteps, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Row of the flattened ``[steps * classes]`` table for every sample of a call."""
        t = timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)
        t = t.reshape(-1)
        if t.is_floating_point():
            t = t.long() if _tracing() else torch.tensor([timestep_key(v) for v in t.tolist()], device=t.device)
        t = t.long().expand(batch) if t.numel() == 1 else t.long()
        step = self._index(t, self.timesteps, "timestep(s)", self._describe)
        if self.classes is None:
            if class_labels is not None:
                raise ValueError("this model is not class-conditional: class labels do not apply")
            return step
        if class_labels is None:
            raise ValueError("this model is class-conditional: class labels are needed")
        c = self._index(class_labels.reshape(-1).long().expand(batch) if class_labels.numel() == 1
                        else class_labels.reshape(-1).long(), self.classes, "class label(s)",
                        lambda: f"classes {self.classes.tolist()[:8]}...")
        return step * len(self.classes) + c

    def features_for(self, timesteps, class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The cached ``[g_0, ..., g_n]`` for a batch of timesteps (and class labels)."""
        n_t = (timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)).numel()
        batch = max(n_t, class_labels.numel() if class_labels is not None else 1)
        rows = self.lookup_rows(timesteps, class_labels, batch)
        return [self.feature_table(i).flatten(0, 1)[rows.to(self.timesteps.device)] for i in range(len(self.dims))]

    def feature(self, i: int) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("temporal feature cache used outside a denoiser call")
        return self.feature_table(i).flatten(0, 1)[self.rows]

    def pre_hook(self, denoiser: nn.Module, args: tuple, kwargs: dict):
        pickers = self._pickers
        batch = pickers["sample"](args, kwargs).shape[0]
        self.rows = self.lookup_rows(pickers["timestep"](args, kwargs), pickers["class_labels"](args, kwargs),
                                     batch).to(self.timesteps.device)
        return None

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _float_dtype(args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype the replaced module would have computed in: ``hidden_dtype`` where the caller
    names it (diffusers' embedders), else the first floating input's, else float32."""
    if kwargs.get("hidden_dtype") is not None:
        return kwargs["hidden_dtype"]
    x = args[0] if args else None
    return x.dtype if torch.is_tensor(x) and x.is_floating_point() else torch.float32


class CachedProjection(nn.Module):
    """Stands in for a module whose output is a temporal feature (a resnet's ``time_emb_proj``,
    a DiT block's ``norm1.linear``, PixArt's ``adaln_single.linear``): returns the cached
    feature of the call, whatever it is called with."""

    def __init__(self, cache: TemporalFeatureCache, index: int):
        super().__init__()
        self._cache = [cache]          # a list: not a submodule, so its buffers are stored once
        self.index = index

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._cache[0].feature(self.index).to(_float_dtype(args, kwargs))

    def extra_repr(self) -> str:
        return f"cached feature {self.index}"


class RemovedEmbedding(nn.Module):
    """Stands in for a removed embedding module: a zero-width ``[B, 0]`` tensor."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros((x.shape[0] if x.dim() else 1, 0), device=x.device,
                           dtype=_float_dtype((x,), kwargs))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _check_cacheable(denoiser: nn.Module):
    adapter = adapter_for(denoiser)
    block = adapter.temporal_block(denoiser)
    why = adapter.cache_refusal(denoiser, block)
    if why:
        raise ValueError(why)
    return block


def install_cache(denoiser: nn.Module, cache: TemporalFeatureCache) -> TemporalFeatureCache:
    """Put ``cache`` in the denoiser's runtime path (in place): the TIB modules are replaced."""
    if getattr(denoiser, "tfmq_temporal_cache", None) is not None:
        raise RuntimeError("this denoiser already uses a temporal feature cache")
    block = _check_cacheable(denoiser)
    if block.projections != cache.features:
        raise ValueError("the temporal feature cache was built for another model (temporal features differ)")
    if getattr(denoiser, "tfmq_fp_fingerprint", None) is None:
        denoiser.tfmq_fp_fingerprint = denoiser_fingerprint(denoiser)   # before the modules change
    for name in block.cache_removes:
        _set_submodule(denoiser, name, RemovedEmbedding())
    for i, name in enumerate(block.projections):
        _set_submodule(denoiser, name, CachedProjection(cache, i))
    cache._pickers = {n: argument_picker(denoiser, n) for n in ("sample", "timestep", "class_labels")}
    denoiser.tfmq_temporal_cache = cache
    denoiser._tfmq_cache_hook = denoiser.register_forward_pre_hook(cache.pre_hook, with_kwargs=True)
    return cache


def info_features(info: dict) -> list[str]:
    """The feature module names of a checkpoint's cache entry (checkpoints written before the
    adapters named resnets: their features are the resnets' ``time_emb_proj``)."""
    if "features" in info:
        return list(info["features"])
    return [f"{r}.time_emb_proj" for r in info["resnets"]]


def install_from_info(denoiser: nn.Module, info: dict) -> TemporalFeatureCache:
    """Rebuild an (empty) cache of a checkpoint's shape and install it; the state dict fills it."""
    cache = TemporalFeatureCache(info["timesteps"], info["classes"], info["dims"], info_features(info),
                                 info.get("sampler"))
    device = next(denoiser.parameters()).device
    return install_cache(denoiser, cache.to(device))
