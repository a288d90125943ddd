"""Replace mode and threshold detection (DESIGN §6.4) and regional erasure (DESIGN §6.5) of the eraser, against
small dense references written here: which tokens are detected, where each takes its replacement from, what the
threshold detection decides differently from top-k, and how a region limits an edit."""

import dataclasses
import itertools

import pytest
import torch

from saemnesia_core.concepts import ConceptTables
from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.regions import nearest_undetected
from saemnesia_core.sae import block_to_tokens, tokens_to_block
from saemnesia_tools.testing import concept_tokens, dense_codes, make_random_sae_file
from saemnesia_core.timesteps import bucket_index

T_PER_ITEM = torch.tensor([0.05, 0.3, 0.6, 0.99])  # one item in each of the 4 buckets
H, W = 3, 4


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture
def made():
    """A supervised file (Cats, Dogs, Van_Gogh), its SAE, and block activations [4, d, 3, 4] in which each concept's
    latent fires on a few tokens of some items and nowhere else."""
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(4, H * W, sae.cfg.d_in, generator=g)
    for j, concept in enumerate(sae_file.concepts):
        for b in range(4):
            if (b + j) % 3:
                tokens[b, [j, j + 4, j + 5]] = concept_tokens(sae, concept.latent, (3,), seed=10 * b + j)
    return sae_file, sae, tokens_to_block(tokens, H, W)


