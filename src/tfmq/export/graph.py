"""The denoiser as the exported graph computes it: temporal features in, noise prediction out.

:func:`graph_denoiser` turns a denoiser (runtime quantized modules, or a plain FP one) into a
:class:`GraphDenoiser`, in place:

* the temporal information block leaves the graph: the time projection, the time-embedding MLP
  and the class embedding become zero-width stand-ins (:class:`~tfmq.runtime.temporal_cache.RemovedEmbedding`)
  and every resnet's ``time_emb_proj`` returns graph input ``temb_<i>``, the temporal feature
  ``g_i(h(t, c))`` the sampler looks up in the feature table; so the timestep and the class label
  are not graph inputs, and the graph has one set of activation parameters;
* the runtime's step index / temporal cache hooks are removed (the table replaces them);
* quantized layers and attention quantizers become their export modules (:mod:`tfmq.export.qdq`).

Inputs: ``sample`` ``[B, C, H, W]``, ``temb_0 .. temb_{n-1}`` ``[B, C_i]``, and the text
conditioning of the family (:meth:`~tfmq.models.base.DenoiserAdapter.text_inputs`: a cross-attention
UNet's ``encoder_hidden_states`` ``[B, S, D]``; PixArt's T5 ``encoder_hidden_states`` and its
``encoder_attention_mask`` ``[B, S]``); output ``out_sample`` (for a DiT
with learned variance both halves, as the model returns them). The batch (and the text sequence)
are dynamic axes.

A block that reads more than (timestep, class) (SDXL's pooled text and size ids, PixArt-alpha
1024's size conditions) has no finite table: it stays in the graph (``graph_denoiser(..., None)``),
whose inputs are then ``sample``, ``timestep`` (int64 ``[B]``), the text inputs and the added
conditions (:meth:`~tfmq.models.base.DenoiserAdapter.added_inputs`).

A DiT's block is every transformer block's adaLN-Zero embedder (removed) and modulation linear
plus the final ``proj_out_1`` (graph inputs), see :mod:`tfmq.models.dit`; PixArt's is
``adaln_single`` (its modulation and embedded timestep are graph inputs), see :mod:`tfmq.models.pixart`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import adapter_for
from ..models.temporal import find_temporal_block
from ..runtime.layers import ActQuant, AttentionActQuant, GroupActQuant, runtime_layers
from ..runtime.steps import detach_step_index
from ..runtime.temporal_cache import RemovedEmbedding, TemporalFeatureCache
from .qdq import ExportError, QDQActivation, export_layer

OUTPUT_NAME = "out_sample"


class _Features:
    """The temporal features of the current call (set by :class:`GraphDenoiser`)."""

    def __init__(self):
        self.values: list[torch.Tensor] | None = None


class TemporalInput(nn.Module):
    """Stands in for a resnet's ``time_emb_proj``: returns graph input ``temb_<index>``."""

    def __init__(self, features: _Features, index: int, dim: int):
        super().__init__()
        self._features = features
        self.index, self.dim = index, dim

    def forward(self, *args, **kwargs) -> torch.Tensor:      # what the replaced module received
        if self._features.values is None:
            raise RuntimeError("temporal input used outside a GraphDenoiser call")
        return self._features.values[self.index]

    def extra_repr(self) -> str:
        return f"temb_{self.index} [B, {self.dim}]"


