"""The temporal information block (TIB) of a diffusers UNet and its temporal features.

In a diffusion UNet the time step reaches the network through one path that depends on ``t``
(and the class label, where the model has one) alone::

    h(t)      = time_embedding(time_proj(t)) [+ class_embedding(c)] [+ add_embedding] [act]
    g_i(h)    = resnet_i.time_emb_proj(resnet_i.nonlinearity(h))       for every ResnetBlock2D i

The TIB is the set of modules computing ``h`` and every ``g_i``; its output is the tuple of all
temporal features ``(g_0, ..., g_n)``. TFMQ-DM reconstructs it as one unit (TIAR), calibrates
its activations per step (FSC), and the resnet units' reconstruction leaves its layers alone
(:func:`tib_layer_names`).

Helpers here work on FP and on quantized (wrapped) denoisers alike: the TIB modules are looked
up by name, so a wrapped ``time_emb_proj`` runs with its quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..quant.layers import QuantLayer
from ..runtime.steps import call_arguments, timestep_key  # noqa: F401  (re-exported)
from .adapter import UnsupportedModelError

#: Module type names that read the time embedding without a ``time_emb_proj``; a model using
#: them has temporal paths the TIB would not cover.
_UNCOVERED_TEMB_CONSUMERS = ("ResnetBlockCondNorm2D", "SpatialNorm", "AdaGroupNorm")


@dataclass
class TemporalBlock:
    """The modules of a denoiser's temporal information block, by name.

    ``embedding``: modules computing ``h(t)`` (time projection, time-embedding MLP, class /
    added embeddings, the embedding activation), in the order the model applies them.
    ``resnets``: every ResnetBlock2D with a ``time_emb_proj``, in module order; feature ``i``
    is ``resnets[i]``'s projection.
    """
    embedding: list[str]
    resnets: list[str]
    class_conditional: bool = False
    needs_conditioning: bool = False        # h also depends on text / image inputs (add_embedding)
    feature_dims: list[int] = field(default_factory=list)

    @property
    def projections(self) -> list[str]:
        """Names of the ``time_emb_proj`` layers (one per temporal feature)."""
        return [f"{r}.time_emb_proj" for r in self.resnets]

    @property
    def roots(self) -> list[str]:
        """Every module of the TIB (embedding modules and projections)."""
        return self.embedding + self.projections

    def __len__(self) -> int:
        return len(self.resnets)


def _check_supported(denoiser: nn.Module) -> None:
    if not isinstance(denoiser, (UNet2DModel, UNet2DConditionModel)):
        raise UnsupportedModelError(f"no temporal information block for {type(denoiser).__name__}; "
                                    "supported: UNet2DModel, UNet2DConditionModel")
    for name, m in denoiser.named_modules():
        if type(m).__name__ in _UNCOVERED_TEMB_CONSUMERS:
            raise UnsupportedModelError(
                f"{name} ({type(m).__name__}) reads the time embedding outside a resnet's "
                "time_emb_proj; tfmq's temporal information block does not cover it")
    if isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type == "image_hint":
        raise UnsupportedModelError("addition_embed_type 'image_hint' is not supported by the temporal block")


def find_temporal_block(denoiser: nn.Module) -> TemporalBlock:
    """Discover the TIB of a UNet2DModel / UNet2DConditionModel (FP or quantized)."""
    _check_supported(denoiser)
    embedding = ["time_proj", "time_embedding"]
    if getattr(denoiser, "class_embedding", None) is not None:
        embedding.append("class_embedding")
    needs_cond = False
    if isinstance(denoiser, UNet2DConditionModel):
        if getattr(denoiser, "add_time_proj", None) is not None:
            embedding.append("add_time_proj")
        if getattr(denoiser, "add_embedding", None) is not None:
            embedding.append("add_embedding")
            needs_cond = True
        if getattr(denoiser, "time_embed_act", None) is not None:
            embedding.append("time_embed_act")
        if getattr(denoiser.time_embedding, "cond_proj", None) is not None:
            needs_cond = True                       # timestep_cond (LCM guidance embedding)
    resnets, dims = [], []
    for name, m in denoiser.named_modules():
        if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None:
            resnets.append(name)
            proj = m.time_emb_proj
            dims.append(proj.layer.out_features if isinstance(proj, QuantLayer) else
                        getattr(proj, "out_features", getattr(proj, "dim", 0)))
    if not resnets:
        raise UnsupportedModelError("no resnet block with a time_emb_proj: the model has no temporal features")
    return TemporalBlock(embedding, resnets, class_conditional=_class_conditional(denoiser),
                         needs_conditioning=needs_cond, feature_dims=dims)


def _class_conditional(denoiser: nn.Module) -> bool:
    return getattr(denoiser, "class_embedding", None) is not None


def _layers_under(root: nn.Module, prefix: str) -> list[str]:
    """Conv2d / Linear layers (wrapped or not) inside ``root``, by full name."""
    out = []

    def walk(m: nn.Module, name: str) -> None:
        if isinstance(m, (QuantLayer, nn.Linear, nn.Conv2d)):
            out.append(name)
            return                                  # a QuantLayer's inner layer is the same layer
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(root, prefix)
    return out


def tib_layer_names(denoiser: nn.Module) -> list[str]:
    """Names of the TIB's Conv2d / Linear layers (as ``quantizable_layers`` names them).

    These are reconstructed by TIAR and must be excluded from every other unit's
    reconstruction. Embedding tables (``nn.Embedding``) are not quantizable layers."""
    block = find_temporal_block(denoiser)
    names = []
    for root in block.roots:
        names.extend(_layers_under(denoiser.get_submodule(root), root))
    return names


# ---- computing the temporal features ----------------------------------------------------------
def _as_timesteps(timesteps, batch: int | None, device) -> torch.Tensor:
    t = timesteps if torch.is_tensor(timesteps) else torch.tensor(timesteps)
    if t.dim() == 0:
        t = t[None]
    if batch is not None and t.shape[0] == 1 and batch > 1:
        t = t.expand(batch)
    return t.to(device)


def model_dtype(denoiser: nn.Module) -> torch.dtype:
    return next(p for p in denoiser.parameters()).dtype


def embed_time(denoiser: nn.Module, timesteps, class_labels: torch.Tensor | None = None,
               encoder_hidden_states: torch.Tensor | None = None,
               added_cond_kwargs: dict | None = None, timestep_cond: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``h(t)``: the time embedding every resnet receives, computed as the model's forward does."""
    _check_supported(denoiser)
    device = next(denoiser.parameters()).device
    dtype = model_dtype(denoiser)
    batch = class_labels.shape[0] if class_labels is not None else None
    if batch is None and encoder_hidden_states is not None:
        batch = encoder_hidden_states.shape[0]
    t = _as_timesteps(timesteps, batch, device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    if isinstance(denoiser, UNet2DConditionModel):
        like = torch.empty((t.shape[0], 0), device=device, dtype=dtype)  # carries batch / dtype
        emb = denoiser.time_embedding(denoiser.get_time_embed(sample=like, timestep=t), timestep_cond)
        class_emb = denoiser.get_class_embed(sample=like, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if denoiser.config.class_embeddings_concat \
                else emb + class_emb
        aug = denoiser.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if denoiser.time_embed_act is not None:
            emb = denoiser.time_embed_act(emb)
        return emb
    # UNet2DModel (mirrors its forward: long timesteps broadcast to the batch)
    t = t * torch.ones(t.shape[0], dtype=t.dtype, device=device)
    emb = denoiser.time_embedding(denoiser.time_proj(t).to(dtype=dtype))
    if denoiser.class_embedding is not None:
        if class_labels is None:
            raise ValueError("this model is class-conditional: temporal features need class labels")
        labels = class_labels
        if denoiser.config.class_embed_type == "timestep":
            labels = denoiser.time_proj(labels)
        emb = emb + denoiser.class_embedding(labels).to(dtype=dtype)
    elif class_labels is not None:
        raise ValueError("this model is not class-conditional: class labels do not apply")
    return emb


def project_features(denoiser: nn.Module, emb: torch.Tensor, block: TemporalBlock | None = None
                     ) -> list[torch.Tensor]:
    """``[g_i(h)]``: every resnet's nonlinearity + ``time_emb_proj`` applied to ``h``."""
    block = block or find_temporal_block(denoiser)
    feats = []
    for name in block.resnets:
        resnet = denoiser.get_submodule(name)
        x = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
        feats.append(resnet.time_emb_proj(x))
    return feats


def temporal_features(denoiser: nn.Module, timesteps, class_labels: torch.Tensor | None = None,
                      encoder_hidden_states: torch.Tensor | None = None,
                      added_cond_kwargs: dict | None = None, block: TemporalBlock | None = None,
                      step_index: int | None = None) -> list[torch.Tensor]:
    """All temporal features ``[g_0(h(t)), ..., g_n(h(t))]`` (each ``[B, C_i]``) for a batch of
    timesteps (and class labels / conditioning where the model needs them).

    Works on FP, quantized and feature-cached denoisers. ``step_index`` selects the per-step
    activation parameters (FSC) of a quantized denoiser; a cached denoiser answers from its cache.
    """
    cache = getattr(denoiser, "tfmq_temporal_cache", None)
    if cache is not None:
        return cache.features_for(timesteps, class_labels)
    if step_index is not None:
        from ..quant.model import set_step
        set_step(denoiser, step_index)
    emb = embed_time(denoiser, timesteps, class_labels, encoder_hidden_states, added_cond_kwargs)
    return project_features(denoiser, emb, block)


# ---- the finite set of temporal inputs ------------------------------------------------------------
def model_classes(denoiser: nn.Module) -> list[int] | None:
    """Every class id of a class-conditional model with an embedding table (null class
    included), or None when the model takes no finite set of class labels."""
    emb = getattr(denoiser, "class_embedding", None)
    if isinstance(emb, nn.Embedding):
        return list(range(emb.num_embeddings))
    return None


def finite_set(timesteps: list[int], classes: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Every (timestep, class) pair of the finite set, step-major.

    Returns ``(t, labels, step)``: long tensors of length ``len(timesteps) * len(classes)``
    (``labels`` None for unconditional models), ``step[j]`` being the index of ``t[j]`` in
    ``timesteps``."""
    n_c = len(classes) if classes else 1
    step = torch.arange(len(timesteps)).repeat_interleave(n_c)
    t = torch.tensor([int(x) for x in timesteps], dtype=torch.long)[step]
    labels = torch.tensor(classes, dtype=torch.long).repeat(len(timesteps)) if classes else None
    return t, labels, step
