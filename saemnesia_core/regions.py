"""Regional erasure (DESIGN §6.5): an image-space mask becomes one weight per token of the hooked block.

A ComfyUI MASK is [B, H, W] (or [H, W]) in [0, 1] at image resolution; the block sees a grid of h × w tokens.
Each token's weight is the mean of the mask over the pixels it covers (area resampling, the mask stretched to the
grid when the aspect ratios differ), so a token half inside a hard-edged mask gets half the edit and a token fully
outside gets none, bit for bit. The edit blends each token toward its edited value by its weight, and replace mode
finds each detected token's nearest undetected one on the same grid.
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


def checked_weights(region: Tensor | None, shape: Sequence[int], device) -> Tensor | None:
    """Region weights as float32 [B, N], checked; None stays None."""
    if region is None:
        return None
    B, N = shape
    weights = torch.as_tensor(region, device=device).float()
    if weights.shape[0] != B or weights[0].numel() != N:
        raise ValueError(f"region must hold one weight per token of each item ([{B}, {N}] or [{B}, H, W]), "
                         f"got shape {list(weights.shape)}")
    weights = weights.reshape(B, N)
    if not bool(((weights >= 0) & (weights <= 1)).all()):  # NaN fails too
        raise ValueError("region weights must lie in [0, 1]")
    return weights


def blend(x: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """x + w·(target − x) per token (w [b, N]): x itself, bit for bit, where w = 0, target itself where w = 1
    (torch.lerp computes t − (t − x)·(1 − w) from w = 0.5 on)."""
    w = w[..., None]
    return torch.where(w > 0, torch.lerp(x.float(), target.float(), w).to(x.dtype), x)


def nearest_undetected(detected: Tensor, grid: Sequence[int]) -> Tensor:
    """For each detected token, the index of the nearest undetected token of its feature map (Euclidean distance on
    the H×W grid, ties to the lowest index); −1 for undetected tokens and where every token is detected.

    detected bool [b, N] with N = H·W -> int64 [b, N] (replace mode's choice of source, as a function of its own)."""
    H, W = (int(g) for g in grid)
    if detected.shape[1] != H * W:
        raise ValueError(f"{detected.shape[1]} tokens do not fill a {H}×{W} grid")
    position = torch.arange(H * W, device=detected.device)
    yx = torch.stack([position // W, position % W], -1).float()
    distances = (yx[:, None] - yx[None]).pow(2).sum(-1)
    nearest = torch.where(detected[:, None, :], float("inf"), distances).argmin(-1)
    placed = detected & ~detected.all(-1, keepdim=True)
    return torch.where(placed, nearest, -1)
