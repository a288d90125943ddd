"""The TopK SAE (DESIGN §3): parameters, encode, sparse decode, forward, shapes and dtypes."""

import pytest
import torch

from saemnesia_tools.testing import random_sae
from saemnesia_core.sae import SAEConfig, TopKSAE, block_to_tokens, scatter_dense, tokens_to_block


def dense_decode(sae, top_acts, top_indices):
    """Reference: scatter the code to a dense [N, n] vector and multiply by the whole decoder."""
    z = scatter_dense(top_acts, top_indices, sae.cfg.num_latents)
    return z @ sae.W_dec + sae.b_dec


def test_parameters_have_sparsify_names_and_shapes():
    sae = TopKSAE(SAEConfig(d_in=12, num_latents=40, k=3))
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"encoder.weight": (40, 12), "encoder.bias": (40,), "W_dec": (40, 12), "b_dec": (12,)}


def test_new_sae_has_unit_norm_decoder_rows():
    sae = TopKSAE(SAEConfig(8, 32, 2))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_config_round_trips_through_dict_and_ignores_extra_keys():
    cfg = SAEConfig(16, 64, 4, input_unit_norm=True)
    assert SAEConfig.from_dict({**cfg.to_dict(), "expansion_factor": 4, "batch_topk": True}) == cfg


@pytest.mark.parametrize("kwargs", [dict(d_in=0, num_latents=4, k=1), dict(d_in=4, num_latents=4, k=5),
                                    dict(d_in=4, num_latents=4.0, k=1), dict(d_in=True, num_latents=4, k=1)])
def test_config_rejects_invalid_sizes(kwargs):
    with pytest.raises(ValueError):
        SAEConfig(**kwargs)


def test_pre_acts_is_relu_of_affine_map_after_subtracting_b_dec():
    sae = random_sae(seed=1)
    x = torch.randn(5, 16)
    expected = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    torch.testing.assert_close(sae.pre_acts(x), expected)


def test_encode_keeps_exactly_the_k_largest_pre_activations_per_token():
    sae = random_sae(seed=2)
    x = torch.randn(50, 16)
    top_acts, top_indices = sae.encode(x)
    assert top_acts.shape == top_indices.shape == (50, 4) and top_indices.dtype == torch.int64
    assert all(len(set(row.tolist())) == 4 for row in top_indices)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(top_acts, pre.gather(1, top_indices))
    torch.testing.assert_close(top_acts.sort(dim=1).values, pre.topk(4, dim=1).values.sort(dim=1).values)


def test_sparse_decode_equals_dense_decode():
    sae = random_sae(seed=3)
    top_acts, top_indices = sae.encode(torch.randn(40, 16))
    torch.testing.assert_close(sae.decode(top_acts, top_indices), dense_decode(sae, top_acts, top_indices))


def test_sparse_decode_gradients_equal_dense_decode_gradients():
    sae = random_sae(seed=4)
    top_acts, top_indices = sae.encode(torch.randn(20, 16))
    target = torch.randn(20, 16)
    grads = []
    for decode in (sae.decode, lambda a, i: dense_decode(sae, a, i)):
        acts = top_acts.detach().requires_grad_()
        sae.zero_grad()
        (decode(acts, top_indices) - target).pow(2).sum().backward()
        grads.append((acts.grad, sae.W_dec.grad.clone(), sae.b_dec.grad.clone()))
    for sparse, dense in zip(*grads):
        torch.testing.assert_close(sparse, dense)


def test_forward_returns_reconstruction_code_and_fp32_fvu():
    sae = random_sae(seed=5)
    x = torch.randn(30, 16)
    out = sae(x)
    torch.testing.assert_close(out.sae_out, sae.decode(out.latent_acts, out.latent_indices))
    fvu = (out.sae_out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert out.fvu.dtype == torch.float32 and out.fvu.dim() == 0
    torch.testing.assert_close(out.fvu, fvu)


def test_forward_accepts_batched_tokens():
    sae = random_sae(seed=6)
    x = torch.randn(2, 7, 16)
    out = sae(x)
    assert out.sae_out.shape == (2, 7, 16) and out.latent_indices.shape == (2, 7, 4)
    torch.testing.assert_close(out.sae_out.reshape(14, 16), sae(x.reshape(14, 16)).sae_out)


def test_input_unit_norm_makes_the_code_invariant_to_per_token_scale_and_shift():
    sae = random_sae(seed=7, input_unit_norm=True)
    x = torch.randn(10, 16)
    scaled = 3.0 * x + torch.randn(10, 1)
    a, b = sae.encode(x), sae.encode(scaled)
    torch.testing.assert_close(a.top_acts.sort(1).values, b.top_acts.sort(1).values, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.top_indices.sort(1).values, b.top_indices.sort(1).values)


def test_input_unit_norm_forward_undoes_the_standardisation():
    sae = random_sae(seed=8, input_unit_norm=True)
    x = 5 * torch.randn(10, 16) + 2
    out = sae(x)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    standardized = (x - mean) / (std + 1e-5)
    torch.testing.assert_close(out.sae_out, sae.decode(*sae.encode(x)) * std + mean)
    recon = sae.decode(*sae.encode(x))
    fvu = (recon - standardized).pow(2).sum() / (standardized - standardized.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu)


@pytest.mark.parametrize("h, w", [(1, 1), (3, 5), (7, 2), (1, 9), (16, 16)])
def test_block_tokens_round_trip_for_any_spatial_shape(h, w):
    x = torch.randn(2, 16, h, w)
    tokens = block_to_tokens(x)
    assert tokens.shape == (2, h * w, 16)
    assert torch.equal(tokens[1, (h - 1) * w + (w - 1)], x[1, :, h - 1, w - 1])
    assert torch.equal(tokens_to_block(tokens, h, w), x)


@pytest.mark.parametrize("h, w", [(3, 5), (5, 3), (1, 7)])
def test_sae_runs_on_tokens_of_odd_block_shapes(h, w):
    sae = random_sae(seed=9)
    block = torch.randn(3, 16, h, w)
    out = sae(block_to_tokens(block))
    assert tokens_to_block(out.sae_out, h, w).shape == block.shape


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_pre_acts_and_decode_match_fp32(dtype, tol):
    # Compared on the same code: near-ties at the k-th latent may legitimately pick other latents in half precision.
    sae32, sae = random_sae(seed=10), random_sae(seed=10, dtype=dtype)
    x = torch.randn(64, 16)
    torch.testing.assert_close(sae.pre_acts(x.to(dtype)).float(), sae32.pre_acts(x), rtol=tol, atol=tol)
    top_acts, top_indices = sae32.encode(x)
    decoded = sae.decode(top_acts.to(dtype), top_indices)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded.float(), sae32.decode(top_acts, top_indices), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_keeps_dtype_and_reports_fp32_fvu(dtype):
    out = random_sae(seed=10, dtype=dtype)(torch.randn(64, 16, dtype=dtype))
    assert out.sae_out.dtype == out.latent_acts.dtype == dtype
    assert out.fvu.dtype == torch.float32 and torch.isfinite(out.fvu)


def test_decoder_renormalisation_and_gradient_projection():
    sae = random_sae(seed=11)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sae(torch.randn(32, 16)).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), atol=1e-6, rtol=0)
