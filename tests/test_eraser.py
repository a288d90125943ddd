"""The erasure edit (DESIGN §6.1): paper mode against a dense re-implementation of the released hook, exact mode's
identity, batch/timestep handling, dtypes, and that no dense [tokens, n] decode happens."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saemnesia_tools.testing import ablated_codes, concept_tokens, dense_codes, make_random_sae_file, released_hook
from saemnesia_core.concepts import Concept, ConceptTables, UnknownConceptError
from saemnesia_core.activation_maps import concept_activation_maps
from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.sae import block_to_tokens, tokens_to_block
from saemnesia_core.timesteps import bucket_index

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- references
# The dense re-implementation of the released hook (paper mode) and of exact mode's meaning:
# saemnesia_tools.testing.released_hook, shared with the benchmarks.


def reference(sae_file, sae, x, t, strengths, exact=False):
    return released_hook(sae, sae_file.concepts, sae_file.tables, x, t, strengths, exact=exact)


def activations(sae_file, sae, batch=4, tokens=12, seed=0):
    """[B, N, d] tokens where every concept's latents fire on some tokens and plain noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, sae.cfg.d_in, generator=g)
    latents = sae_file.tables.latents[sae_file.tables.latents >= 0].unique()
    for j, latent in enumerate(latents.tolist()):
        b, n = j % batch, (2 * j) % tokens
        x[b, n : n + 2] = concept_tokens(sae, latent, (2,), seed=seed + j)
    return x


CALIBRATED = (Concept("Cats", "object", None, calibration=0.3), Concept("Dogs", "object", None),
              Concept("Van_Gogh", "style", None, calibration=1.5))
CASES = {
    "one concept (SAEmnesia)": (dict(supervised=True), {"Cats": -1.0}),
    "several concepts (SAEmnesia)": (dict(supervised=True), {"Cats": -5.0, "Van_Gogh": -1.0, "Dogs": 0.5}),
    "per-bucket sets (SAeUron)": (dict(supervised=False), {"Cats": -1.0, "Dogs": -30.0}),
    "input_unit_norm": (dict(supervised=False, input_unit_norm=True), {"Dogs": -1.0, "Van_Gogh": -5.0}),
    # calibrated concepts (DESIGN §6.7) next to an uncalibrated one, in both input spaces
    "calibrated": (dict(supervised=True, concepts=CALIBRATED), {"Cats": -1.0, "Dogs": -2.0, "Van_Gogh": -1.0}),
    "calibrated, input_unit_norm": (dict(supervised=True, concepts=CALIBRATED, input_unit_norm=True),
                                    {"Cats": -1.0, "Van_Gogh": -0.5}),
}
T_PER_ITEM = torch.tensor([0.05, 0.3, 0.6, 0.99])  # one item in each of the 4 buckets


@pytest.fixture
def made():
    """The default supervised file (Cats, Dogs, Van_Gogh), its SAE and activations where the concepts fire."""
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    return sae_file, sae, activations(sae_file, sae)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    kwargs, strengths = CASES[request.param]
    sae_file = make_random_sae_file(seed=7, **kwargs)
    sae = sae_file.build_sae()
    return sae_file, sae, activations(sae_file, sae), strengths


# ---------------------------------------------------------------------------------------------- the formula


def test_fixture_selections_differ_per_bucket_in_saeuron_mode():
    latents = make_random_sae_file(seed=7, supervised=False).tables.latents
    assert any(not torch.equal(latents[c, 0], latents[c, t]) for c in range(3) for t in range(1, 4))


def test_paper_mode_equals_the_released_hook_formula(case):
    sae_file, sae, x, strengths = case
    out = ConceptEraser.from_file(sae_file, strengths, mode="paper", sae=sae)(x, T_PER_ITEM)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(sae_file, sae, x, T_PER_ITEM, strengths), **TOL)


