"""The toy world's text-to-image model, built from ComfyUI's own classes.

The UNet is ComfyUI's `UNetModel` with SD1.5's block topology at base width 32 (so
`unet.up_blocks.1.attentions.1` = `output_blocks.4.1` exists, with d = 128 and cross-attention), without
attention at full resolution (it dominates the cost on a CPU). The text encoder is ComfyUI's CLIP text
model at a small size on the real CLIP tokenizer ComfyUI ships. It works in pixel space: 3-channel
"latents" are the image in [-1, 1], decoded by ComfyUI's pixel-space VAE. It predicts v on a DDPM linear
schedule. Everything here is what ComfyUI's own CLIPTextEncode, KSampler and VAEDecode run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base

from saemnesia_core.files import atomic_path

FORMAT = "saemnesia-toy-world/1"
IMAGE_SIZE = 32

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3,
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    # SD1.5's layout minus the full-resolution attention (levels: 32, 16, 8, 4 px at 32 px input)
    "transformer_depth": [0, 0, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
    "context_dim": 128, "num_heads": 4, "num_head_channels": -1, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

TEXT_CONFIG = {
    "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 3,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407, "projection_dim": 128,
}

SAMPLING_SETTINGS = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}


class ToyTextEncoder(comfy.sd1_clip.SDClipModel):
    """ComfyUI's CLIP text model at the toy size: last layer, final layer norm (as SD1.5's CLIP-L)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=model_options,
                         textmodel_json_config=dict(TEXT_CONFIG), return_projected_pooled=False)


class ToyClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=ToyTextEncoder)


class ToyWorldConfig(comfy.supported_models_base.BASE):
    """A model config of our own, never added to ComfyUI's detection list (the toy loader uses it directly)."""

    unet_config = {}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.ChromaRadiance  # 3 channels, identity in/out
    sampling_settings = dict(SAMPLING_SETTINGS)
    supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    memory_usage_factor = 1.0

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, ToyClipModel)


def build_base_model(dtype=torch.float32, device=None) -> comfy.model_base.BaseModel:
    """An untrained toy BaseModel (weights uninitialised: load or initialise them)."""
    config = ToyWorldConfig({**UNET_CONFIG, "dtype": dtype})
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, device=device)


def build_vae() -> comfy.sd.VAE:
    """ComfyUI's pixel-space VAE: decode maps [-1, 1] latents to [0, 1] images."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def save_toy_model(path, unet_state: dict, text_state: dict, provenance: dict, dtype=torch.float16) -> None:
    """One safetensors file: `diffusion_model.*` and `text_encoder.*` tensors + configs in the header."""
    tensors = {f"diffusion_model.{k}": v.detach().to(dtype).contiguous() for k, v in unet_state.items()}
    tensors.update({f"text_encoder.{k}": v.detach().to(dtype).contiguous() for k, v in text_state.items()})
    meta = {"format": FORMAT, "unet_config": json.dumps(UNET_CONFIG), "text_config": json.dumps(TEXT_CONFIG),
            "sampling_settings": json.dumps(SAMPLING_SETTINGS), "provenance": json.dumps(provenance)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def is_toy_model_file(path) -> bool:
    """Whether `path` is a toy-world model file (its header says so; the judges, in the same folder, are not)."""
    if not Path(path).is_file():  # a FIFO would block the reader
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file, unreadable, a FIFO…: not a model to offer
        return False


def read_toy_file(path) -> tuple[dict, dict, dict]:
    """(unet state, text-encoder state, header) of a toy model file; refuses files of another format."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a toy-world model file (format {meta.get('format')!r})")
        unet, text = {}, {}
        for key in f.keys():
            prefix, _, name = key.partition(".")
            (unet if prefix == "diffusion_model" else text)[name] = f.get_tensor(key)
    for key, value in (("unet_config", UNET_CONFIG), ("text_config", TEXT_CONFIG)):
        if json.loads(meta[key]) != value:
            raise ValueError(f"{path} was made for another toy architecture ({key} differs)")
    return unet, text, meta


def load_toy_model(path):
    """(MODEL, CLIP, VAE) for ComfyUI from a toy model file, placed by ComfyUI's memory manager."""
    unet_state, text_state, _ = read_toy_file(path)
    model = _unet_patcher(path, unet_state)
    clip = comfy.sd.CLIP(target=ToyWorldConfig(UNET_CONFIG).clip_target())
    missing, unexpected = clip.load_sd(text_state)
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, clip, build_vae()


def load_toy_unet(path, **_options):
    """The MODEL alone, with the `cached_patcher_init` ComfyUI's own loaders register (0.23+): MultiGPU work units
    call it to load a fresh copy per device (options such as disable_dynamic: this patcher is never dynamic)."""
    return _unet_patcher(path, read_toy_file(path)[0])


def _unet_patcher(path, unet_state: dict):
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(model_params=sum(v.numel() for v in unet_state.values()),
                                              supported_dtypes=ToyWorldConfig.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, ToyWorldConfig.supported_inference_dtypes)
    config = ToyWorldConfig({**UNET_CONFIG, "dtype": dtype})
    config.set_inference_dtype(dtype, manual_cast)
    base = config.get_model({}, device=comfy.model_management.unet_offload_device())
    base.load_model_weights(unet_state, "")
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device,
                                             offload_device=comfy.model_management.unet_offload_device())
    model.cached_patcher_init = (load_toy_unet, (str(path),))
    return model
