"""The TopK sparse autoencoder of DESIGN §3, with sparsify's parameter names so published checkpoints load as is.

pre(x) = ReLU((x − b_dec)·W_encᵀ + b_enc);  z = TopK_k(pre(x));  x̂ = z·W_dec + b_dec (decoded sparsely).
With SAEParate's pre-encoder, x − b_dec first goes through GELU(Linear(d, d)) (`pre_encoder.0.*`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNIT_NORM_EPS = 1e-5
"""Added to the token's std before dividing, as SAeUron's `preprocess_input` does."""


@dataclass
class SAEConfig:
    d_in: int
    """Width of one token (the block's channel count)."""
    num_latents: int
    """Dictionary size n."""
    k: int
    """Latents kept per token."""
    input_unit_norm: bool = False
    """Standardise each token before encoding and undo it after decoding (SAeUron's flag)."""
    pre_encoder: bool = False
    """SAEParate's pre-encoder: x − b_dec passes through GELU(Linear(d, d)) before the encoder."""

    def __post_init__(self):
        for name in ("d_in", "num_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.k > self.num_latents:
            raise ValueError(f"SAEConfig.k = {self.k} exceeds num_latents = {self.num_latents}")
        for name in ("input_unit_norm", "pre_encoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SAEConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """Build from a dict, ignoring keys that are not fields (like sparsify's `drop_extra_fields`)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[N, k] values of the k largest pre-activations of each token."""
    top_indices: Tensor
    """[N, k] int64 latent index of each of them."""


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """[N, d] reconstruction x̂, in the input's space (standardisation undone)."""
    latent_acts: Tensor
    """[N, k] top-k activations."""
    latent_indices: Tensor
    """[N, k] int64 top-k latent indices."""
    fvu: Tensor
    """Scalar fp32 fraction of variance unexplained, in the SAE's (standardised) space, as SAeUron trains it."""


class Standardized(NamedTuple):
    x: Tensor
    """[..., d] (x − mean) / (std + eps)."""
    mean: Tensor
    """[..., 1]"""
    std: Tensor
    """[..., 1] unbiased std over the token's features (without eps; it undoes the standardisation)."""


def standardize(x: Tensor) -> Standardized:
    """Per-token standardisation of SAeUron's `input_unit_norm`."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.std(dim=-1, keepdim=True)
    return Standardized(centred / (std + UNIT_NORM_EPS), mean, std)


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                    pre_encoder: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[..., d] -> [..., n]: ReLU((x − b_dec)·W_encᵀ + b_enc), with (weight, bias) of a pre-encoder applied as
    GELU(Linear) to x − b_dec first. ReLU in place: one n-wide tensor, not two.
    One [tokens, d] product: given [B, N, d] tokens of a block (a strided view), PyTorch's matmul folds the batch
    into one product only when the weight requires grad, and otherwise copies W_enc once per item."""
    centred = (x - b_dec).reshape(-1, x.shape[-1])
    if pre_encoder is not None:
        centred = F.gelu(F.linear(centred, *pre_encoder))
    out = F.linear(centred, W_enc, b_enc).relu_()
    return out.reshape(*x.shape[:-1], W_enc.shape[0])


def sparse_decode(acts: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """[..., m] weights of rows `indices` of W_dec [n, d] -> [..., d] = Σ_j acts_j·W_dec[indices_j] (no bias).

    A gather of m rows per token (`embedding_bag`), never a dense [tokens, n] product.
    """
    m = indices.shape[-1]
    out = F.embedding_bag(
        indices.reshape(-1, m), W_dec, per_sample_weights=acts.reshape(-1, m).to(W_dec.dtype), mode="sum"
    )
    return out.reshape(*indices.shape[:-1], W_dec.shape[-1])


def scatter_dense(top_acts: Tensor, top_indices: Tensor, num_latents: int) -> Tensor:
    """[..., k] sparse code -> [..., n] dense z (zeros elsewhere). For statistics and tests, not the hot path."""
    z = top_acts.new_zeros(*top_acts.shape[:-1], num_latents)
    return z.scatter_(-1, top_indices, top_acts)


class TopKSAE(nn.Module):
    """Per-token TopK SAE. Parameters: encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d]."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        if cfg.pre_encoder:  # SAEParate's keys: pre_encoder.0.weight, pre_encoder.0.bias
            self.pre_encoder = nn.Sequential(nn.Linear(cfg.d_in, cfg.d_in, device=device, dtype=dtype), nn.GELU())
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        # sparsify's initialisation: the decoder starts as the (row-normalised) encoder.
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    def preprocess(self, x: Tensor) -> Standardized:
        """Raw tokens [..., d] -> the SAE's input space (standardised if `input_unit_norm`), in the weights' dtype."""
        x = x.to(self.dtype)
        if self.cfg.input_unit_norm:
            return standardize(x)
        return Standardized(x, x.new_zeros(()), x.new_ones(()))

    @property
    def pre_encoder_weights(self) -> tuple[Tensor, Tensor] | None:
        """(weight, bias) of the pre-encoder's Linear, or None."""
        return (self.pre_encoder[0].weight, self.pre_encoder[0].bias) if self.cfg.pre_encoder else None

    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d] already preprocessed -> [..., n] dense pre-activations."""
        return pre_activations(x.to(self.dtype), self.encoder.weight, self.encoder.bias, self.b_dec,
                               self.pre_encoder_weights)

    def select_topk(self, pre_acts: Tensor) -> EncoderOutput:
        return EncoderOutput(*pre_acts.topk(self.cfg.k, dim=-1, sorted=False))

    def encode(self, x: Tensor) -> EncoderOutput:
        """Raw tokens [..., d] -> the k largest latents of each token."""
        return self.select_topk(self.pre_acts(self.preprocess(x).x))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """[..., k] code -> [..., d] reconstruction in the SAE's input space: z·W_dec + b_dec, sparsely."""
        return sparse_decode(top_acts, top_indices, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        """Tokens [..., d] -> reconstruction (standardisation undone), code, and FVU over all tokens."""
        s = self.preprocess(x)
        top_acts, top_indices = self.select_topk(self.pre_acts(s.x))
        recon = self.decode(top_acts, top_indices)
        x_in = s.x.reshape(-1, self.cfg.d_in).float()
        residual = recon.reshape(-1, self.cfg.d_in).float() - x_in
        fvu = residual.pow(2).sum() / (x_in - x_in.mean(0)).pow(2).sum()
        return ForwardOutput(recon * s.std + s.mean, top_acts, top_indices, fvu)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """Project each decoder row's gradient onto the row's tangent space (rows are unit-norm)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data


def block_to_tokens(x: Tensor) -> Tensor:
    """[B, C, H, W] block output -> [B, H*W, C] tokens (a view)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_block(t: Tensor, h: int, w: int) -> Tensor:
    """[B, H*W, C] tokens -> [B, C, H, W]."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
