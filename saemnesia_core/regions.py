"""Regional erasure (DESIGN §6.5): an image-space mask becomes one weight per token of the hooked block.

A ComfyUI MASK is [B, H, W] (or [H, W]) in [0, 1] at image resolution; the block sees a grid of h × w tokens.
Each token's weight is the mean of the mask over the pixels it covers (area resampling, the mask stretched to the
grid when the aspect ratios differ), so a token half inside a hard-edged mask gets half the edit and a token fully
outside gets none, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def token_weights(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """mask [B, H, W] or [H, W] in [0, 1] -> float32 [B, h·w] for the token grid (h, w)."""
    mask = torch.as_tensor(mask)
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or min(mask.shape) == 0:
        raise ValueError(f"a mask must be [B, H, W] or [H, W], got shape {list(mask.shape)}")
    mask = mask.float()
    if not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails too
        raise ValueError("mask values must lie in [0, 1]")
    h, w = (int(g) for g in grid)
    weights = F.interpolate(mask[:, None], size=(h, w), mode="area")[:, 0]
    return weights.clamp(0, 1).reshape(mask.shape[0], h * w)


def item_weights(weights: Tensor, latent_index: Tensor) -> Tensor:
    """The weights [M, N] of a mask batch for block items whose latent-batch index is `latent_index` [B]: item i
    takes mask latent_index[i] mod M, as ComfyUI repeats a shorter mask batch over the latent batch."""
    return weights[latent_index.to(weights.device) % weights.shape[0]]
