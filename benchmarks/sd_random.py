"""A Stable-Diffusion-v1.5-shaped pipeline with RANDOM weights, for the benchmarks (there is no
network access here). Timings depend on the shapes, not on the weights; say so wherever its
numbers are printed.

The UNet is ``UNet2DConditionModel`` with SD v1.5's configuration (860M parameters at
``scale`` 1.0; ``scale`` multiplies every channel width, rounded to multiples of 32); the text
encoder is a 1-layer CLIP text model of SD's width (768) over a made-up vocabulary; the VAE is
small (the benchmarks time the denoiser).
"""

from __future__ import annotations

import json
from pathlib import Path

#: runwayml/stable-diffusion-v1-5's unet/config.json (the parts that matter), latents 64x64.
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}


def sd_unet_config(scale: float = 1.0, sample_size: int = 64) -> dict:
    """SD v1.5's UNet config with every channel width times ``scale`` and the given latent size."""
    cfg = dict(SD15_UNET_CONFIG, sample_size=sample_size)
    cfg["block_out_channels"] = [int(round(c * scale / 32)) * 32 for c in cfg["block_out_channels"]]
    return cfg


def random_sd_pipeline(work: Path, scale: float = 1.0, sample_size: int = 64, seed: int = 0):
    """A ``StableDiffusionPipeline`` with random weights (seeded); ``work`` holds the made-up
    tokenizer files."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (work / "vocab.json").write_text(json.dumps(vocab))
    (work / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1)).eval()
    unet = UNet2DConditionModel(**sd_unet_config(scale, sample_size)).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
