# SPDX-License-Identifier: GPL-3.0-or-later
"""Small models and synthetic data for the training-pipeline tests (no downloads)."""

from __future__ import annotations

import torch



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
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def planted_dataset(root, *, num_samples=64, tokens=(2, 4), d=32, num_atoms=32, active=3, num_objects=3,
                    num_styles=2, concept_scale=0.0, steps=(0, 1), seed=0, shard_mb=0.05):
    """A labelled activation dataset with planted structure, written as shards.

    Every token is a sparse sum of ``active`` of ``num_atoms`` random unit atoms (magnitudes 1-3) plus small
    noise. Each sample has an object label (and a style label, none for every fourth sample); with
    ``concept_scale`` > 0 the sample's object and style directions are added to all its tokens at that scale.
    Returns (path, atoms [num_atoms, d], object_dirs [O, d], style_dirs [S, d]).
    """
    from saemnesia_tools.training.shards import ShardWriter

    gen = torch.Generator().manual_seed(seed)
    unit = lambda m: m / m.norm(dim=1, keepdim=True)  # noqa: E731
    atoms = unit(torch.randn(num_atoms, d, generator=gen))
    object_dirs = unit(torch.randn(num_objects, d, generator=gen))
    style_dirs = unit(torch.randn(num_styles, d, generator=gen))
    h, w = tokens
    vocab = {"object": [f"obj{i}" for i in range(num_objects)], "style": [f"sty{i}" for i in range(num_styles)]}
    with ShardWriter(root, d=d, height=h, width=w, label_vocab=vocab, hookpoint="unet.synthetic", model_id="planted",
                     source={"seed": seed}, shard_mb=shard_mb) as writer:
        for sample in range(num_samples):
            obj = sample % num_objects
            style = -1 if sample % 4 == 3 else (sample // num_objects) % num_styles
            records = []
            for _ in steps:
                idx = torch.rand(h * w, num_atoms, generator=gen).argsort(dim=1)[:, :active]
                mags = 1 + 2 * torch.rand(h * w, active, generator=gen)
                x = (mags[..., None] * atoms[idx]).sum(1) + 0.05 * torch.randn(h * w, d, generator=gen)
                x = x + concept_scale * object_dirs[obj]
                if style >= 0:
                    x = x + concept_scale * style_dirs[style]
                records.append(x)
            t = [1 - s / max(1, len(steps) - 1) for s in range(len(steps))]
            writer.write_sample(sample, torch.stack(records), t=t, timestep=[v * 999 for v in t], step=list(steps),
                                branch=[0] * len(steps), labels=[obj, style])
    return root, atoms, object_dirs, style_dirs


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline at tiny width (two text encoders, text-time conditioning), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, layers_per_block=1)
    text_config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                       vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def clip_tokenizer_folder():
    """The real CLIP tokenizer that ComfyUI ships (transformers and diffusers ship none): only its files are read."""
    from saemnesia_tools.comfyui.host import comfyui_path

    return comfyui_path() / "comfy" / "sd1_tokenizer"