class GraphDenoiser(nn.Module):
    """``forward(sample, temb_0, ..., temb_{n-1}, *text) -> noise prediction``, or with the
    temporal block in the graph (``features`` None) ``forward(sample, timestep, *text, *added)``."""

    def __init__(self, denoiser: nn.Module, features: _Features | None, dims: list[int]):
        super().__init__()
        self.denoiser = denoiser
        self._features = features
        self.dims = list(dims)
        self.adapter = adapter_for(denoiser)
        self.text_inputs = self.adapter.text_inputs(denoiser)       # [(name, width or None: a mask)]
        self.class_conditional = self.adapter.class_labels_apply(denoiser)
        self.block_in_graph = features is None
        self.added_inputs = self.adapter.added_inputs(denoiser) if self.block_in_graph else []
        if self.block_in_graph and self.class_conditional:
            raise ExportError("a class-conditional model's temporal block is exported as a table, not in the graph")

    @property
    def input_names(self) -> list[str]:
        names = ["sample"] + (["timestep"] if self.block_in_graph else [f"temb_{i}" for i in range(len(self.dims))])
        return names + [name for name, _ in self.text_inputs] + [name for name, _ in self.added_inputs]

    @property
    def dynamic_axes(self) -> dict:
        axes = {name: {0: "batch"} for name in self.input_names}
        for name, _ in self.text_inputs:
            axes[name] = {0: "batch", 1: "sequence"}
        axes[OUTPUT_NAME] = {0: "batch"}
        return axes

    def forward(self, sample: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if self.block_in_graph:
            if len(inputs) != len(self.input_names) - 1:
                raise ValueError(f"expected inputs {', '.join(self.input_names[1:])}, got {len(inputs)}")
            names = self.input_names[2:]
            row = dict(zip(names, inputs[1:]))
            return self.denoiser(sample, timestep=inputs[0], return_dict=False, **self.adapter.forward_kwargs(row))[0]
        n = len(self.dims)
        if len(inputs) != n + len(self.text_inputs):
            extra = "".join(f", {name}" for name, _ in self.text_inputs)
            raise ValueError(f"expected {n} temporal features{extra}, got {len(inputs)} inputs")
        row = {name: x for (name, _), x in zip(self.text_inputs, inputs[n:])}
        # timestep and class are read by nothing: they reach the graph through the temporal features
        unused = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
        if self.class_conditional:
            row["class_labels"] = unused
        self._features.values = list(inputs[:n])
        try:
            return self.denoiser(sample, timestep=unused, return_dict=False, **self.adapter.forward_kwargs(row))[0]
        finally:
            self._features.values = None

    def example_inputs(self, batch: int = 2, sample_size: tuple[int, int] | None = None,
                       sequence: int = 8) -> tuple[torch.Tensor, ...]:
        """Random inputs of the graph's shapes (tracing, tests)."""
        cfg = self.denoiser.config
        size = sample_size or ((cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int)
                               else tuple(cfg.sample_size))
        g = torch.Generator().manual_seed(0)
        out = [torch.randn((batch, cfg.in_channels, *size), generator=g)]
        if self.block_in_graph:
            out.append(torch.full((batch,), 500, dtype=torch.long))
        out += [torch.randn((batch, d), generator=g) for d in self.dims]
        for _, width in self.text_inputs:
            out.append(torch.ones((batch, sequence)) if width is None else
                       torch.randn((batch, sequence, width), generator=g))
        out += [torch.rand((batch, width), generator=g) + 0.5 for _, width in self.added_inputs]
        return tuple(out)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def strip_temporal_block(denoiser: nn.Module, table: TemporalFeatureCache) -> _Features:
    """Take the temporal information block out of ``denoiser`` (in place); the modules whose
    outputs were the temporal features read them from the returned holder."""
    hook = getattr(denoiser, "_tfmq_cache_hook", None)
    if hook is not None:
        hook.remove()
        denoiser._tfmq_cache_hook = None
    if getattr(denoiser, "tfmq_temporal_cache", None) is not None:
        del denoiser.tfmq_temporal_cache
    detach_step_index(denoiser)
    for name in find_temporal_block(denoiser).cache_removes:
        _set_submodule(denoiser, name, RemovedEmbedding())
    features = _Features()
    for i, (name, dim) in enumerate(zip(table.features, table.dims)):
        _set_submodule(denoiser, name, TemporalInput(features, i, dim))
    return features


def graph_denoiser(denoiser: nn.Module, table: TemporalFeatureCache | None, int4_weights: bool = False
                   ) -> GraphDenoiser:
    """The export graph of ``denoiser`` (modified in place; see the module docstring); ``table``
    None keeps the temporal block in the graph (timestep and added conditions as inputs).
    ``int4_weights``: weights of 4 bits or fewer keep their native codes (to be stored as ONNX
    4-bit types) instead of the int8 compute form."""
    if table is None:           # the block stays; every quantizer holds one set (export.block_in_graph)
        detach_step_index(denoiser)
        features = None
    else:
        features = strip_temporal_block(denoiser, table)
    for name, layer in runtime_layers(denoiser).items():
        _set_submodule(denoiser, name, export_layer(layer, name, int4_weights))
    for name, m in list(denoiser.named_modules()):
        if isinstance(m, AttentionActQuant):
            for qn, aq in m.quantizers().items():
                setattr(m, qn, QDQActivation(aq, f"{name}.{qn}"))
    left = [n for n, m in denoiser.named_modules() if isinstance(m, (ActQuant, GroupActQuant))]
    if left:
        raise ExportError(f"activation quantizers outside the exported layers: {left[:5]}")
    return GraphDenoiser(denoiser, features, [] if table is None else table.dims).eval()
