"""DiT models (Flux, SD3): which ComfyUI block a hookpoint names, how wide it is, and where its image tokens are
(DESIGN §6.2).

A DiT hookpoint is named as diffusers names the block in the pipeline: `transformer.transformer_blocks.N` is Flux's
N-th double-stream block (ComfyUI's `double_blocks.N`) and SD3's N-th joint block (`joint_blocks.N`);
`transformer.single_transformer_blocks.N` is Flux's N-th single-stream block (`single_blocks.N`). The names are
mapped with ComfyUI's own key maps for the family (`comfy.utils.flux_to_diffusers`, `mmdit_to_diffusers`). An SAE
reads, and an edit replaces, a block's image tokens [B, N, d]: one element of a double-stream or joint block's
output pair, or the image part of a single-stream block's joined text + image tokens (`JOINED`), which ComfyUI
marks in `transformer_options["img_slice"]`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Callable

import comfy.ldm.flux.layers
import comfy.ldm.flux.model
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.utils

JOINED = "joined"  # the block returns text and image tokens joined along the tokens, text first


@dataclass(frozen=True)
class BlockKind:
    prefix: str                             # the diffusers name of the blocks, in the pipeline's transformer
    block_class: type                       # ComfyUI's class for them
    image: int | str                        # the image tokens' place in the block's output pair, or JOINED
    width: Callable[[object], int]          # a block's token width
    image_input: tuple[int, str]            # the image tokens' argument of the block's forward: (position, name)


@dataclass(frozen=True)
class DitFamily:
    name: str
    model_class: type                       # the diffusion model's class in ComfyUI
    key_map: Callable[[dict], dict]         # ComfyUI's map from diffusers keys to its own, for a unet_config
    kinds: tuple[BlockKind, ...]


FAMILIES = (
    DitFamily("flux", comfy.ldm.flux.model.Flux, comfy.utils.flux_to_diffusers, (
        BlockKind("transformer_blocks", comfy.ldm.flux.layers.DoubleStreamBlock, 0,
                  lambda block: block.img_attn.qkv.in_features, (0, "img")),
        BlockKind("single_transformer_blocks", comfy.ldm.flux.layers.SingleStreamBlock, JOINED,
                  lambda block: block.linear1.in_features, (0, "x")))),
    DitFamily("sd3", mmdit.MMDiT, comfy.utils.mmdit_to_diffusers, (
        BlockKind("transformer_blocks", mmdit.JointBlock, 1, lambda block: block.x_block.attn.qkv.in_features,
                  (1, "x")),)),
)


def dit_family(model) -> DitFamily | None:
    """The family of a ComfyUI MODEL's diffusion model, or None (a UNet, or a DiT we do not hook)."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    return next((f for f in FAMILIES if isinstance(diffusion_model, f.model_class)), None)


@cache
def host_marks_image_tokens() -> bool:
    """Whether this ComfyUI tells a single-stream block where its image tokens are (`img_slice`; 0.3.75 does not)."""
    return "img_slice" in inspect.getsource(comfy.ldm.flux.model.Flux.forward_orig)


def dit_blocks(model, family: DitFamily) -> dict[str, str]:
    """Every hookable block: hookpoint → ComfyUI's block path under diffusion_model, by kind and in block order
    (single-stream blocks only where the host marks their image tokens)."""
    blocks = {}
    for kind in family.kinds:
        if kind.image == JOINED and not host_marks_image_tokens():
            continue
        found = {}
        for key, target in family.key_map(model.model.model_config.unet_config).items():
            if key.startswith(kind.prefix + "."):
                path = target[0] if isinstance(target, tuple) else target  # (key, slice) for fused weights
                found[int(key.split(".")[1])] = ".".join(path.split(".")[:2])
        blocks.update({f"transformer.{kind.prefix}.{i}": found[i] for i in sorted(found)})
    return blocks


def block_kind(module) -> BlockKind | None:
    """The kind of a hookable DiT block, or None for a block whose whole output is the image (a UNet's)."""
    return next((k for f in FAMILIES for k in f.kinds if isinstance(module, k.block_class)), None)