def test_exact_mode_adds_only_the_change_of_the_edited_latents(case):
    sae_file, sae, x, strengths = case
    out = ConceptEraser.from_file(sae_file, strengths, sae=sae)(x, T_PER_ITEM)
    with torch.no_grad():
        expected = reference(sae_file, sae, x, T_PER_ITEM, strengths, exact=True)
    torch.testing.assert_close(out, expected, **TOL)
    changed = (out != x).any(-1)
    assert 0 < changed.sum() < changed.numel()  # the case edits some tokens and leaves others


def test_paper_mode_without_concepts_is_twice_the_reconstruction_minus_x():
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    x = torch.randn(2, 5, 16)
    out = ConceptEraser.from_file(sae_file, {}, mode="paper", sae=sae)(x, 0.5)
    with torch.no_grad():
        recon = dense_codes(sae, x) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out, 2 * recon - x, **TOL)


def test_a_latent_chosen_by_two_concepts_takes_the_later_concepts_edit():
    sae_file = make_random_sae_file(seed=2)
    tables = sae_file.tables
    latents = tables.latents.clone()
    latents[2] = latents[0]  # Van_Gogh now selects Cats' latent, with its own statistics
    shared = dataclasses.replace(sae_file, tables=ConceptTables(latents, tables.mean_acts, tables.thresholds),
                                 selection_mode="saeuron")
    sae = sae_file.build_sae()
    x = activations(shared, sae)
    strengths = {"Cats": -1.0, "Van_Gogh": -20.0}
    out = ConceptEraser.from_file(shared, strengths, mode="paper", sae=sae)(x, T_PER_ITEM)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(shared, sae, x, T_PER_ITEM, strengths), **TOL)
        only_later = reference(shared, sae, x, T_PER_ITEM, {"Van_Gogh": -20.0})
    torch.testing.assert_close(out, only_later, **TOL)


# ---------------------------------------------------------------------------------------------- identity


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_mode_with_no_concept_chosen_returns_the_input_bit_for_bit(dtype):
    sae_file = make_random_sae_file()
    x = torch.randn(2, 16, 3, 5).to(dtype)
    x[0, 0, 0, 0] = -0.0
    out = ConceptEraser.from_file(sae_file, {})(x, 0.5)
    assert out.dtype == dtype and torch.equal(bits(out), bits(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_mode_returns_the_input_bit_for_bit_when_no_latent_passes_its_threshold(dtype):
    sae_file = make_random_sae_file()
    t = sae_file.tables
    unreachable = dataclasses.replace(sae_file, tables=ConceptTables(t.latents, t.mean_acts, t.thresholds + 1e6))
    sae = sae_file.build_sae()
    x = activations(sae_file, sae).to(dtype)
    x[0, 0, 0] = -0.0
    out = ConceptEraser.from_file(unreachable, {"Cats": -1.0, "Dogs": -5.0, "Van_Gogh": -1.0})(x, T_PER_ITEM)
    assert torch.equal(bits(out), bits(x))


def test_exact_mode_leaves_tokens_where_nothing_fires_bit_for_bit(made):
    sae_file, sae, x = made
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0}, sae=sae)
    out = eraser(x, T_PER_ITEM)
    with torch.no_grad():
        z = dense_codes(sae, x)
        fired = (ablated_codes(z, sae_file.concepts, sae_file.tables, bucket_index(T_PER_ITEM, 4), {"Cats": -1.0}) != z).any(-1)
    assert fired.any() and not fired.all()
    assert torch.equal(bits(out[~fired]), bits(x[~fired]))
    assert (out[fired] != x[fired]).any(-1).all()


def test_a_latent_exactly_at_its_threshold_is_not_edited(made):
    sae_file, sae, x = made
    latent = sae_file.concepts[0].latent
    with torch.no_grad():
        z = dense_codes(sae, x)[..., latent]
    b, n = divmod(int(z.argmax()), z.shape[1])
    t = sae_file.tables
    at_value = dataclasses.replace(sae_file, tables=ConceptTables(
        t.latents, t.mean_acts, torch.full_like(t.thresholds, float(z[b, n]))))
    out = ConceptEraser.from_file(at_value, {"Cats": -1.0}, sae=sae)(x, T_PER_ITEM)
    assert torch.equal(out, x)


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_items_outside_the_edit_mask_are_returned_bit_for_bit(mode, made):
    sae_file, sae, x = made
    mask = torch.tensor([True, False, True, False])
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -1.0}, mode=mode, sae=sae)
    out, full = eraser(x, T_PER_ITEM, edit_mask=mask), eraser(x, T_PER_ITEM)
    assert torch.equal(bits(out[~mask]), bits(x[~mask]))
    assert torch.equal(out[mask], full[mask])


