"""Where each concept fires in a block, token by token: the Concept Probe node's maps. Nothing is edited."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .concepts import Concept, ConceptTables, concept_indices
from .eraser import as_tokens, sae_pre_activations
from .sae import TopKSAE
from .timesteps import bucket_index


def concept_activation_maps(sae: TopKSAE, concepts: list[Concept], tables: ConceptTables, x: Tensor,
                            t: Tensor | float, labels: Sequence[str]) -> Tensor:
    """Where each concept fires: Σ over its selected latents (bucket of t) of z_i per token; nothing is edited.

    x (the signal the SAE reads: the block's output, or its update) [B, C, H, W] -> [B, len(labels), H, W];
    [B, N, d] -> [B, len(labels), N]; float32.
    """
    chosen = concept_indices(concepts, labels)
    with torch.no_grad():
        tokens = as_tokens(x, sae.cfg.d_in)
        B, N, _ = tokens.shape
        buckets = bucket_index(t, tables.num_buckets).expand(B).cpu()
        lat = tables.latents[chosen].cpu()[:, buckets]                      # [C', B, L]
        lat = lat.transpose(0, 1).reshape(B, -1).to(x.device)               # [B, C'·L]
        cast = [p.to(x.device, x.dtype) for p in (sae.encoder.weight, sae.encoder.bias, sae.b_dec)]
        pre_encoder = sae.pre_encoder_weights
        pre_encoder = None if pre_encoder is None else tuple(p.to(x.device, x.dtype) for p in pre_encoder)
        pre, _ = sae_pre_activations(sae, tokens, *cast, pre_encoder)
        kth = pre.topk(sae.cfg.k, dim=-1).values[..., -1:]
        z = pre.gather(-1, lat.clamp(min=0)[:, None, :].expand(B, N, -1))  # [B, N, C'·L]
        z = torch.where((z >= kth) & (lat >= 0)[:, None, :], z, 0.0).float()
        maps = z.reshape(B, N, len(chosen), -1).sum(-1).transpose(1, 2)     # [B, C', N]
    return maps.reshape(B, len(chosen), *x.shape[2:]) if x.dim() == 4 else maps
