"""Shift mode (DESIGN §6.9): every token of an item in which a chosen concept is detected moves by γ·Δ(t), the
concept's mean difference from its absence at the item's bucket; items where no chosen latent fires are returned bit
for bit."""

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.sae import scatter_dense
from saemnesia_core.sae_file import load_sae_file, read_header, save_sae_file
from saemnesia_core.sae_format import DIRECTIONS
from saemnesia_core.safetensors_index import SAEFileError
from saemnesia_core.timesteps import bucket_index
from saemnesia_tools.testing import concept_tokens, make_random_sae_file

T = torch.tensor([0.05, 0.3, 0.6, 0.99])  # one item in each of the 4 buckets


@pytest.fixture
def world():
    """The default supervised file (Cats, Dogs, Van_Gogh), its SAE, per-concept directions, and 4 items: Cats in item
    0 (bucket 0) and 2 (bucket 2), Cats and Dogs in item 1 (bucket 1), none in item 3 (plain noise)."""
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(len(sae_file.concepts), sae_file.tables.num_buckets, sae.cfg.d_in, generator=g)
    x = torch.randn(4, 12, sae.cfg.d_in, generator=g) * 0.01
    cats, dogs = (sae_file.concepts[i].latent for i in (0, 1))
    x[0, 3:5] = concept_tokens(sae, cats, (2,), seed=1)
    x[1, 0:2] = concept_tokens(sae, cats, (2,), seed=2)
    x[1, 7:9] = concept_tokens(sae, dogs, (2,), seed=3)
    x[2, 10:12] = concept_tokens(sae, cats, (2,), seed=4)
    return sae_file, sae, directions, x


def fires(sae_file, sae, x, t, label) -> torch.Tensor:
    """bool [B]: the concept's selected latent is among a token's top k and above its threshold, somewhere in the
    item (exact mode's detection, written out)."""
    i = [c.label for c in sae_file.concepts].index(label)
    z = scatter_dense(*sae.encode(x), sae.cfg.num_latents)
    buckets = bucket_index(t, sae_file.tables.num_buckets)
    latent = sae_file.tables.latents[i, buckets, 0]
    threshold = sae_file.tables.thresholds[i, buckets, 0]
    return (z[torch.arange(len(x)), :, latent] > threshold[:, None]).any(1)