def test_the_input_is_never_modified_in_place(made):
    sae_file, sae, x = made
    before = x.clone()
    ConceptEraser.from_file(sae_file, {"Cats": -1.0}, sae=sae)(x, T_PER_ITEM)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("h, w", [(3, 5), (1, 7), (4, 4)])
def test_block_input_of_any_spatial_shape_equals_the_token_path(h, w):
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    tokens = activations(sae_file, sae, batch=2, tokens=h * w)
    block = tokens_to_block(tokens, h, w)
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -1.0}, sae=sae)
    out = eraser(block, 0.4)
    assert out.shape == block.shape
    assert torch.equal(block_to_tokens(out), eraser(tokens, 0.4))


def test_each_item_uses_the_bucket_of_its_own_timestep():
    sae_file = make_random_sae_file(supervised=False, seed=7)
    sae = sae_file.build_sae()
    x = activations(sae_file, sae)
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -1.0}, sae=sae)
    together = eraser(x, T_PER_ITEM)
    for b, t in enumerate(T_PER_ITEM.tolist()):
        torch.testing.assert_close(together[b], eraser(x[b : b + 1], t)[0])


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-2), (torch.bfloat16, 2e-1)])
@pytest.mark.parametrize("mode", ["exact", "paper", "calibrated"])
def test_half_precision_activations_with_fp32_weights_match_fp32(dtype, tol, mode, made):
    sae_file, sae, x = made
    if mode == "calibrated":  # exact mode with the token-norm strength of DESIGN §6.7
        sae_file = dataclasses.replace(sae_file, concepts=[dataclasses.replace(c, calibration=0.5)
                                                           for c in sae_file.concepts])
        mode = "exact"
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -5.0}, mode=mode, sae=sae)
    out = eraser(x.to(dtype), T_PER_ITEM)
    assert out.dtype == dtype and sae.dtype == torch.float32
    # Near-ties at the k-th latent may pick a different latent in half precision: compare most tokens.
    close = torch.isclose(out.float(), eraser(x, T_PER_ITEM), rtol=tol, atol=tol).all(-1)
    assert close.float().mean() > 0.9


def test_half_precision_weights_on_half_precision_activations_match_fp32():
    sae_file, half_file = make_random_sae_file(), make_random_sae_file(dtype=torch.bfloat16)
    x = activations(sae_file, sae_file.build_sae())
    out = ConceptEraser.from_file(half_file, {"Cats": -1.0})(x.to(torch.bfloat16), T_PER_ITEM)
    assert out.dtype == torch.bfloat16
    expected = ConceptEraser.from_file(sae_file, {"Cats": -1.0})(x, T_PER_ITEM)
    # bf16 weights round the encoder too, so near-ties at the k-th latent may differ: compare most tokens
    close = torch.isclose(out.float(), expected, rtol=2e-1, atol=2e-1).all(-1)
    assert close.float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- choices


def test_unknown_labels_fail_listing_the_known_ones():
    with pytest.raises(UnknownConceptError, match=r"'Horses'.*'Cats', 'Dogs', 'Van_Gogh'") as err:
        ConceptEraser.from_file(make_random_sae_file(), {"Cats": -1.0, "Horses": -1.0})
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_unknown_mode_fails():
    with pytest.raises(ValueError, match="mode"):
        ConceptEraser.from_file(make_random_sae_file(), {}, mode="fast")


