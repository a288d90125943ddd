"""DiT models (Flux, SD3): which ComfyUI block a hookpoint names, how wide it is, and where its image tokens are
(DESIGN §6.2).

A DiT hookpoint is named as diffusers names the block in the pipeline, `transformer.transformer_blocks.N`: Flux's
N-th double-stream block (ComfyUI's `double_blocks.N`), SD3's N-th joint block (`joint_blocks.N`). The names are
mapped with ComfyUI's own key maps for the family (`comfy.utils.flux_to_diffusers`, `mmdit_to_diffusers`). Such a
block returns its image and its text tokens, [B, N, d] each; an SAE reads, and an edit replaces, the image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.ldm.flux.layers
import comfy.ldm.flux.model
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.utils


@dataclass(frozen=True)
class DitFamily:
    name: str
    model_class: type                       # the diffusion model's class in ComfyUI
    key_map: Callable[[dict], dict]         # ComfyUI's map from diffusers keys to its own, for a unet_config
    block_class: type                       # the hookable block's class
    image_output: int                       # the image tokens' place in the block's output pair
    width: Callable[[object], int]          # a block's token width


FAMILIES = (
    DitFamily("flux", comfy.ldm.flux.model.Flux, comfy.utils.flux_to_diffusers,
              comfy.ldm.flux.layers.DoubleStreamBlock, 0, lambda block: block.img_attn.qkv.in_features),
    DitFamily("sd3", mmdit.MMDiT, comfy.utils.mmdit_to_diffusers,
              mmdit.JointBlock, 1, lambda block: block.x_block.attn.qkv.in_features),
)
PREFIX = "transformer.transformer_blocks."


def dit_family(model) -> DitFamily | None:
    """The family of a ComfyUI MODEL's diffusion model, or None (a UNet, or a DiT we do not hook)."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    return next((f for f in FAMILIES if isinstance(diffusion_model, f.model_class)), None)


def dit_blocks(model, family: DitFamily) -> dict[str, str]:
    """Every hookable block: hookpoint → ComfyUI's block path under diffusion_model, in block order."""
    blocks = {}
    for key, target in family.key_map(model.model.model_config.unet_config).items():
        if key.startswith("transformer_blocks."):
            path = target[0] if isinstance(target, tuple) else target  # (key, slice) for fused weights
            blocks[PREFIX + key.split(".")[1]] = ".".join(path.split(".")[:2])
    return dict(sorted(blocks.items(), key=lambda kv: int(kv[0].removeprefix(PREFIX))))


def image_output(module) -> int | None:
    """Where a block's image tokens are in its output: an index into its output pair for a DiT block, None for a
    block whose whole output is the image (a UNet's)."""
    return next((f.image_output for f in FAMILIES if isinstance(module, f.block_class)), None)