def test_each_item_moves_by_the_detected_concepts_directions_at_its_bucket_and_the_rest_stays_bit_for_bit(world):
    sae_file, sae, directions, x = world
    strengths = {"Cats": -1.0, "Dogs": -2.0}
    out = ConceptEraser(sae, sae_file.concepts, sae_file.tables, strengths, mode="shift", directions=directions)(x, T)
    buckets = bucket_index(T, sae_file.tables.num_buckets)
    cats, dogs = fires(sae_file, sae, x, T, "Cats"), fires(sae_file, sae, x, T, "Dogs")
    assert cats.tolist() == [True, True, True, False] and dogs.tolist() == [False, True, False, False]
    for b in range(4):
        move = cats[b] * -1.0 * directions[0, buckets[b]] + dogs[b] * -2.0 * directions[1, buckets[b]]
        if cats[b] or dogs[b]:
            torch.testing.assert_close(out[b], x[b] + move, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(out[b], x[b])


def test_a_concept_not_chosen_moves_nothing_and_the_strength_scales_the_move(world):
    sae_file, sae, directions, x = world
    eraser = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Dogs": -0.5}, mode="shift", directions=directions)
    out = eraser(x, T)
    assert torch.equal(out[[0, 2, 3]], x[[0, 2, 3]])  # Cats' items: Cats is not chosen
    torch.testing.assert_close(out[1], x[1] - 0.5 * directions[1, bucket_index(T, 4)[1]])


def test_an_update_reading_sae_moves_the_output_by_the_same_amount(world):
    """The directions are in what the SAE reads; for the block's update u = out − in, out + γΔ = in + (u + γΔ)."""
    sae_file, sae, directions, x = world
    base = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    output = base + x  # the update is x
    update = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift",
                           directions=directions, reads="update")
    plain = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift", directions=directions)
    torch.testing.assert_close(update(output, T, base=base) - output, plain(x, T) - x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_items_move_as_in_fp32_and_untouched_items_stay_bit_for_bit(world, dtype):
    sae_file, sae, directions, x = world
    eraser = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift", directions=directions)
    out = eraser(x.to(dtype), T)
    assert out.dtype == dtype and torch.equal(out[3], x[3].to(dtype))
    torch.testing.assert_close(out.float(), eraser(x, T), rtol=2e-2, atol=2e-2)


def test_items_outside_the_edit_mask_or_step_range_are_returned_bit_for_bit(world):
    sae_file, sae, directions, x = world
    eraser = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift", directions=directions)
    out = eraser(x, T.tolist(), edit_mask=[False, True, False, True])
    assert torch.equal(out[[0, 2, 3]], x[[0, 2, 3]]) and not torch.equal(out[1], x[1])


def test_shift_mode_without_a_direction_per_concept_and_bucket_fails_clearly(world):
    sae_file, sae, good, x = world
    with pytest.raises(ValueError, match=r"directions of shape \[3, 4, 16\]; got \[3, 2, 16\]"):
        ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift", directions=good[:, :2])
    with pytest.raises(ValueError, match="this SAE holds none: use exact, paper or replace mode"):
        ConceptEraser.from_file(sae_file, {"Cats": -1.0}, mode="shift", sae=sae)
    nothing_chosen = ConceptEraser.from_file(sae_file, {}, mode="shift", sae=sae)  # needs no direction
    assert nothing_chosen(x, 0.5) is x


# ---------------------------------------------------------------------------------------------- in the file


def with_directions(sae_file, directions):
    return dataclasses.replace(sae_file, tables=dataclasses.replace(sae_file.tables, directions=directions))


def test_directions_travel_in_the_file_as_version_3_and_reach_the_eraser(world, tmp_path):
    sae_file, sae, directions, x = world
    save_sae_file(with_directions(sae_file, directions), tmp_path / "shift.safetensors")
    header = read_header(tmp_path / "shift.safetensors")
    assert header.format_version == 3 and header.has_directions
    loaded = load_sae_file(tmp_path / "shift.safetensors")
    assert torch.equal(loaded.tables.directions, directions)
    from_file = ConceptEraser.from_file(loaded, {"Cats": -1.0}, mode="shift", sae=sae)(x, T)
    direct = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"Cats": -1.0}, mode="shift",
                           directions=directions)(x, T)
    assert torch.equal(from_file, direct)
    save_sae_file(sae_file, tmp_path / "plain.safetensors")  # without directions: the version it was before
    assert read_header(tmp_path / "plain.safetensors").format_version == 1


@pytest.mark.parametrize("bad, message", [("shape", r"concepts.directions has shape \[3, 4, 8\], expected \[3, 4, 16\]"),
                                          ("nan", "directions contains NaN or Inf")])
def test_a_file_with_bad_directions_is_refused_with_a_clear_error(world, tmp_path, bad, message):
    sae_file, _, directions, _ = world
    path = tmp_path / "bad.safetensors"
    save_sae_file(with_directions(sae_file, directions), path)
    tensors = load_file(str(path))
    if bad == "shape":
        tensors[DIRECTIONS] = tensors[DIRECTIONS][..., :8].contiguous()
    else:
        tensors[DIRECTIONS][0, 0, 0] = float("nan")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(SAEFileError, match=message):
        load_sae_file(path)


def test_adding_concepts_drops_the_directions_so_shift_mode_says_so_instead_of_moving_nothing(world):
    from saemnesia_core.concepts import with_latent_refs

    sae_file, sae, directions, _ = world
    f = with_directions(sae_file, directions)
    concepts, tables = with_latent_refs(f.concepts, f.tables, ["#5"], sae.cfg.num_latents, None)
    assert len(concepts) == 4 and tables.directions is None