def detected_reference(sae_file, sae, x, t, labels, topk=True):
    """bool [B, N]: a token is detected when a chosen concept's selected latent of the item's bucket exceeds θ
    (its top-k code; topk=False: its pre-activation, whether or not it is among the top k)."""
    tokens = block_to_tokens(x)
    z = dense_codes(sae, tokens) if topk else torch.relu((tokens - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    buckets = bucket_index(torch.as_tensor(t), sae_file.num_buckets).expand(x.shape[0])
    tab = sae_file.tables
    out = torch.zeros(z.shape[:2], dtype=torch.bool)
    for b, bucket in enumerate(buckets.tolist()):
        for c, concept in enumerate(sae_file.concepts):
            if concept.label in labels:
                for latent, theta in zip(tab.latents[c, bucket].tolist(), tab.thresholds[c, bucket].tolist()):
                    if latent >= 0:
                        out[b] |= z[b, :, latent] > theta
    return out


def nearest_reference(detected_row, h, w):
    """For each detected token, the undetected token closest on the grid (lowest index on ties); loops only."""
    free = [j for j in range(h * w) if not detected_row[j]]
    source = [-1] * (h * w)
    for i in range(h * w):
        if detected_row[i] and free:
            source[i] = min(free, key=lambda j: ((i // w - j // w) ** 2 + (i % w - j % w) ** 2, j))
    return torch.tensor(source)


# ---------------------------------------------------------------------------------------------- replace mode


def test_replace_mode_copies_each_detected_token_from_its_nearest_undetected_one(made):
    sae_file, sae, x = made
    labels = {"Cats", "Dogs"}
    out = ConceptEraser.from_file(sae_file, {label: -1.0 for label in labels}, mode="replace", sae=sae)(x, T_PER_ITEM)
    detected = detected_reference(sae_file, sae, x, T_PER_ITEM, labels)
    assert detected.any() and not detected.all(1).any()
    tokens, out_tokens = block_to_tokens(x), block_to_tokens(out)
    for b in range(4):
        source = nearest_reference(detected[b].tolist(), H, W)
        expected = torch.where(detected[b, :, None], tokens[b, source.clamp(min=0)], tokens[b])
        assert torch.equal(out_tokens[b], expected)


def test_replace_mode_is_the_identity_bit_for_bit_where_nothing_is_detected():
    sae_file = make_random_sae_file()
    t = sae_file.tables
    unreachable = dataclasses.replace(sae_file, tables=ConceptTables(t.latents, t.mean_acts, t.thresholds + 1e6))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 16, 3, 5).to(dtype)
        x[0, 0, 0, 0] = -0.0
        for source, strengths in ((unreachable, {"Cats": -1.0, "Dogs": -1.0}), (sae_file, {})):
            out = ConceptEraser.from_file(source, strengths, mode="replace")(x, 0.5)
            assert out.dtype == dtype and torch.equal(bits(out), bits(x))


def test_replace_mode_strength_sets_how_far_a_detected_token_moves(made):
    sae_file, sae, x = made
    full, half, off = (ConceptEraser.from_file(sae_file, {"Cats": g}, mode="replace", sae=sae)(x, T_PER_ITEM)
                       for g in (-3.0, -0.5, 0.0))
    changed = (full != x).any(1)
    assert changed.any()
    assert torch.allclose(half, x + 0.5 * (full - x), atol=1e-6)
    assert torch.equal(off, x)
    steer = ConceptEraser.from_file(sae_file, {"Cats": 3.0}, mode="replace", sae=sae)(x, T_PER_ITEM)
    assert torch.equal(steer, full)  # the magnitude counts, capped at 1; the sign does not


def test_replace_mode_leaves_a_feature_map_that_is_detected_everywhere_unchanged(made):
    sae_file, sae, _ = made
    latent = sae_file.concepts[0].latent
    x = tokens_to_block(concept_tokens(sae, latent, (1, H * W), strength=40.0, seed=1), H, W)
    assert detected_reference(sae_file, sae, x, 0.5, {"Cats"}).all()
    out = ConceptEraser.from_file(sae_file, {"Cats": -1.0}, mode="replace", sae=sae)(x, 0.5)
    assert torch.equal(out, x)


def test_nearest_undetected_breaks_ties_by_the_lowest_index_and_marks_what_it_cannot_place():
    for h, w in ((1, 5), (3, 4), (4, 4)):
        for pattern in itertools.islice(itertools.product((False, True), repeat=h * w), 0, 2 ** (h * w), 7):
            detected = torch.tensor(pattern)
            assert torch.equal(nearest_undetected(detected[None], (h, w))[0], nearest_reference(pattern, h, w))
    with pytest.raises(ValueError, match="grid"):
        nearest_undetected(torch.zeros(1, 5, dtype=torch.bool), (2, 3))


# ---------------------------------------------------------------------------------------------- threshold detection


def test_threshold_detection_decides_as_top_k_when_every_latent_is_in_the_top_k():
    sae_file = make_random_sae_file(n=32, k=32)
    sae = sae_file.build_sae()
    x = tokens_to_block(torch.randn(4, H * W, sae.cfg.d_in, generator=torch.Generator().manual_seed(5)) * 3, H, W)
    for mode in ("exact", "replace"):
        topk, fast = (ConceptEraser.from_file(sae_file, {"Cats": -2.0, "Dogs": -1.0}, mode=mode, sae=sae,
                                              detection=d)(x, T_PER_ITEM) for d in ("topk", "threshold"))
        assert (topk != x).any()
        torch.testing.assert_close(fast, topk, rtol=1e-5, atol=1e-5)


def test_threshold_detection_differs_from_top_k_exactly_where_a_latent_passes_but_is_not_in_the_top_k(made):
    sae_file, sae, _ = made
    x = tokens_to_block(torch.randn(4, H * W, sae.cfg.d_in, generator=torch.Generator().manual_seed(6)) * 3, H, W)
    labels = {"Cats", "Dogs", "Van_Gogh"}
    topk, fast = detected_reference(sae_file, sae, x, T_PER_ITEM, labels), \
        detected_reference(sae_file, sae, x, T_PER_ITEM, labels, topk=False)
    assert (fast & ~topk).any() and not (topk & ~fast).any()  # the threshold detects a superset
    for detection, expected in (("topk", topk), ("threshold", fast)):
        out = ConceptEraser.from_file(sae_file, {label: -1.0 for label in labels}, mode="replace", sae=sae,
                                      detection=detection)(x, T_PER_ITEM)
        changed = (block_to_tokens(out) != block_to_tokens(x)).any(-1)
        assert torch.equal(changed, expected)


def test_threshold_detection_is_refused_in_paper_mode(made):
    sae_file, sae, _ = made
    with pytest.raises(ValueError, match="paper mode decodes the whole code"):
        ConceptEraser.from_file(sae_file, {"Cats": -1.0}, mode="paper", sae=sae, detection="threshold")


# ---------------------------------------------------------------------------------------------- regions


@pytest.mark.parametrize("mode", ["exact", "paper", "replace"])
def test_a_region_limits_the_edit_to_its_tokens_in_every_mode(mode, made):
    sae_file, sae, x = made
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -5.0, "Dogs": -1.0}, mode=mode, sae=sae)
    full = eraser(x, T_PER_ITEM)
    region = torch.zeros(4, H, W)
    region[:, :, : W // 2] = 1.0   # the left half
    region[:, 0, W // 2] = 0.25    # one token gets a quarter of the edit
    out = eraser(x, T_PER_ITEM, region=region)
    inside, outside = region[:, None].expand_as(x) == 1, region[:, None].expand_as(x) == 0
    assert (full[inside] != x[inside]).any() and (full[outside] != x[outside]).any()
    assert torch.equal(out[inside], full[inside])
    assert torch.equal(bits(out[outside]), bits(x[outside]))
    quarter = (slice(None), slice(None), 0, W // 2)
    assert torch.allclose(out[quarter], x[quarter] + 0.25 * (full[quarter] - x[quarter]), atol=1e-6)
    assert torch.equal(eraser(x, T_PER_ITEM, region=torch.ones(4, H * W)), full)
    assert torch.equal(eraser(x, T_PER_ITEM, region=torch.zeros(4, H, W)), x)


@pytest.mark.parametrize("region, message", [(torch.ones(4, 2, 2), "one weight per token"),
                                             (torch.ones(3, H, W), "one weight per token"),
                                             (torch.full((4, H, W), 1.5), r"\[0, 1\]"),
                                             (torch.full((4, H, W), float("nan")), r"\[0, 1\]")])
def test_a_region_of_the_wrong_shape_or_range_fails_clearly(region, message, made):
    sae_file, sae, x = made
    with pytest.raises(ValueError, match=message):
        ConceptEraser.from_file(sae_file, {"Cats": -1.0}, sae=sae)(x, T_PER_ITEM, region=region)
