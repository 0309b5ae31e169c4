"""Layer policies: which layers keep full-precision weights and / or inputs.

A policy is a named, documented rule applied to every quantizable layer of a denoiser. Every
method takes one, and every report names it, so that methods are compared under the same policy.

``tfmq-official`` keeps in full precision what the official TFMQ-DM (and Q-Diffusion) code keeps:
  * ``conv_in`` and ``conv_out``: weight and input;
  * the first time-embedding linear (``time_embedding.linear_1``): weight and input;
  * the second time-embedding linear (``time_embedding.linear_2``): input only;
  * each resnet block's first conv (``resnets.N.conv1``): input only;
  * shortcut / skip 1x1 convs (``conv_shortcut``): weight and input;
  * downsample convs (``downsamplers.N.conv``): weight and input;
  * Conv1d layers (never wrapped by tfmq).
The same rule carried over to transformer denoisers (DiT, PixArt), layer for layer by role:
  * the patch embedding conv (``pos_embed.proj``, a DiT's / PixArt's ``conv_in``) and the final
    projection (DiT ``proj_out_2``, PixArt ``proj_out``, their ``conv_out``): weight and input;
  * the first timestep-embedder linear (``...timestep_embedder.linear_1``: in a DiT one per
    block's adaLN embedder, in PixArt ``adaln_single.emb``): weight and input;
  * the second timestep-embedder linear (``...timestep_embedder.linear_2``): input only.
  The adaLN modulation linears (DiT ``norm1.linear`` and ``proj_out_1``, PixArt
  ``adaln_single.linear``) are quantized like a UNet resnet's ``time_emb_proj``; attention
  projections and matmuls, feed-forward linears and PixArt's caption projection are quantized
  like a UNet's (they have no counterpart the official code keeps).
``all`` quantizes every Conv2d / Linear weight and input and every attention matmul.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LayerDecision:
    """What a policy decides for one layer."""
    weight: bool   # quantize the weight
    act: bool      # quantize the input activation


@dataclass(frozen=True)
class LayerPolicy:
    name: str
    description: str
    rule: Callable[[str], LayerDecision]

    def decide(self, layer_name: str) -> LayerDecision:
        return self.rule(layer_name)


_KEEP_ALL = [r"^conv_in$", r"^conv_out$", r"(^|\.)time_embedding\.linear_1$",
             r"\.conv_shortcut$", r"\.downsamplers\.\d+\.conv$",
             # transformers (DiT, PixArt): patch embedding, final projection, first timestep linear
             r"^pos_embed\.proj$", r"^proj_out_2$", r"^proj_out$", r"(^|\.)timestep_embedder\.linear_1$"]
_KEEP_INPUT = [r"(^|\.)time_embedding\.linear_2$", r"\.resnets\.\d+\.conv1$",
               r"(^|\.)timestep_embedder\.linear_2$"]


def _official(name: str) -> LayerDecision:
    if any(re.search(p, name) for p in _KEEP_ALL):
        return LayerDecision(weight=False, act=False)
    if any(re.search(p, name) for p in _KEEP_INPUT):
        return LayerDecision(weight=True, act=False)
    return LayerDecision(weight=True, act=True)


POLICIES: dict[str, LayerPolicy] = {
    "tfmq-official": LayerPolicy(
        "tfmq-official",
        "full precision for conv_in, conv_out, time_embedding.linear_1, shortcut 1x1 convs and "
        "downsample convs; full-precision inputs for time_embedding.linear_2 and resnet conv1 "
        "(transformers: patch embedding, final projection and timestep_embedder.linear_1 full "
        "precision, timestep_embedder.linear_2 input full precision)",
        _official),
    "all": LayerPolicy("all", "quantize every Conv2d / Linear weight and input",
                       lambda name: LayerDecision(weight=True, act=True)),
}


def get_policy(name: str) -> LayerPolicy:
    """Look up a layer policy by name."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown layer policy {name!r}; choose from {', '.join(POLICIES)}") from None
