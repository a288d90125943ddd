"""Real ComfyUI models without downloads, for tests and benchmarks: ComfyUI's own UNet class with SD1.5's block
layout (so SD1.5's hookpoints exist) at any width, with seeded random weights; and an SDXL-family checkpoint file
with random weights that ComfyUI's own loader detects as such."""

from pathlib import Path

import torch

import comfy.ldm.models.autoencoder
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models


def sd15_unet_config(model_channels=32, context_dim=64, in_channels=4, full_res_attention=True, dtype=torch.float32,
                     num_heads=4):
    """SD1.5's UNet config at a small width; the block layout (and so the hookpoints) is SD1.5's."""
    level0 = 1 if full_res_attention else 0
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": in_channels, "out_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [level0, level0, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [level0] * 3 + [1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": num_heads, "num_head_channels": -1, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": dtype,
    }


def init_random_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised (torch.empty); give every layer torch's default init."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for torch_cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding):
            if isinstance(m, torch_cls):
                torch_cls.reset_parameters(m)  # torch's own init; ComfyUI's override is a no-op
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
    torch.random.set_rng_state(gen_state)


def make_sd15_model(model_channels=32, context_dim=64, in_channels=4, seed=0, full_res_attention=True,
                    dtype=torch.float32, num_heads=4):
    """A ComfyUI MODEL (ModelPatcher over BaseModel, epsilon prediction) with SD1.5 topology, random weights,
    stored and run in `dtype`. SD1.5's real size: model_channels=320, context_dim=768, num_heads=8."""
    class TinySD15(comfy.supported_models.SD15):
        unet_config = {}

    config = TinySD15(sd15_unet_config(model_channels, context_dim, in_channels, full_res_attention, dtype,
                                       num_heads))
    config.set_inference_dtype(dtype, None)
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    init_random_weights(base.diffusion_model, seed)
    base.eval()
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def sdxl_unet_config(transformer_depth: list[int], transformer_depth_middle: int,
                     transformer_depth_output: list[int]) -> dict:
    """A full SDXL-family UNet config (SDXL's widths, three levels) with the given transformer layers per block."""
    return {**comfy.supported_models.SDXL.unet_config, "transformer_depth": transformer_depth,
            "transformer_depth_middle": transformer_depth_middle, "transformer_depth_output": transformer_depth_output,
            "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "num_head_channels": 64, "num_heads": -1,
            "num_classes": "sequential", "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "image_size": 32, "use_checkpoint": False, "use_temporal_resblock": False}


TINY_FLUX = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
             "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
             "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}
# SD3's MMDiT: hidden size 64 × depth, as ComfyUI's detection derives it from the weights
TINY_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
            "adm_in_channels": 32, "pos_embed_max_size": 8, "num_patches": 64, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
            "x_block_self_attn_layers": []}


def tiny_dit_model(family: str, dtype=torch.float32):
    """A ModelPatcher around ComfyUI's own Flux or SD3 model class at a tiny size, random weights (seeded)."""
    config = flux_model_config(**TINY_FLUX) if family == "flux" else comfy.supported_models.SD3(dict(TINY_SD3))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # every weight, and buffers ComfyUI leaves uninitialised (SD3's pos_embed)
        for p in [*base.diffusion_model.parameters(), *base.diffusion_model.buffers()]:
            if p.is_floating_point():
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def tiny_sdxl_model(dtype=torch.float32):
    """ComfyUI's SDXL model class (pooled-text and size conditioning) at a tiny width with SDXL's block layout: three
    levels, attention only at the two deeper ones (so sdxl-unbox's blocks exist), random weights."""
    config = {**sd15_unet_config(model_channels=32, context_dim=32, dtype=dtype),
              "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 1, 1],
              "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
              "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 32,
              "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256}  # pooled text + six size embeddings
    model_config = comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    init_random_weights(base.diffusion_model, seed=0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def flux_model_config(**params) -> comfy.supported_models.Flux:
    """ComfyUI's Flux model config for these parameters, keeping those this host's FluxParams knows (its fields
    differ by version)."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return comfy.supported_models.Flux({"image_model": "flux", **{k: v for k, v in params.items() if k in fields}})


def save_random_sdxl_checkpoint(path: Path, seed: int = 0) -> None:
    """An SDXL-family checkpoint with random weights, written by ComfyUI's own `save_checkpoint` (its key layout), so
    that CheckpointLoaderSimple detects it: the smallest SDXL topology ComfyUI knows (Segmind Vega: SDXL's widths,
    fewer transformer layers; 0.8B UNet parameters), SDXL's two text encoders (CLIP-L and CLIP-G, real size) and an
    SD VAE; fp16, about 3.6 GB. It takes about 10 GB of memory while written."""
    import comfy.sd

    config = comfy.supported_models.Segmind_Vega(sdxl_unet_config([0, 0, 1, 1, 2, 2], 1, [0, 0, 0, 1, 1, 1, 2, 2, 2]))
    config.set_inference_dtype(torch.float16, None)
    base = config.get_model({})
    init_random_weights(base.diffusion_model, seed)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=config.clip_target(), model_options={"dtype": torch.float16})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_random_weights(autoencoder, seed)
    comfy.sd.save_checkpoint(str(path), model, clip, comfy.sd.VAE(sd=autoencoder.state_dict()))
