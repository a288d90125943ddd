# SPDX-License-Identifier: GPL-3.0-or-later
"""Unsupervised TopK trainer: learning planted features, exact sparse gradients, AuxK, exact resume."""

import pytest
import torch

from helpers_training import planted_dataset
from saemnesia_core.sae import SAEConfig, TopKSAE
from saemnesia_core.sae_file import load_sae_file
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.sparse_ops import batch_topk, per_token_topk
from saemnesia_tools.training.trainer import TrainConfig, UnsupervisedStep, train_unsupervised

SMALL = dict(expansion_factor=2, k=3, batch_size=64, lr=2e-2, dead_tokens_threshold=2000, log_every=10)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_dataset(tmp_path_factory.mktemp("planted"), num_samples=96)


@pytest.mark.parametrize("batch_topk_training", [False, True])
def test_trainer_reduces_fvu_and_recovers_planted_atoms(planted, tmp_path, batch_topk_training):
    root, atoms, _, _ = planted
    cfg = TrainConfig(**SMALL, batch_topk=batch_topk_training, epochs=8)
    result = train_unsupervised(root, cfg, out=tmp_path / "sae.safetensors", progress=False)
    first, last = result.history[0]["fvu"], result.history[-1]["fvu"]
    assert last < 0.25 < first
    assert result.history[-1]["l0"] == pytest.approx(3.0)  # k per token (on average for BatchTopK)
    cosines = torch.nn.functional.normalize(result.sae.W_dec.detach(), dim=1) @ atoms.T  # [n, atoms]
    assert (cosines.max(0).values > 0.9).float().mean() >= 0.9  # (almost) every planted atom has a latent
    saved = load_sae_file(tmp_path / "sae.safetensors")
    assert saved.config.num_latents == 64 and not saved.concepts and saved.hookpoint == "unet.synthetic"
    assert torch.equal(saved.weights["W_dec"], result.sae.W_dec.detach())


def test_sparse_encoder_gradient_equals_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    params = []
    for sparse in (True, False):
        torch.manual_seed(1)
        sae = TopKSAE(SAEConfig(16, 64, 4))
        sae.b_dec.data.normal_()
        step = UnsupervisedStep(sae, TrainConfig(k=4, batch_topk=True, sparse_grad=sparse, dead_tokens_threshold=0),
                                DistContext())
        step.tokens_since_fired[::2] = 1  # half the latents dead: AuxK contributes too
        opt = torch.optim.SGD(sae.parameters(), lr=0.1)
        metrics = step(x, opt)
        assert metrics["auxk"] > 0
        params.append([p.detach().clone() for p in sae.parameters()])
    for a, b in zip(*params):
        assert torch.allclose(a, b, atol=1e-6)


def test_auxk_is_the_corrected_gao_form():
    """ê from the dead latents' top-k_aux without b_dec; e = x − x̂ (detached); scaled by min(#dead/k_aux, 1)."""
    torch.manual_seed(0)
    d, n, k, k_aux = 8, 32, 2, 4
    sae = TopKSAE(SAEConfig(d, n, k))
    sae.b_dec.data.normal_()
    x = torch.randn(40, d)
    step = UnsupervisedStep(sae, TrainConfig(k=k, k_aux=k_aux, batch_topk=False, dead_tokens_threshold=0),
                            DistContext())
    dead = torch.zeros(n, dtype=torch.bool)
    dead[:3] = True  # 3 dead < k_aux: scale 3/4, each token uses all 3
    step.tokens_since_fired[dead] = 1
    with torch.no_grad():
        pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
        top = pre.topk(k).indices
        z = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top))
        recon = z @ sae.W_dec + sae.b_dec
        e_hat = (pre * dead) @ sae.W_dec
        variance = (x - x.mean(0)).pow(2).sum()
        expected = 3 / 4 * ((x - recon) - e_hat).pow(2).sum() / variance
    metrics = step(x, torch.optim.SGD(sae.parameters(), lr=0.0))
    assert metrics["auxk"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["dead_fraction"] == pytest.approx(3 / n)


def test_batch_topk_keeps_the_k_n_largest_of_the_batch():
    torch.manual_seed(0)
    pre = torch.relu(torch.randn(50, 40))
    pre[3] += 5 + torch.rand(40)  # one token holds far more than k of the batch's largest values
    sel = batch_topk(pre, 2)
    assert sorted((sel.rows * 40 + sel.cols).tolist()) == sorted(pre.flatten().topk(100).indices.tolist())
    assert (sel.rows == 3).sum() > 2
    tok = per_token_topk(pre, 2)
    assert torch.equal(torch.bincount(tok.rows), torch.full((50,), 2))


def test_resume_equals_uninterrupted_run(planted, tmp_path):
    root = planted[0]
    cfg = TrainConfig(**SMALL, epochs=3, checkpoint_every=7)  # stop mid-epoch, between checkpoints
    total = train_unsupervised(root, cfg, progress=False)
    interrupted = train_unsupervised(root, cfg, checkpoint_dir=tmp_path, progress=False, stop_at_step=17)
    assert interrupted.steps == 17 < total.steps
    resumed = train_unsupervised(root, cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.steps == total.steps
    for name, value in total.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert resumed.history == total.history


def test_resume_refuses_a_checkpoint_of_another_config(planted, tmp_path):
    train_unsupervised(planted[0], TrainConfig(**SMALL, max_steps=3), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another run"):
        train_unsupervised(planted[0], TrainConfig(**{**SMALL, "k": 4}, max_steps=3), checkpoint_dir=tmp_path,
                           progress=False)
