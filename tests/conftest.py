"""Shared fixtures: tiny diffusers pipelines built from configs.

These models have RANDOM weights: they are for shapes, plumbing and numerics of the
quantization machinery, never for quality claims (those use the bundled trained model).
"""

import importlib.util
import os

import pytest
import torch

# The Triton kernels (tfmq.runtime.kernels) are checked against their references on a GPU, and where
# there is none through Triton's CPU interpreter (Triton is in the [test] extra); TRITON_INTERPRET=0
# set by hand skips them instead. Nothing else in tfmq reads it (calibration's fused kernels run on
# CUDA tensors only). Set before diffusers is imported: importing it imports Triton (through
# torch), and Triton's own jit functions (tl.sum, ...) are only interpretable when the variable
# was set before Triton was imported.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel  # noqa: E402

# Under pytest-xdist (-n N) the workers share the machine's cores: each gets its part instead of
# every worker's torch starting a thread per core (oversubscribed OpenMP threads spin and stall).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def tiny_unet2d(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()


def tiny_ddpm_pipeline(num_class_embeds=None, seed=0):
    sched = DDIMScheduler(num_train_timesteps=1000)
    pipe = DDPMPipeline(unet=tiny_unet2d(num_class_embeds, seed), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one thread avoids OpenMP oversubscription on shared CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_pipe():
    """Unconditional tiny DDPM pipeline with random weights."""
    return tiny_ddpm_pipeline()


@pytest.fixture
def tiny_pipe_dir(tmp_path):
    """The tiny pipeline saved as a local diffusers folder."""
    path = tmp_path / "tiny-ddpm"
    tiny_ddpm_pipeline().save_pretrained(path)
    return path


def _tiny_vocab(tmp_dir):
    """A made-up 54-token CLIP vocabulary (letters), written to tmp_dir; returns the tokenizer."""
    import json
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_dir / "vocab.json").write_text(json.dumps(vocab))
    (tmp_dir / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(tmp_dir / "vocab.json"), str(tmp_dir / "merges.txt"),
                                      model_max_length=16)


def tiny_clip_dir(tmp_dir, seed=0):
    """A tiny CLIP model + processor (RANDOM weights, 32 px images) saved in tmp_dir/clip, for
    the CLIP-score plumbing; its scores mean nothing."""
    transformers = pytest.importorskip("transformers")
    tok = _tiny_vocab(tmp_dir)
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)
    model = transformers.CLIPModel(cfg).eval()
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = tmp_dir / "clip"
    model.save_pretrained(out)
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def tiny_sd_pipeline(tmp_dir, seed=0, clip_sample=False):
    """Tiny Stable-Diffusion-shaped pipeline (cross-attention UNet2DConditionModel, a 1-layer CLIP
    text encoder with a made-up 54-token vocabulary, a small VAE). RANDOM weights: plumbing only."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    tok = _tiny_vocab(tmp_dir)
    torch.manual_seed(seed)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if clip_sample:
        # a random model's eps is not noise: unclipped DDIM latents then grow without bound.
        # The SD pipeline's constructor forces clip_sample off, so set it after construction.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sd(tmp_path):
    """Tiny text-to-image pipeline with random weights."""
    d = tmp_path / "tok"
    d.mkdir()
    return tiny_sd_pipeline(d)


def tiny_qdiff(wbits=4, abits=8, recon_iters=20, act_learn_iters=20, recon_batch_size=8, **overrides):
    """A qdiff config sized for the tiny test models (4 trajectories, 3 of 6 DDIM steps, policy
    all); tests override what they are about."""
    import tfmq
    from tfmq.sampling import SamplerConfig
    values = dict(wbits=wbits, abits=abits, layer_policy="all", calib_size=4, calib_steps=3,
                  sampler=SamplerConfig(steps=6), recon_iters=recon_iters, act_learn_iters=act_learn_iters,
                  recon_batch_size=recon_batch_size, calib_batch_size=8)
    values.update(overrides)
    return tfmq.QuantConfig.for_method("qdiff", **values)


def tiny_dit_pipeline(seed=0, learned_sigma=False):
    """DiTPipeline without a VAE (pixel space), 2 blocks of width 16, 5 classes + null."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                out_channels=2 if learned_sigma else 1, num_layers=2, sample_size=8,
                                patch_size=2, num_embeds_ada_norm=5).eval()
    pipe = DiTPipeline(transformer=dit, vae=None, scheduler=DDPMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(tmp_dir, seed=0, additional_conditions=False):
    """PixArtAlphaPipeline: 1-layer T5 encoder (made-up vocabulary), 2 adaLN-single blocks of
    width 24 (divisible by 3, as the size conditions need) with a learned-variance output, a small VAE."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    tok = _tiny_vocab(tmp_dir)
    torch.manual_seed(seed)
    text = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok.get_vocab()), d_model=16, d_kv=8, num_heads=2, num_layers=1, d_ff=32)).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=24, caption_channels=16,
        use_additional_conditions=additional_conditions).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(tmp_dir, seed=0):
    """StableDiffusionXLPipeline: two 1-layer CLIP text encoders (the second with a projection),
    a text_time UNet, a small VAE."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    tok = _tiny_vocab(tmp_dir)
    torch.manual_seed(seed)
    clip = dict(vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip)).eval()
    text2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip, projection_dim=8)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe
