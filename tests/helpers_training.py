# SPDX-License-Identifier: GPL-3.0-or-later
"""Small models and synthetic data for the training-pipeline tests (no downloads)."""

from __future__ import annotations

import torch

from conftest import comfyui_path


def tiny_sd_pipeline(seed: int = 0, cross_attention_dim: int = 32):
    """A StableDiffusionPipeline with SD1.5's UNet topology at tiny width, random weights, the real CLIP tokenizer.

    The VAE has one level (scale factor 1), so latents are the image size; ``up_blocks.1`` runs at a quarter
    of it with ``block_out_channels[2]`` = 48 channels.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 48, 48),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, layers_per_block=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cross_attention_dim, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                                                max_position_embeddings=77))
    tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_path() / "comfy" / "sd1_tokenizer"), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
