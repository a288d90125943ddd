# SPDX-License-Identifier: GPL-3.0-or-later
"""Supervised (SAEmnesia) fine-tuning, the greedy assignment, its losses, and concept statistics."""

import pytest
import torch
import torch.nn.functional as F

from helpers_training import planted_dataset
from saemnesia_core.concepts import Concept
from saemnesia_core.sae import SAEConfig, TopKSAE
from saemnesia_core.sae_file import load_sae_file, read_header
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import ActivationDataset, validation_mask
from saemnesia_tools.training.statistics import auroc, compute_statistics, concept_activations
from saemnesia_tools.training.supervised import (
    SupervisedConfig, SupervisedStep, assign_latents, cross_group_decorrelation, finetune_supervised,
)
from saemnesia_tools.training.trainer import TrainConfig, train_unsupervised

FINETUNE = dict(lr=2e-2, batch_records=16, max_epochs=20, patience=5, num_buckets=2)


@pytest.fixture(scope="module")
def planted_concepts(tmp_path_factory):
    """Concept directions (scale 1) under stronger background features, and an unsupervised SAE on them."""
    root = tmp_path_factory.mktemp("concepts")
    planted_dataset(root, num_samples=160, concept_scale=1.0)
    cfg = TrainConfig(expansion_factor=2, k=3, batch_size=64, lr=2e-2, dead_tokens_threshold=2000, epochs=6)
    train_unsupervised(root, cfg, out=root / "unsupervised.safetensors", progress=False)
    return root


def test_assignment_is_greedy_exclusive_and_objects_go_first():
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.0],     # style A: best on latent 0
                           [0.5, 0.1, 0.05, 0.0],    # object X: also best on 0
                           [0.1, 0.7, 0.6, 0.0]])    # object Y: best on 1
    groups = ["style", "object", "object"]
    assert assign_latents(scores, groups) == [2, 0, 1]                       # objects first: X takes 0
    assert assign_latents(scores, groups, priority_groups=()) == [0, 2, 1]  # best pair first: A takes 0
    with pytest.raises(ValueError):
        assign_latents(torch.zeros(5, 4), ["object"] * 5)


def test_decorrelation_counts_only_pairs_across_groups():
    a = torch.randn(64)
    v = torch.stack([a, 2 * a + 1, torch.randn(64)], 1)  # columns 0, 1 perfectly correlated
    assert cross_group_decorrelation(v, ["object", "object", "style"]) < 0.2  # the 0-1 pair is within a group
    assert cross_group_decorrelation(v, ["object", "style", "style"]) > 0.45   # (1.0 + small + small) / 2


def test_concept_logits_are_the_spatial_mean_of_pre_relu_encoder_outputs():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(8, 32, 2))
    sae.b_dec.data.normal_()
    concepts = [Concept("a", "object", 3), Concept("b", "object", 7), Concept("s", "style", 11)]
    batch = next(iter(_tiny_records()))
    for post_relu in (False, True):
        cfg = SupervisedConfig(beta=1.0, eta=0.0, l1=0.0, ca_post_relu=post_relu)
        step = SupervisedStep(sae, cfg, concepts, ["object", "style"], {"object": ["a", "b"], "style": ["s"]},
                              DistContext())
        got = step.losses(batch, len(batch))["ca"]
        with torch.no_grad():
            pre_relu = (batch.acts.float() - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias  # [R, HW, n]
            act = F.relu(pre_relu) if post_relu else pre_relu
            logits = act.mean(1)[:, [3, 7, 11]]
        targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 0, 1]])  # labels of _tiny_records
        expected = F.binary_cross_entropy_with_logits(logits, targets)
        assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5)


def _tiny_records():
    from saemnesia_tools.training.shards import RecordBatch

    torch.manual_seed(1)
    yield RecordBatch(acts=torch.randn(3, 4, 8), t=torch.ones(3), timestep=torch.full((3,), 999.0),
                      step=torch.zeros(3, dtype=torch.int32), branch=torch.zeros(3, dtype=torch.int8),
                      sample=torch.arange(3), labels=torch.tensor([[0, -1], [1, 0], [0, 0]], dtype=torch.int32))


def test_auroc_counts_ties_half():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])) == 0.5
    assert auroc(torch.tensor([1.0]), torch.tensor([0.0, 2.0])) == 0.5


