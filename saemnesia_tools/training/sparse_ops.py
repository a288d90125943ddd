# SPDX-License-Identifier: GPL-3.0-or-later
"""The sparse kernels of training, in plain PyTorch (CPU and CUDA).

A step selects M (token, latent) pairs (TopK, BatchTopK or AuxK) from dense pre-activations computed
without autograd, then differentiates only through those M values:

    forward   pre = ReLU((x − b_dec)·W_encᵀ + b_enc)   [N, n]   one dense GEMM, 2·N·n·d FLOPs (no graph kept)
    backward  ∂W_enc = Sᵀ·(x − b_dec), S the [N, n] sparse gradient with M entries   2·M·d FLOPs
              ∂b_enc = Σ S over tokens;  ∂b_dec = −∂b_enc·W_enc                      2·n·d FLOPs

so the encoder backward costs O(M·d) instead of the 2·N·n·d of autograd through a dense [N, n] tensor
(Gao et al. 2024 §D.2's DenseSparseMatmul). Pairs are kept sorted by token (``rows``), which lets the
decoder gather per token with `embedding_bag` bags.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Selection(NamedTuple):
    """M selected (token, latent) pairs, sorted by token."""

    rows: Tensor  # [M] int64 token index
    cols: Tensor  # [M] int64 latent index


def per_token_topk(pre: Tensor, k: int) -> Selection:
    """The k largest latents of each token of ``pre`` [N, n]."""
    idx = pre.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(idx.shape[1])
    return Selection(rows, idx.reshape(-1))


def batch_topk(pre: Tensor, k: int, gather=None) -> Selection:
    """BatchTopK: the k·N largest (positive) activations of the batch ``pre`` [N, n], any number per token.

    ``gather`` concatenates a tensor across ranks (data-parallel training with equal local batches), so the
    threshold is that of the global batch. Candidates are each token's top 4k values; when a token's
    candidates could be cut short, whole rows are used instead, so the threshold is exact.
    """
    gather = gather or (lambda t: t)
    count = k * int(gather(torch.tensor([pre.shape[0]], device=pre.device)).sum())

    def kth_largest(values: Tensor) -> Tensor:
        top = gather(values.topk(min(count, values.numel())).values)
        return top.topk(min(count, top.numel())).values[-1]

    cand = pre.topk(min(pre.shape[1], 4 * k), dim=-1).values  # [N, 4k], sorted descending
    threshold = kth_largest(cand.flatten())
    if cand.shape[1] < pre.shape[1] and gather((cand[:, -1] >= threshold).any().float().reshape(1)).max() > 0:
        threshold = kth_largest(pre.flatten())
    rows, cols = ((pre >= threshold) & (pre > 0)).nonzero(as_tuple=True)
    return Selection(rows, cols)


def dead_latent_topk(pre: Tensor, dead: Tensor, k_aux: int) -> Selection:
    """AuxK's pairs: each token's ``k_aux`` largest pre-activations among the ``dead`` [n] latents."""
    dead_ids = dead.nonzero().squeeze(1)
    sub = pre.index_select(1, dead_ids)
    idx = sub.topk(min(k_aux, dead_ids.numel()), dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(idx.shape[1])
    return Selection(rows, dead_ids[idx.reshape(-1)])


class _SparseEncoderGather(torch.autograd.Function):
    """values[m] = pre[rows[m], cols[m]], with gradients for W_enc, b_enc, b_dec computed sparsely."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, rows, cols):
        values = pre[rows, cols]
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, values)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, b_dec, rows, cols, values = ctx.saved_tensors
        g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))  # through the ReLU
        n, N = W_enc.shape[0], x.shape[0]
        grad_b_enc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_W = None
        if ctx.needs_input_grad[1]:
            S_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (n, N), check_invariants=False)
            grad_W = torch.sparse.mm(S_t, x - b_dec)
        grad_b_dec = -(grad_b_enc @ W_enc) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b_enc, grad_b_dec, None, None, None


def encoder_values(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, pre: Tensor, sel: Selection,
                   sparse_grad: bool = True) -> Tensor:
    """[M] activations of the selected pairs, differentiable w.r.t. the encoder (and b_dec).

    ``pre`` [N, n] must be ReLU((x − b_dec)·W_encᵀ + b_enc) computed from the same tensors. With
    ``sparse_grad=False`` the values are gathered from a dense autograd recomputation instead (reference path).
    """
    if sparse_grad:
        return _SparseEncoderGather.apply(x, W_enc, b_enc, b_dec, pre, sel.rows, sel.cols)
    dense = F.relu(F.linear(x - b_dec, W_enc, b_enc))
    return dense[sel.rows, sel.cols]


def decode_rows(values: Tensor, sel: Selection, W_dec: Tensor, num_rows: int) -> Tensor:
    """[M] values of pairs sorted by token -> [num_rows, d] = Σ values·W_dec[cols] per token (no bias)."""
    offsets = torch.searchsorted(sel.rows, torch.arange(num_rows, device=sel.rows.device))
    return F.embedding_bag(sel.cols, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")
