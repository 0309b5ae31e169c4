"""The UNet adapter: ``UNet2DModel`` (pixel / latent DDPM / LDM UNets, optionally class-conditional),
``UNet2DConditionModel`` (Stable Diffusion) and its SDXL form (``addition_embed_type="text_time"``).

Temporal information block. The time step reaches a UNet through one path::

    h(t)      = time_embedding(time_proj(t)) [+ class_embedding(c)] [+ add_embedding(...)] [act]
    g_i(h)    = resnet_i.time_emb_proj(resnet_i.nonlinearity(h))       for every ResnetBlock2D i

The block is every module computing ``h`` and each ``g_i``; feature ``i`` is the output of
``resnet_i.time_emb_proj``.

SDXL. ``add_embedding`` reads the pooled text embedding (``text_embeds``) and the six size /
crop numbers (``time_ids``) besides ``t``: ``h`` is then a function of the prompt, not of
(t, class) alone. The block keeps ``add_time_proj`` / ``add_embedding`` in it and is marked
``needs_conditioning``: TIAR and FSC take the calibration data's recorded conditioning rows as
the block's inputs (the finite set becomes "the calibration prompts at every step"), and the
temporal feature cache is refused (it cannot hold a table over all prompts).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .base import (Conditioning, DenoiserAdapter, TemporalBlock, UnsupportedModelError, cycled_prompts,
                   pixel_size, unwrap)

#: Module type names that read the time embedding without a ``time_emb_proj``; a model using
#: them has temporal paths the block would not cover.
_UNCOVERED_TEMB_CONSUMERS = ("ResnetBlockCondNorm2D", "SpatialNorm", "AdaGroupNorm")

#: SDXL's added-conditioning inputs, recorded flat and passed as ``added_cond_kwargs``.
SDXL_ADDED = ("text_embeds", "time_ids")


def _out_features(proj: nn.Module) -> int:
    inner = unwrap(proj)
    return getattr(inner, "out_features", getattr(inner, "dim", 0))


class UNetAdapter(DenoiserAdapter):
    family = "unet"
    component = "unet"
    model_types = (UNet2DModel, UNet2DConditionModel)
    onnx_export = True

    # ---- sampling -----------------------------------------------------------------------
    def class_labels_apply(self, denoiser):
        return getattr(denoiser, "class_embedding", None) is not None and \
            getattr(denoiser.config, "num_class_embeds", None) is not None

    def null_class(self, denoiser):
        if not self.class_labels_apply(denoiser):
            raise ValueError(f"{type(denoiser).__name__} is not class-conditional")
        return int(denoiser.config.num_class_embeds) - 1

    def text_conditional(self, denoiser):
        return isinstance(denoiser, UNet2DConditionModel)

    def text_inputs(self, denoiser):
        if not self.text_conditional(denoiser):
            return []
        return [("encoder_hidden_states", int(denoiser.config.cross_attention_dim))]

    def added_inputs(self, denoiser):
        if not self.is_sdxl(denoiser):
            return []
        cfg = denoiser.config
        return [("text_embeds", int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)),
                ("time_ids", 6)]

    @staticmethod
    def is_sdxl(denoiser) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type == "text_time"

    def conditioning(self, pipe, denoiser, num_images, seed, class_labels=None, prompts=None,
                     guidance_scale=1.0, device="cpu"):
        if not self.text_conditional(denoiser):
            return super().conditioning(pipe, denoiser, num_images, seed, class_labels, prompts,
                                        guidance_scale, device)
        prompts = cycled_prompts(class_labels, prompts, num_images)
        do_cfg = guidance_scale > 1.0
        if not self.is_sdxl(denoiser):
            pos, neg = pipe.encode_prompt(prompts, device, 1, do_cfg)
            return Conditioning({"encoder_hidden_states": pos},
                                {"encoder_hidden_states": neg} if do_cfg else None)
        # SDXL: two text encoders, the pooled embedding and the size / crop ids
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=do_cfg)
        time_ids = self.sdxl_time_ids(pipe, denoiser, pooled.shape[-1]).to(device, pos.dtype)
        time_ids = time_ids.expand(num_images, -1)
        inputs = {"encoder_hidden_states": pos, "text_embeds": pooled, "time_ids": time_ids}
        negative = {"encoder_hidden_states": neg, "text_embeds": neg_pooled, "time_ids": time_ids} \
            if do_cfg else None
        return Conditioning(inputs, negative)

    @staticmethod
    def sdxl_time_ids(pipe, denoiser, pooled_dim: int) -> torch.Tensor:
        """``(original H, W, crop top, left, target H, W)`` for the native resolution, as
        StableDiffusionXLPipeline passes them by default; checked against ``add_embedding``."""
        h, w = pixel_size(pipe, denoiser)
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        lin = unwrap(getattr(denoiser.add_embedding, "linear_1", None))
        expected = getattr(lin, "in_features", None)
        got = denoiser.config.addition_time_embed_dim * ids.shape[1] + pooled_dim
        if expected is not None and expected != got:
            raise UnsupportedModelError(f"SDXL add_embedding expects {expected} inputs, the text encoders and "
                                        f"6 time ids give {got}")
        return ids

    def forward_kwargs(self, row):
        added = {k: row[k] for k in SDXL_ADDED if k in row}
        kwargs = {k: v for k, v in row.items() if k not in SDXL_ADDED}
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    # ---- temporal information block -----------------------------------------------------
    def _check(self, denoiser):
        for name, m in denoiser.named_modules():
            if type(m).__name__ in _UNCOVERED_TEMB_CONSUMERS:
                raise UnsupportedModelError(
                    f"{name} ({type(m).__name__}) reads the time embedding outside a resnet's "
                    "time_emb_proj; tfmq's temporal information block does not cover it")
        if isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type == "image_hint":
            raise UnsupportedModelError("addition_embed_type 'image_hint' is not supported by the temporal block")

    def temporal_block(self, denoiser):
        self._check(denoiser)
        embedding = ["time_proj", "time_embedding"]
        if getattr(denoiser, "class_embedding", None) is not None:
            embedding.append("class_embedding")
        needs_cond = False
        removable = list(embedding)
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
        projections, dims = [], []
        for name, m in denoiser.named_modules():
            if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None:
                projections.append(f"{name}.time_emb_proj")
                dims.append(_out_features(m.time_emb_proj))
        if not projections:
            raise UnsupportedModelError("no resnet block with a time_emb_proj: the model has no temporal features")
        return TemporalBlock(embedding, projections,
                             class_conditional=getattr(denoiser, "class_embedding", None) is not None,
                             needs_conditioning=needs_cond, feature_dims=dims, cache_removes=removable)

    def class_table(self, denoiser):
        emb = getattr(denoiser, "class_embedding", None)
        if isinstance(emb, nn.Embedding):
            return list(range(emb.num_embeddings))
        return None

    def cache_refusal(self, denoiser, block):
        if block.needs_conditioning:
            return ("temporal feature caching needs a time embedding that depends on the timestep and class "
                    "only; this model's also reads text / image inputs (add_embedding)")
        if getattr(denoiser.config, "class_embeddings_concat", False):
            return "temporal feature caching does not support class_embeddings_concat"
        return None

    def embed_time(self, denoiser, t, class_labels, cond):
        """``h(t)``: the time embedding every resnet receives, computed as the model's forward does."""
        dtype = next(denoiser.parameters()).dtype
        device = t.device
        if isinstance(denoiser, UNet2DConditionModel):
            like = torch.empty((t.shape[0], 0), device=device, dtype=dtype)  # carries batch / dtype
            emb = denoiser.time_embedding(denoiser.get_time_embed(sample=like, timestep=t),
                                          cond.get("timestep_cond"))
            class_emb = denoiser.get_class_embed(sample=like, class_labels=class_labels)
            if class_emb is not None:
                emb = torch.cat([emb, class_emb], dim=-1) if denoiser.config.class_embeddings_concat \
                    else emb + class_emb
            aug = denoiser.get_aug_embed(emb=emb, encoder_hidden_states=cond.get("encoder_hidden_states"),
                                         added_cond_kwargs={k: cond[k] for k in SDXL_ADDED if k in cond})
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

    def temporal_features(self, denoiser, timesteps, class_labels, cond, block):
        emb = self.embed_time(denoiser, timesteps, class_labels, cond)
        feats = []
        for name in block.projections:
            resnet = denoiser.get_submodule(name.rsplit(".", 1)[0])
            x = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
            feats.append(resnet.time_emb_proj(x))
        return feats
