"""The PixArt adapter: ``PixArtTransformer2DModel`` (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``:
T5 text conditioning, adaLN-single).

Temporal information block. PixArt computes the time modulation ONCE for all blocks::

    e(t)      = adaln_single.emb(t [, resolution, aspect ratio])       (embedded timestep, width D)
    m(t)      = adaln_single.linear(SiLU(e(t)))                        (6 x D)

every block adds its own learned ``scale_shift_table`` to ``m(t)`` (an addition of a parameter:
nothing to quantize) and the final layer adds its table to ``e(t)``. The block is
``adaln_single`` (its timestep embedder MLP and the modulation linear); the temporal features
are ``m(t)`` (output of ``adaln_single.linear``) and ``e(t)`` (output of ``adaln_single.emb``).

PixArt-alpha at 1024 px (``sample_size`` 128) also embeds the resolution and aspect ratio into
``e``: they are constant for a given image size but are model inputs, so that block is marked
``needs_conditioning`` (TIAR / FSC read the recorded rows; no temporal cache). Without these
additional conditions (512 px models, PixArt-Sigma) the block is a function of ``t`` alone and
all of TFMQ-DM applies. Class labels do not exist here; the text conditioning does not reach
the block. What does not transfer: the split shortcut (no skip concatenations).
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from .base import NO_SPLIT_SHORTCUT, Conditioning, DenoiserAdapter, TemporalBlock, cycled_prompts, pixel_size

#: added-conditioning inputs of the 1024 px PixArt-alpha, recorded flat
PIXART_ADDED = ("resolution", "aspect_ratio")


class PixArtAdapter(DenoiserAdapter):
    family = "pixart"
    component = "transformer"
    not_transferred = (NO_SPLIT_SHORTCUT,)
    model_types = (PixArtTransformer2DModel,)
    onnx_export = True          # with size conditions the temporal block stays in the graph

    def text_conditional(self, denoiser):
        return True

    def added_inputs(self, denoiser):
        return [("resolution", 2), ("aspect_ratio", 1)] if self.additional_conditions(denoiser) else []

    def text_inputs(self, denoiser):
        """T5 embeddings (``caption_channels`` wide) and their padding mask."""
        return [("encoder_hidden_states", int(denoiser.config.caption_channels)), ("encoder_attention_mask", None)]

    @staticmethod
    def additional_conditions(denoiser) -> bool:
        return bool(denoiser.use_additional_conditions)          # set from the config by diffusers

    def conditioning(self, pipe, denoiser, num_images, seed, class_labels=None, prompts=None,
                     guidance_scale=1.0, device="cpu"):
        prompts = cycled_prompts(class_labels, prompts, num_images)
        do_cfg = guidance_scale > 1.0
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(prompts, do_cfg, device=device, clean_caption=False)
        inputs = {"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask}
        negative = {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask} if do_cfg else None
        if self.additional_conditions(denoiser):
            h, w = pixel_size(pipe, denoiser)
            extra = {"resolution": torch.tensor([[float(h), float(w)]], device=device).expand(num_images, -1),
                     "aspect_ratio": torch.tensor([[h / w]], device=device).expand(num_images, -1)}
            inputs.update(extra)
            if negative is not None:
                negative.update(extra)
        return Conditioning(inputs, negative)

    def forward_kwargs(self, row):
        kwargs = {k: v for k, v in row.items() if k not in PIXART_ADDED}
        kwargs["added_cond_kwargs"] = {k: row.get(k) for k in PIXART_ADDED}
        return kwargs

    def temporal_block(self, denoiser):
        width = denoiser.inner_dim
        return TemporalBlock(["adaln_single.emb"], ["adaln_single.linear", "adaln_single.emb"],
                             class_conditional=False, needs_conditioning=self.additional_conditions(denoiser),
                             feature_dims=[6 * width, width], cache_removes=[],
                             step_free=["adaln_single.emb.resolution_embedder",
                                        "adaln_single.emb.aspect_ratio_embedder"])

    def temporal_features(self, denoiser, timesteps, class_labels, cond, block):
        if class_labels is not None:
            raise ValueError("PixArt is not class-conditional: class labels do not apply")
        dtype = next(denoiser.parameters()).dtype
        added = {k: cond.get(k) for k in PIXART_ADDED}
        modulation, embedded = denoiser.adaln_single(timesteps, added, batch_size=timesteps.shape[0],
                                                     hidden_dtype=dtype)
        return [modulation, embedded]

    def cache_refusal(self, denoiser, block):
        if block.needs_conditioning:
            return ("temporal feature caching needs a time embedding of the timestep alone; this PixArt "
                    "model also embeds the resolution and aspect ratio (use --temporal tiar)")
        return None