def test_a_strength_of_none_uses_the_concepts_default_strength():
    sae_file = make_random_sae_file()
    sae_file.concepts[0].default_strength = -7.0
    sae = sae_file.build_sae()
    x = activations(sae_file, sae)
    by_default = ConceptEraser.from_file(sae_file, {"Cats": None}, sae=sae)(x, T_PER_ITEM)
    assert torch.equal(by_default, ConceptEraser.from_file(sae_file, {"Cats": -7.0}, sae=sae)(x, T_PER_ITEM))


def test_a_calibrated_concepts_edit_does_not_grow_with_its_mean_activation_and_paper_mode_ignores_kappa():
    def erased(calibration, mu_factor, mode="exact"):
        sae_file = make_random_sae_file(concepts=(Concept("Cats", "object", None, calibration=calibration), "Dogs"))
        sae_file.tables.mean_acts[0] *= mu_factor
        sae = sae_file.build_sae()
        return ConceptEraser.from_file(sae_file, {"Cats": -1.0}, mode, sae=sae)(activations(sae_file, sae), T_PER_ITEM)

    assert not torch.equal(erased(None, 1.0), erased(None, 4.0))    # the papers' formula: z·γ·μ
    assert torch.equal(erased(0.3, 1.0), erased(0.3, 4.0))          # calibrated: γ·κ·‖x − b_dec‖, μ plays no part
    assert not torch.equal(erased(0.3, 1.0), erased(0.6, 1.0))
    assert torch.equal(erased(0.3, 4.0, "paper"), erased(None, 4.0, "paper"))


# ---------------------------------------------------------------------------------------------- hot path


class LargeOutputs(TorchDispatchMode):
    """Records every op that produces a tensor with at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_the_only_dense_latent_tensor_is_the_encoders_pre_activations(mode):
    sae_file = make_random_sae_file(n=512, k=8)
    sae = sae_file.build_sae()
    x = torch.randn(2, 30, 16)
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -1.0}, mode=mode, sae=sae)
    recorder = LargeOutputs(numel=x.shape[0] * x.shape[1] * 512)
    with recorder:
        eraser(x, 0.5)
    assert set(recorder.ops) <= {"addmm", "mm", "relu_", "view", "_unsafe_view", "t", "expand", "clone"}
    assert recorder.ops.count("relu_") == 1 and sum(op in ("addmm", "mm") for op in recorder.ops) == 1


@pytest.mark.parametrize("mode", ["exact", "replace"])
def test_threshold_detection_makes_no_latent_wide_tensor_at_all(mode):
    sae_file = make_random_sae_file(n=512, k=8)
    sae = sae_file.build_sae()
    x = torch.randn(2, 30, 16) * 3
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -1.0}, mode=mode, sae=sae, detection="threshold")
    recorder = LargeOutputs(numel=x.shape[0] * x.shape[1] * 512)
    with recorder:
        out = eraser(x, 0.5)
    assert (out != x).any() and recorder.ops == []


class Casts(TorchDispatchMode):
    """Counts dtype/device copies (aten._to_copy) of matrices of `dtype` with at least `numel` elements: the SAE's
    weight matrices or rows of them (activations are [b, N, d], tables are not floating point)."""

    def __init__(self, dtype, numel=1):
        super().__init__()
        self.dtype, self.numel, self.count = dtype, numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source, out = args[0], func(*args, **(kwargs or {}))
        if (func.overloadpacket.__name__ in ("_to_copy", "to")  # `to` itself under inference mode
                and out is not source and source.dim() == 2 and source.dtype == self.dtype
                and source.numel() >= self.numel):
            self.count += 1
        return out


def casts_of_two_calls(eraser, x) -> tuple[int, int, torch.Tensor]:
    """(fp32 weight casts in a first call, in a second call, the first call's output); the second must agree."""
    casts = Casts(torch.float32)
    with casts:
        first = eraser(x, 0.5)
    before = casts.count
    with casts:
        again = eraser(x, 0.5)
    assert torch.equal(again, first)
    return before, casts.count - before, first


@pytest.mark.parametrize("mode, detection", [("exact", "topk"), ("paper", "topk"), ("replace", "topk"),
                                             ("exact", "threshold")])
def test_an_fp32_sae_on_bf16_activations_casts_its_weights_once_and_again_only_when_they_change(mode, detection):
    sae_file = make_random_sae_file(n=512, k=8)
    sae = sae_file.build_sae()
    x = activations(sae_file, sae).to(torch.bfloat16)
    eraser = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -5.0}, mode=mode, sae=sae, detection=detection)
    first_call, second_call, first = casts_of_two_calls(eraser, x)
    assert first_call >= 1 and second_call == 0
    casts = Casts(torch.float32)
    with torch.no_grad():  # the weights rewritten in place (as a load into the same tensors would)
        sae.encoder.weight.mul_(-1)
        sae.W_dec.mul_(2)
    with casts:
        changed = eraser(x, 0.5)
    fresh = ConceptEraser.from_file(sae_file, {"Cats": -1.0, "Dogs": -5.0}, mode=mode, sae=sae, detection=detection)
    assert casts.count >= 1 and torch.equal(changed, fresh(x, 0.5)) and not torch.equal(changed, first)
    sae.to(torch.float64)  # moved, as ComfyUI's memory manager moves a model: new tensors
    assert torch.equal(eraser(x, 0.5), fresh(x, 0.5))


