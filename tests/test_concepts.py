"""Concept statistics (DESIGN §5): SAeUron score, percentile selection, μ_c / θ tables, timestep buckets."""

import pytest
import torch

from helpers_core import released_saeuron_score
from saemnesia_core.concepts import (Concept, assigned_selection, build_tables, saeuron_scores, select_saeuron,
                                     with_calibrations)
from saemnesia_core.timesteps import bucket_index, ddim_timesteps, timestep_to_t


def test_scores_match_the_released_formula_with_pooled_other_prompts():
    g = torch.Generator().manual_seed(0)
    per_concept = {name: torch.rand(p, 3, 32, generator=g) for name, p in (("a", 2), ("b", 5), ("c", 1))}
    sums = torch.stack([v.sum(0) for v in per_concept.values()])
    counts = torch.tensor([v.shape[0] for v in per_concept.values()])
    scores = saeuron_scores(sums, counts)
    for c, name in enumerate(per_concept):
        for t in range(3):
            torch.testing.assert_close(scores[c, t], released_saeuron_score(per_concept, name, t))


def test_scores_with_a_single_concept_rank_latents_by_its_mean():
    mean = torch.rand(1, 2, 16)
    scores = saeuron_scores(4 * mean, torch.tensor([4]))
    assert torch.equal(scores.argsort(-1), mean.argsort(-1))


@pytest.mark.parametrize("percentile, expected", [(99.999, 1), (99.995, 2), (99.99, 3)])
def test_percentile_selection_counts_of_the_papers_at_20480_latents(percentile, expected):
    scores = torch.randn(1, 1, 20480, generator=torch.Generator().manual_seed(1))
    selection = select_saeuron(scores, percentile)
    assert selection.shape == (1, 1, expected)
    assert set(selection.flatten().tolist()) == set(scores[0, 0].topk(expected).indices.tolist())


def test_selection_is_strictly_above_the_linear_quantile():
    scores = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0]]])  # quantile(0.75) = 3.0 exactly
    assert select_saeuron(scores, 75).tolist() == [[[4]]]


def test_selection_differs_per_bucket_and_pads_with_minus_one():
    scores = torch.tensor([[[5.0, 0, 0, 0, 4.0], [0, 6.0, 0, 0, 0]]])
    selection = select_saeuron(scores, 70)  # quantile(0.7) = 3.2, then 0: two latents, then one
    assert selection.tolist() == [[[0, 4], [1, -1]]]


def test_selection_takes_one_percentile_per_concept():
    scores = torch.arange(20.0).expand(2, 1, 20)
    selection = select_saeuron(scores, [96, 86])
    assert selection.tolist() == [[[19, -1, -1]], [[17, 18, 19]]]


def test_assigned_selection_repeats_each_latent_in_every_bucket():
    assert assigned_selection([7, 3], 2).tolist() == [[[7], [7]], [[3], [3]]]


def test_tables_hold_the_concept_mean_and_the_unweighted_mean_over_concepts():
    means = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 4.0, 9.0]]])  # [C=2, T=1, n=3]
    tables = build_tables(torch.tensor([[[2, -1]], [[0, 1]]]), means)
    assert tables.latents.tolist() == [[[2, -1]], [[0, 1]]]
    assert tables.mean_acts.tolist() == [[[3.0, 0.0]], [[3.0, 4.0]]]
    assert tables.thresholds.tolist() == [[[6.0, 0.0]], [[2.0, 3.0]]]
    assert tables.mean_acts.dtype == tables.thresholds.dtype == torch.float32


def test_bucket_index_maps_the_unit_interval_to_equal_buckets():
    t = torch.tensor([0.0, 0.099, 0.1, 0.3, 0.999, 1.0])
    assert bucket_index(t, 10).tolist() == [0, 0, 1, 3, 9, 9]


def test_bucket_index_clamps_and_accepts_floats():
    assert bucket_index(1.5, 4).item() == 3 and bucket_index(-0.2, 4).item() == 0
    assert bucket_index(torch.tensor(0.5, dtype=torch.float16), 4).dtype == torch.int64


def test_bucket_index_rejects_nan():
    with pytest.raises(ValueError):
        bucket_index(float("nan"), 4)


def test_ddim_leading_timesteps_of_sd():
    assert ddim_timesteps(100).tolist() == list(range(991, 0, -10))
    assert ddim_timesteps(50).tolist()[:2] == [981, 961] and ddim_timesteps(50).tolist()[-1] == 1


@pytest.mark.parametrize("steps", [100, 50, 25, 10])
def test_paper_steps_map_one_to_one_onto_as_many_buckets_noisiest_last(steps):
    buckets = bucket_index(timestep_to_t(ddim_timesteps(steps)), steps)
    assert buckets.tolist() == list(range(steps - 1, -1, -1))


def test_setting_a_new_kappa_drops_the_erasure_record_measured_with_the_old_one():
    record = {"strength": -1.0, "images": 8, "seen_without": 8, "gone": 6, "other_kept": 8}
    concepts = [Concept("Cats", "object", 0, erasure=record, calibration=2.0),
                Concept("Dogs", "object", 1, erasure=record, calibration=4.0),
                Concept("Van_Gogh", "style", 2, erasure=record)]
    changed = with_calibrations(concepts, {"Cats": 8.0, "Dogs": 4.0})
    assert [(c.calibration, c.erasure) for c in changed] == [(8.0, None), (4.0, record), (None, record)]
    assert with_calibrations(concepts, {"Van_Gogh": None})[2].erasure == record  # unchanged κ: the record stands
    assert with_calibrations(concepts, {"Dogs": None})[1].erasure is None
