"""Timesteps as a fraction of the training schedule, and the statistics buckets over them.

Everywhere outside ComfyUI, t = model timestep / (number of training timesteps − 1), so t ∈ [0, 1] and
1 is pure noise. Statistics are kept per bucket of t (DESIGN §5.3), so they serve any sampler and step count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def bucket_index(t: Tensor | float, num_buckets: int) -> Tensor:
    """t ∈ [0, 1] (any shape) -> int64 bucket floor(t·T), clamped to [0, T−1]; on t's device.

    Computed in float64 on the CPU so bucket edges do not depend on the caller's dtype or device.
    """
    t = torch.as_tensor(t)
    device = t.device
    t64 = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t64).all()):
        raise ValueError(f"timestep fraction must be finite, got {t}")
    return (t64 * num_buckets).floor().clamp(0, num_buckets - 1).long().to(device)


def bucket_of(t: float, num_buckets: int) -> int:
    """bucket_index of one number, on the host."""
    if not math.isfinite(t):
        raise ValueError(f"timestep fraction must be finite, got {t}")
    return min(max(math.floor(t * num_buckets), 0), num_buckets - 1)


def item_buckets(t: Tensor | float | Sequence[float], num_buckets: int, batch: int, device) -> Tensor:
    """Each item's bucket [B] for t ∈ [0, 1] (numbers, or a tensor [B] on any device): bucket_index,
    without its trip through the host for a tensor (float64 on the tensor's own device gives the same buckets)."""
    if not isinstance(t, Tensor):
        values = [float(t)] * batch if isinstance(t, (int, float)) else [float(v) for v in t]
        return torch.tensor([bucket_of(v, num_buckets) for v in values], device=device)
    return (t.to(device, torch.float64) * num_buckets).floor_().clamp_(0, num_buckets - 1).long().expand(batch)


def timestep_to_t(timestep: Tensor | float, num_train_timesteps: int = 1000) -> Tensor:
    """Model timestep (0 … num_train_timesteps−1) -> t ∈ [0, 1], float64."""
    return torch.as_tensor(timestep, dtype=torch.float64) / (num_train_timesteps - 1)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> Tensor:
    """The model timesteps of a diffusers DDIM run with "leading" spacing, noisiest first.

    SD's scheduler config (steps_offset 1) gives 991, 981, …, 1 for 100 steps over 1000: the steps the
    SAeUron/SAEmnesia statistics pickles are indexed by.
    """
    ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * ratio + steps_offset