def test_finetuning_makes_each_assigned_latent_fire_selectively(planted_concepts, tmp_path):
    root = planted_concepts
    result = finetune_supervised(root / "unsupervised.safetensors", root, SupervisedConfig(**FINETUNE),
                                 out=tmp_path / "supervised.safetensors", progress=False)
    latents = [c.latent for c in result.concepts]
    assert len(set(latents)) == len(latents) == 5
    before = {s["label"]: s for s in result.selectivity_before}
    after = {s["label"]: s for s in result.selectivity_after}
    # The threshold: every assigned latent detects its concept (AUROC >= 0.95 on validation records) ...
    assert min(s["auroc"] for s in after.values()) >= 0.95
    assert min(s["selectivity"] for s in after.values()) >= 0.8
    # ... which none of the unsupervised SAE's best-scoring latents reaches (seen: 0.81-0.88 over split seeds;
    # their on/(on+off) ratio can be high, but only because they rarely fire at all).
    assert max(s["auroc"] for s in before.values()) < 0.95
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    # how much of each concept its latent carries (DESIGN §4.4), before and after, in the file's provenance
    for report in (result.centralisation_before, result.centralisation_after):
        assert [(r["label"], r["latent"]) for r in report] == [(c.label, c.latent) for c in result.concepts]
    assert min(r["auroc"] for r in result.centralisation_after) >= 0.95 > \
        max(r["auroc"] for r in result.centralisation_before)

    saved = load_sae_file(tmp_path / "supervised.safetensors")
    assert saved.supervised and saved.selection_mode == "saemnesia"
    assert saved.provenance["centralisation_after"] == result.centralisation_after
    assert [(c.label, c.group, c.latent) for c in saved.concepts] == \
        [(c.label, c.group, c.latent) for c in result.concepts]
    assert saved.tables.latents.shape == (5, 2, 1)
    assert torch.equal(saved.tables.latents[:, :, 0], torch.tensor(latents)[:, None].expand(5, 2))
    assert bool((saved.tables.mean_acts > saved.tables.thresholds).all())  # μ_c above the all-concept mean


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_epochs_weights(planted_concepts):
    def finetune(**overrides):
        cfg = SupervisedConfig(**{**FINETUNE, "lr": 0.05, **overrides})  # a rate at which the validation loss wobbles
        return finetune_supervised(planted_concepts / "unsupervised.safetensors", planted_concepts, cfg,
                                   progress=False)

    stopped = finetune(max_epochs=12, patience=1)
    losses = [h["val_loss"] for h in stopped.history]
    best = losses.index(min(losses))
    assert len(set(losses)) == len(losses)          # every epoch changed the weights
    assert len(losses) == best + 2 < 12             # stopped one epoch after the best, before max_epochs
    until_best = finetune(max_epochs=best + 1, patience=100)  # the same run, ended at the best epoch
    restored, expected = stopped.sae.state_dict(), until_best.sae.state_dict()
    assert all(torch.equal(restored[k], expected[k]) for k in expected)  # not the last epoch's (its loss differs)


def test_statistics_saeuron_mode_selects_by_score_per_bucket(planted_concepts, tmp_path):
    out = tmp_path / "saeuron.safetensors"
    sae_file = compute_statistics(planted_concepts / "unsupervised.safetensors", planted_concepts, num_buckets=2,
                                  percentile=99.0, out=out, progress=False)
    header = read_header(out)
    assert header.selection_mode == "saeuron" and not header.supervised
    assert [(c.group, c.label) for c in header.concepts] == \
        [("object", "obj0"), ("object", "obj1"), ("object", "obj2"), ("style", "sty0"), ("style", "sty1")]
    assert all(c.latent is None for c in header.concepts)
    assert bool((sae_file.tables.latents[:, :, 0] >= 0).all())  # 99th percentile of 64 keeps at least one


def test_statistics_match_a_direct_computation(planted_concepts):
    sae = load_sae_file(planted_concepts / "unsupervised.safetensors").build_sae(dtype=torch.float32)
    ds = ActivationDataset(planted_concepts)
    acts = concept_activations(sae, ds, num_buckets=2, progress=False)
    records = [ds.load_shard(i) for i in range(len(ds.shards))]
    acts_all = torch.cat([r.acts for r in records]).float()
    labels, t = torch.cat([r.labels for r in records]), torch.cat([r.t for r in records])
    with torch.no_grad():
        top = sae.encode(acts_all)
        z = torch.zeros(*top.top_acts.shape[:2], 64).scatter_(-1, top.top_indices, top.top_acts).mean(1)  # [R, n]
    rows = (labels[:, 0] == 1) & (t >= 0.5)  # obj1 in bucket 1 of 2
    assert torch.allclose(acts.sums[1, 1], z[rows].sum(0), atol=1e-4)
    assert acts.records[1, 1] == rows.sum()
    unstyled = labels[:, 1] < 0
    assert acts.records[3:].sum() == (~unstyled).sum()  # style concepts count only styled records
    assert torch.allclose(acts.all_sums.sum(0), z.sum(0), atol=1e-3)