def test_a_taught_concept_brings_its_direction_and_the_others_keep_theirs_only_when_every_one_has_one(world):
    from saemnesia_core.concept_finder import FoundConcept, with_concept
    from saemnesia_core.concepts import ConceptTables

    sae_file, sae, directions, _ = world
    t, n = sae_file.tables, sae_file.tables.num_buckets
    own = torch.randn(1, n, sae.cfg.d_in)
    found = FoundConcept("Owls", ConceptTables(t.latents[:1], t.mean_acts[:1], t.thresholds[:1], own), [None] * n)
    shifted = with_directions(sae_file, directions)
    _, added = with_concept(shifted.concepts, shifted.tables, n, found, "taught")
    assert torch.equal(added.directions, torch.cat([directions, own]))
    kept = directions.clone()
    _, replaced = with_concept(shifted.concepts, shifted.tables, n, dataclasses.replace(found, label="Dogs"), "taught")
    assert torch.equal(replaced.directions, torch.cat([directions[:1], own, directions[2:]]))
    assert torch.equal(directions, kept)  # the file it was given is unchanged
    assert with_concept(sae_file.concepts, sae_file.tables, n, found, "taught")[1].directions is None
    assert torch.equal(with_concept([], None, n, found, "taught")[1].directions, own)


# ---------------------------------------------------------------------------------------------- from activations


def write_records(root, vocab, samples):
    """A dataset of `samples`: (labels per group of vocab, {(t, branch): token value}) with 4 tokens of d = 3, every
    token of a record equal to its value (so a record's mean token is it)."""
    from saemnesia_tools.training.shards import ShardWriter

    with ShardWriter(root, d=3, height=2, width=2, label_vocab=vocab, hookpoint="unet.synthetic", model_id="test",
                     dtype="float32") as writer:
        for sample, (labels, records) in enumerate(samples):
            keys = list(records)
            acts = torch.stack([torch.tensor(records[k], dtype=torch.float32).expand(4, 3) for k in keys])
            t = torch.tensor([k[0] for k in keys])
            writer.write_sample(sample, acts, t=t, timestep=t * 999, step=torch.arange(len(keys)),
                                branch=torch.tensor([k[1] for k in keys]), labels=labels)
    return root


def test_directions_are_each_concepts_mean_token_minus_its_groups_absence_per_bucket_on_the_cond_branch(tmp_path):
    from saemnesia_core.concepts import Concept
    from saemnesia_tools.training.directions import concept_directions

    vocab = {"object": ["Cats", "Dogs"], "style": ["Neon"]}
    early, late = 0.1, 0.9  # buckets 0 and 1 of 2
    grid = write_records(tmp_path / "grid", vocab, [
        ([0, 0], {(early, 0): [1, 0, 0], (late, 0): [2, 0, 0], (early, 1): [50, 50, 50]}),   # Cats, Neon (+ uncond)
        ([0, -1], {(early, 0): [3, 0, 0], (late, 0): [4, 0, 0]}),                              # Cats, unstyled
        ([1, -1], {(early, 0): [0, 5, 0], (late, 0): [0, 6, 0]}),                              # Dogs, unstyled
    ])
    empty = write_records(tmp_path / "empty", {"style": ["Neon"]}, [
        ([0], {(early, 0): [0, 0, 1], (late, 0): [0, 0, 2]}),                                  # no object, Neon
        ([-1], {(early, 0): [0, 0, 3], (late, 0): [0, 0, 4]}),                                 # "An image."
    ])
    concepts = [Concept("Cats", "object", None), Concept("Neon", "style", None), Concept("Dogs", "object", None)]
    got = concept_directions([grid, empty], concepts, 2, progress=False)
    no_object = torch.tensor([[0, 0, 2.0], [0, 0, 3.0]])                       # per bucket
    unstyled = torch.tensor([[(3 + 0 + 0) / 3, 5 / 3, 3 / 3], [4 / 3, 6 / 3, 4 / 3]])  # Cats, Dogs, "An image."
    neon = torch.tensor([[1 / 2, 0, 1 / 2], [2 / 2, 0, 2 / 2]])                 # Cats in Neon, the empty Neon scene
    torch.testing.assert_close(got[0], torch.tensor([[2.0, 0, 0], [3.0, 0, 0]]) - no_object)
    torch.testing.assert_close(got[1], neon - unstyled)
    torch.testing.assert_close(got[2], torch.tensor([[0, 5.0, 0], [0, 6.0, 0]]) - no_object)
    with pytest.raises(ValueError, match="no cond-branch records of no object"):
        concept_directions([grid], concepts[:1], 2, progress=False)
    four = concept_directions([grid, empty], concepts, 4, progress=False)  # t 0.1 and 0.9: buckets 0 and 3
    torch.testing.assert_close(four, got[:, [0, 0, 1, 1]])  # buckets 1 and 2 take the nearest with records
