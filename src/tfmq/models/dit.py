"""The DiT adapter: ``DiTTransformer2DModel`` (``DiTPipeline``: class-conditional, adaLN-Zero).

Temporal information block. Every DiT block ``i`` has its own adaLN-Zero modulation::

    c_i(t, y) = norm1.emb(t, y) = timestep_embedder(time_proj(t)) + class_embedder(y)
    g_i       = norm1.linear(SiLU(c_i))                  (6 x width: shift / scale / gate, twice)

and the final layer reads block 0's embedding again: ``g_out = proj_out_1(SiLU(c_0))`` (shift and
scale of the last norm). All of them are functions of (timestep, class) alone, both from finite
sets (the sampler's timesteps; the label table, null class included), so TIAR, finite set
calibration and the temporal feature cache apply exactly as in a UNet: the block is every
``norm1.emb`` and ``norm1.linear`` and ``proj_out_1``; feature ``i`` is ``norm1.linear`` of
block ``i``, the last one ``proj_out_1``.

What does not transfer: the split shortcut of Q-Diffusion (a DiT has no skip concatenations);
a DiT's class embedder is part of the block (in a UNet the class embedding is too).
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from .base import NO_SPLIT_SHORTCUT, DenoiserAdapter, TemporalBlock, unwrap


class DiTAdapter(DenoiserAdapter):
    family = "dit"
    component = "transformer"
    not_transferred = (NO_SPLIT_SHORTCUT,)
    model_types = (DiTTransformer2DModel,)
    onnx_export = True          # the temporal features leave the graph as for a UNet

    def class_labels_apply(self, denoiser):
        return True

    def null_class(self, denoiser):
        """diffusers' label table has ``num_embeds_ada_norm`` classes and, after them, the null
        (classifier-free guidance) row."""
        return int(denoiser.config.num_embeds_ada_norm)

    def class_table(self, denoiser):
        table = denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        return list(range(table.num_embeddings))

    def temporal_block(self, denoiser):
        blocks = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        embedding = [f"{b}.norm1.emb" for b in blocks]
        projections = [f"{b}.norm1.linear" for b in blocks] + ["proj_out_1"]
        dims = [unwrap(denoiser.get_submodule(p)).out_features for p in projections]
        return TemporalBlock(embedding, projections, class_conditional=True, needs_conditioning=False,
                             feature_dims=dims, cache_removes=list(embedding))

    def temporal_features(self, denoiser, timesteps, class_labels, cond, block):
        if class_labels is None:
            raise ValueError("a DiT is class-conditional: temporal features need class labels")
        dtype = next(denoiser.parameters()).dtype
        feats = []
        first = None
        for i, blk in enumerate(denoiser.transformer_blocks):
            c = blk.norm1.emb(timesteps, class_labels, hidden_dtype=dtype)
            first = c if first is None else first
            feats.append(blk.norm1.linear(blk.norm1.silu(c)))
        feats.append(denoiser.proj_out_1(F.silu(first)))
        return feats
