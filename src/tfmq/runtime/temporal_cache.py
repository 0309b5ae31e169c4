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

:func:`tabulate_temporal` builds such a table at load time from a quantized runtime block (a
``tiar`` checkpoint): the block's outputs over the calibrated finite set, computed once, replace
the block, whose layers then leave every call. Its rows are read at the step index
(:class:`tfmq.runtime.steps.StepIndex`), which the step's pre-hook has already checked, so a
call looks nothing up on the host.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import adapter_for
from ..models.fingerprint import denoiser_fingerprint
from .steps import StepIndex, _tracing, argument_picker, attach_step_index, step_index_of, timestep_key

#: The largest table :func:`tabulate_temporal` builds unless told otherwise (float32 entries).
TABLE_LIMIT_BYTES = 512 * 2**20


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
            # frozen parameters, not buffers: a compiled call's Dynamo guards check every
            # non-parameter tensor it reads, even when the guard check is otherwise skipped
            self.register_parameter(f"feature_{i}", nn.Parameter(torch.zeros(len(timesteps), n_c, d),
                                                                 requires_grad=False))
        self.dims = list(dims)
        self.rows: torch.Tensor | None = None
        self.batch = 0                           # the call's batch (step-indexed tables)
        self.derived = False                     # built at load from the quantized block: not saved
        self._pickers: dict = {}                 # forward-argument readers, set by install_cache
        self._steps: list[StepIndex] = []        # rows read at this step index (tabulate_temporal)

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
        c = self.class_rows(class_labels, batch)
        return step if c is None else step * len(self.classes) + c

    def class_rows(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Each sample's class index in the table (None for an unconditional model)."""
        if self.classes is None:
            if class_labels is not None:
                raise ValueError("this model is not class-conditional: class labels do not apply")
            return None
        if class_labels is None:
            raise ValueError("this model is class-conditional: class labels are needed")
        labels = class_labels.reshape(-1).long()
        return self._index(labels.expand(batch) if labels.numel() == 1 else labels, self.classes, "class label(s)",
                           lambda: f"classes {self.classes.tolist()[:8]}...")

    def features_for(self, timesteps, class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The cached ``[g_0, ..., g_n]`` for a batch of timesteps (and class labels)."""
        n_t = (timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)).numel()
        batch = max(n_t, class_labels.numel() if class_labels is not None else 1)
        rows = self.lookup_rows(timesteps, class_labels, batch)
        return [self.feature_table(i).flatten(0, 1)[rows.to(self.timesteps.device)] for i in range(len(self.dims))]

    def feature(self, i: int) -> torch.Tensor:
        if self._steps:                  # step-indexed: the table's row at the step index (a buffer)
            if not self.batch:
                raise RuntimeError("temporal feature table used outside a denoiser call")
            # index_select with a 1-element index, not t[index]: a 0-d index reads as an int
            at_step = self.feature_table(i).index_select(0, self._steps[0].index.reshape(1))[0]   # [classes, dim]
            return at_step.expand(self.batch, -1) if self.rows is None else at_step[self.rows]
        if self.rows is None:
            raise RuntimeError("temporal feature cache used outside a denoiser call")
        return self.feature_table(i).flatten(0, 1)[self.rows]

    def pre_hook(self, denoiser: nn.Module, args: tuple, kwargs: dict):
        pickers = self._pickers
        batch = pickers["sample"](args, kwargs).shape[0]
        if self._steps:
            # the step index's own pre-hook (registered first) has checked and selected the step;
            # only class labels are looked up here
            self.batch = batch
            self.rows = self.class_rows(pickers["class_labels"](args, kwargs), batch)
            return None
        self.rows = self.lookup_rows(pickers["timestep"](args, kwargs), pickers["class_labels"](args, kwargs),
                                     batch).to(self.timesteps.device)
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


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


def install_cache(denoiser: nn.Module, cache: TemporalFeatureCache,
                  steps: StepIndex | None = None) -> TemporalFeatureCache:
    """Put ``cache`` in the denoiser's runtime path (in place): the TIB modules are replaced.
    ``steps``: read the table's rows at this step index (its timesteps must be the table's)
    instead of looking each call's timestep up."""
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
    if steps is not None:
        if steps.timesteps.tolist() != cache.timesteps.tolist():
            raise ValueError("the step index and the temporal feature table hold different timesteps")
        cache._steps = [steps]         # a list: the step index stays the denoiser's submodule only
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


# ---- tabulating a quantized temporal block --------------------------------------------------------
def table_nbytes(n_steps: int, n_classes: int, dims: list[int]) -> int:
    """Bytes of a float32 table of ``n_steps x n_classes`` rows of every feature."""
    return 4 * n_steps * n_classes * sum(int(d) for d in dims)


@torch.no_grad()
def compute_table(denoiser: nn.Module, block, timesteps: list[int], classes: list[int] | None,
                  sampler: dict | None = None, steps: StepIndex | None = None) -> TemporalFeatureCache:
    """Every temporal feature of ``denoiser``'s block ``block`` for ``timesteps`` (x every class
    of ``classes``), computed by the block as it runs now, one step at a time with the step's
    parameters selected in ``steps`` (per-step FSC parameters of the block); on the CPU.

    Each step's rows are computed as one batch of ``len(classes)`` (or 1): the same arithmetic as a
    call's, whose matrix products may round the last bit differently for another batch size."""
    timesteps = [int(t) for t in timesteps]
    table = TemporalFeatureCache(timesteps, classes, block.feature_dims, block.projections, sampler)
    device = next(denoiser.parameters()).device
    labels = None if classes is None else torch.tensor(classes, dtype=torch.long, device=device)
    n_c = 1 if classes is None else len(classes)
    adapter = adapter_for(denoiser)
    for i, t in enumerate(timesteps):
        if steps is not None:                 # the block's per-step parameters (FSC) of step i
            steps.set(i)
        t_rows = torch.full((n_c,), t, dtype=torch.long, device=device)
        feats = adapter.temporal_features(denoiser, t_rows, labels, {}, block)
        for j, f in enumerate(feats):
            table.feature_table(j)[i] = f.float().reshape(n_c, -1).cpu()
    if steps is not None:
        steps.reset()
    return table


def tabulate_temporal(denoiser: nn.Module, max_bytes: int = TABLE_LIMIT_BYTES) -> TemporalFeatureCache:
    """Replace a quantized runtime denoiser's temporal information block by the table of its
    outputs over the calibrated finite set (in place); returns the table.

    Every temporal feature depends on the timestep and the class only, so the block's outputs for
    the calibrated sampler's timesteps (x every class of a class-conditional model) are computed
    once, with the block's quantized layers and per-step parameters as they run now (the
    denoiser's current backend), and looked up at the step index afterwards: the time embedding,
    the class embedding and every temporal projection (a resnet's ``time_emb_proj``, a DiT block's
    modulation) leave each call. The denoiser is then tied to the calibrated sampler and step count
    (it gets a step index if it had none; other samplers are refused like per-step parameters are)
    and cannot be saved again (load the checkpoint without the table for that). A denoiser that
    already has a table (a ``--temporal cache`` checkpoint) is returned as is.

    Raises ValueError for a model whose block reads more than (timestep, class) (SDXL's added
    conditioning, PixArt-alpha's size conditions), for a class-conditional model without a finite
    class table, and for a table larger than ``max_bytes``, before computing anything."""
    cache = getattr(denoiser, "tfmq_temporal_cache", None)
    if cache is not None:
        return cache
    info = getattr(denoiser, "tfmq_info", None)
    if info is None or not info.get("timesteps"):
        raise ValueError("tabulating the temporal block needs a quantized denoiser with its calibrated "
                         "timesteps (tfmq.load or tfmq.quantize)")
    block = _check_cacheable(denoiser)
    classes = None
    if block.class_conditional:
        classes = adapter_for(denoiser).class_table(denoiser)
        if classes is None:
            raise ValueError("this model's class labels are not a finite table: its temporal features "
                             "cannot be tabulated")
    timesteps = [int(t) for t in info["timesteps"]]
    n_c = 1 if classes is None else len(classes)
    nbytes = table_nbytes(len(timesteps), n_c, block.feature_dims)
    if nbytes > max_bytes:
        raise ValueError(f"the temporal feature table would take {nbytes / 2**20:.1f} MiB ({len(timesteps)} "
                         f"steps x {n_c} classes x {sum(block.feature_dims)} features, float32), more than "
                         f"the limit of {max_bytes / 2**20:.1f} MiB: raise the limit or run without the table")
    steps = step_index_of(denoiser)
    if steps is None:
        steps = attach_step_index(denoiser, timesteps, info["sampler"])
    elif steps.timesteps.tolist() != timesteps:
        raise ValueError("the denoiser's step index holds other timesteps than its calibration info")
    device = next(denoiser.parameters()).device
    table = compute_table(denoiser, block, timesteps, classes, info["sampler"], steps).to(device)
    install_cache(denoiser, table, steps)
    table.derived = True
    return table