def test_weights_made_under_inference_mode_are_cast_once_too():
    """ComfyUI loads the SAE and samples under torch.inference_mode: its tensors track no version counter."""
    with torch.inference_mode():
        sae_file = make_random_sae_file(n=512, k=8)
        sae = sae_file.build_sae(dtype=torch.float32)
        x = activations(sae_file, sae).to(torch.bfloat16)
        first_call, second_call, first = casts_of_two_calls(ConceptEraser.from_file(sae_file, {"Cats": -1.0}, sae=sae), x)
    assert first_call >= 1 and second_call == 0 and not torch.equal(first, x)


def test_an_sae_already_in_the_activations_dtype_is_used_as_it_is():
    sae_file = make_random_sae_file(n=512, k=8)
    sae = sae_file.build_sae(dtype=torch.bfloat16)
    x = activations(sae_file, sae).to(torch.bfloat16)
    casts = Casts(torch.bfloat16, numel=512 * 16)  # a copy of the whole encoder or decoder
    with casts:
        for mode in ("exact", "paper", "replace"):
            ConceptEraser.from_file(sae_file, {"Cats": -1.0}, mode=mode, sae=sae)(x, 0.5)
    assert casts.count == 0


# ---------------------------------------------------------------------------------------------- activation maps


def test_activation_maps_show_each_concepts_latent_per_token_and_edit_nothing():
    sae_file = make_random_sae_file()
    sae = sae_file.build_sae()
    tokens = activations(sae_file, sae, batch=2, tokens=15)
    block = tokens_to_block(tokens, 3, 5)
    before = block.clone()
    maps = concept_activation_maps(sae, sae_file.concepts, sae_file.tables, block, 0.5, ["Dogs", "Cats"])
    assert maps.shape == (2, 2, 3, 5) and maps.dtype == torch.float32 and torch.equal(block, before)
    with torch.no_grad():
        z = dense_codes(sae, tokens)
    for j, label in enumerate(["Dogs", "Cats"]):
        latent = next(c.latent for c in sae_file.concepts if c.label == label)
        torch.testing.assert_close(maps[:, j], tokens_to_block(z[..., latent : latent + 1], 3, 5)[:, 0])
    assert (maps > 0).any()


def test_activation_maps_sum_the_selected_latents_of_the_bucket():
    sae_file = make_random_sae_file(supervised=False, seed=7)
    sae = sae_file.build_sae()
    x = activations(sae_file, sae)
    maps = concept_activation_maps(sae, sae_file.concepts, sae_file.tables, x, T_PER_ITEM, ["Dogs"])
    with torch.no_grad():
        z = dense_codes(sae, x)
    for b, t in enumerate(bucket_index(T_PER_ITEM, 4).tolist()):
        row = sae_file.tables.latents[1, t]
        torch.testing.assert_close(maps[b, 0], z[b][:, row[row >= 0]].sum(-1))