def test_interrupted_finetuning_resumes_to_the_same_result(planted_concepts, tmp_path, monkeypatch):
    cfg = SupervisedConfig(**{**FINETUNE, "max_epochs": 4})
    init = planted_concepts / "unsupervised.safetensors"
    whole = finetune_supervised(init, planted_concepts, cfg, progress=False)

    training_rows = lambda b: ~validation_mask(b.sample, cfg.val_fraction, cfg.seed)  # noqa: E731
    steps_per_epoch = sum(1 for _ in ActivationDataset(planted_concepts).iter_records(
        cfg.batch_records, where=training_rows, drop_last=True))
    original_step, calls = SupervisedStep.__call__, []

    def crash_in_the_third_epoch(self, batch, optimizer):
        calls.append(1)
        if len(calls) > 2 * steps_per_epoch + 1:  # two whole (checkpointed) epochs and a step of the third
            raise KeyboardInterrupt
        return original_step(self, batch, optimizer)

    monkeypatch.setattr(SupervisedStep, "__call__", crash_in_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune_supervised(init, planted_concepts, cfg, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(SupervisedStep, "__call__", original_step)
    resumed = finetune_supervised(init, planted_concepts, cfg, checkpoint_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history == whole.history
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------- centralisation


def test_the_exclusivity_loss_counts_non_assigned_latents_beyond_the_margin_only():
    from saemnesia_tools.training.supervised import other_latent_label_correlation

    y = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    noise = torch.tensor([0.1, 0.2, -0.1, 0.0, 0.05, -0.2, 0.1, 0.3])
    v = torch.stack([y, 2 * y + 1, -y, noise], 1)                      # latent 0 assigned; 1 and 2: |r| = 1
    loss = other_latent_label_correlation(v, y[:, None], torch.tensor([0]), margin=0.3)
    r_noise = float(torch.corrcoef(torch.stack([noise, y]))[0, 1])
    expected = 2 * 0.7 ** 2 + max(0.0, abs(r_noise) - 0.3) ** 2
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(other_latent_label_correlation(v, y[:, None], torch.tensor([0, 1, 2]), margin=0.3)) == \
        pytest.approx(max(0.0, abs(r_noise) - 0.3) ** 2, abs=1e-6)


def test_column_aurocs_match_the_pairwise_auroc_with_ties():
    from saemnesia_tools.training.centralisation import column_aurocs

    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (30, 5), generator=g).float()  # many ties
    on = torch.rand(30, generator=g) > 0.6
    expected = [auroc(values[on, i], values[~on, i]) for i in range(5)]
    assert column_aurocs(values, on).tolist() == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def twin_latents(tmp_path_factory):
    """Planted concepts and an SAE in which two latents (32 and 33) both read and write obj0's direction; the other
    latents are the dataset's atoms and random directions."""
    from saemnesia_core.sae_file import SAEFile, save_sae_file

    root = tmp_path_factory.mktemp("twins")
    _, atoms, object_dirs, _ = planted_dataset(root, num_samples=160, concept_scale=1.5)
    g = torch.Generator().manual_seed(3)
    extra = torch.randn(6, 32, generator=g)
    rows = torch.cat([atoms, object_dirs[:1], object_dirs[:1], extra / extra.norm(dim=1, keepdim=True)])  # [40, 32]
    sae = TopKSAE(SAEConfig(32, 40, 4))
    with torch.no_grad():
        sae.encoder.weight.copy_(rows)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(rows)
        sae.b_dec.zero_()
    save_sae_file(SAEFile(config=sae.cfg, weights={k: v.detach().clone() for k, v in sae.state_dict().items()},
                          concepts=[], hookpoint="unet.synthetic", model_family="planted", num_buckets=2,
                          supervised=False, selection_mode="saeuron"), root / "twins.safetensors")
    return root


def test_the_exclusivity_loss_makes_the_assigned_latent_take_the_concept_from_its_twin(twin_latents):
    from saemnesia_tools.training.centralisation import centralisation

    def finetune(exclusivity):
        cfg = SupervisedConfig(**{**FINETUNE, "lr": 1e-2, "max_epochs": 15, "patience": 15, "l1": 0.0},
                               exclusivity=exclusivity)
        result = finetune_supervised(twin_latents / "twins.safetensors", twin_latents, cfg, progress=False)
        report = {r["label"]: r for r in centralisation(result.sae, result.concepts, twin_latents)}
        return result.concepts[0].latent, report["obj0"]

    plain_latent, plain = finetune(0.0)
    latent, exclusive = finetune(3.0)
    assert plain_latent in (32, 33) and latent in (32, 33)  # one of the twins is assigned to obj0
    assert plain["auroc"] > 0.95 and exclusive["auroc"] > 0.95   # both detect it ...
    assert plain["other_latents_above"] >= 1                     # ... but without L_X its twin detects it too
    assert exclusive["other_latents_above"] == 0
    assert exclusive["mean_difference_share"] > 0.5              # and the assigned latent carries most of it
