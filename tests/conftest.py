"""Shared fixtures: tiny diffusers pipelines built from configs.

These models have RANDOM weights: they are for shapes, plumbing and numerics of the
quantization machinery, never for quality claims (those use the bundled trained model).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel


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
