"""Import paths (DESIGN §7.1): sparsify/SAeUron folders, SAEmnesia root checkpoints, state_dict.pth,
concept-statistics pickles and class_params.pth — each from synthetic files in that layout — and hostile pickles."""

import pickle

import pytest
import torch

from helpers_core import (
    released_saeuron_score,
    synthetic_statistics,
    write_openai_folder,
    write_pickle,
    write_sparsify_folder,
)
from saemnesia_tools.testing import make_random_sae_file, random_sae
from saemnesia_core.concept_statistics import import_concept_statistics
from saemnesia_core.importers import load_any
from saemnesia_core.pickles import load_pickle
from saemnesia_core.sae_file import SAEFileError, load_sae_file, save_sae_file

HOOK = "unet.up_blocks.1.attentions.1"


def assert_weights_of(sae_file, sae):
    assert sae_file.config == sae.cfg
    for name, value in sae.state_dict().items():
        assert torch.equal(sae_file.weights[name].float(), value.float()), name


@pytest.fixture
def sae():
    return random_sae(seed=3)


def test_sparsify_hookpoint_folder_imports_weights_config_and_hookpoint(tmp_path, sae):
    imported = load_any(write_sparsify_folder(tmp_path / HOOK, sae))
    assert_weights_of(imported, sae)
    assert imported.hookpoint == HOOK and imported.concepts == [] and imported.tables is None
    assert imported.provenance["imported_from"]["format"] == "sparsify"


def test_folder_holding_one_hookpoint_folder_imports_it(tmp_path, sae):
    write_sparsify_folder(tmp_path / "repo" / HOOK, sae)
    assert load_any(tmp_path / "repo").hookpoint == HOOK


def test_folder_holding_several_hookpoints_needs_a_choice(tmp_path, sae):
    write_sparsify_folder(tmp_path / "repo" / HOOK, sae)
    write_sparsify_folder(tmp_path / "repo" / "unet.up_blocks.1.attentions.2", random_sae(seed=4))
    with pytest.raises(SAEFileError, match=r"2 hookpoints .*attentions\.1.*attentions\.2"):
        load_any(tmp_path / "repo")
    chosen = load_any(tmp_path / "repo", hookpoint="up_blocks.1.attentions.2")
    assert chosen.hookpoint == "unet.up_blocks.1.attentions.2"
    assert_weights_of(chosen, random_sae(seed=4))


def test_weights_file_path_imports_its_folder(tmp_path, sae):
    folder = write_sparsify_folder(tmp_path / HOOK, sae)
    assert_weights_of(load_any(folder / "sae.safetensors"), sae)


def test_dtype_comes_from_the_file(tmp_path, sae):
    imported = load_any(write_sparsify_folder(tmp_path / HOOK, sae, dtype=torch.float16))
    assert all(w.dtype == torch.float16 for w in imported.weights.values())


def test_expansion_factor_gives_the_width_when_num_latents_is_zero(tmp_path, sae):
    imported = load_any(write_sparsify_folder(tmp_path / HOOK, sae, num_latents=0, expansion_factor=4))
    assert imported.config.num_latents == 64


def test_saemnesia_root_checkpoint_with_aliases_needs_the_hookpoint_named(tmp_path, sae):
    folder = write_sparsify_folder(tmp_path / "checkpoint", sae, d_in=None, d_model=16, num_latents=None,
                                   n_dirs_local=64)
    with pytest.raises(SAEFileError, match="does not say which block it reads; give it"):
        load_any(folder)
    imported = load_any(folder, hookpoint=HOOK, model_family="sd15")
    assert_weights_of(imported, sae)
    assert (imported.hookpoint, imported.model_family) == (HOOK, "sd15")


def test_a_hookpoint_not_in_diffusers_style_is_refused(tmp_path, sae):
    folder = write_sparsify_folder(tmp_path / "checkpoint", sae)
    with pytest.raises(SAEFileError, match="not a diffusers-style module path"):
        load_any(folder, hookpoint="diffusion_model.output_blocks.4.1")


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_pth_with_openai_key_names_is_remapped(tmp_path, sae, nested):
    imported = load_any(write_openai_folder(tmp_path / HOOK, sae, nested=nested))
    assert_weights_of(imported, sae)
    assert imported.provenance["imported_from"]["format"] == "openai"


def test_our_own_file_loads_as_is_and_overrides_apply(tmp_path):
    original = make_random_sae_file(path=tmp_path / "f.safetensors")
    loaded = load_any(tmp_path / "f.safetensors", model_family="sd15")
    assert loaded.model_family == "sd15" and loaded.concepts == original.concepts


def test_imported_checkpoint_saves_as_a_valid_sae_file(tmp_path, sae):
    imported = load_any(write_openai_folder(tmp_path / HOOK, sae))
    save_sae_file(imported, tmp_path / "out.safetensors")
    assert_weights_of(load_sae_file(tmp_path / "out.safetensors"), sae)


@pytest.mark.parametrize("cfg, message", [
    ({"k": None}, "needs d_in"),
    ({"skip_connection": True}, "skip connections"),
    ({"activation": "groupmax"}, "only topk"),
])
def test_bad_checkpoint_configs_are_refused(tmp_path, sae, cfg, message):
    with pytest.raises(SAEFileError, match=message):
        load_any(write_sparsify_folder(tmp_path / HOOK, sae, **cfg))


def test_checkpoint_with_mismatched_weight_shapes_is_refused(tmp_path, sae):
    with pytest.raises(SAEFileError, match=r"encoder.weight has shape \[64, 16\], expected \[32, 16\]"):
        load_any(write_sparsify_folder(tmp_path / HOOK, sae, num_latents=32))


def test_folder_without_weights_is_refused(tmp_path, sae):
    folder = write_sparsify_folder(tmp_path / HOOK, sae)
    (folder / "sae.safetensors").unlink()
    with pytest.raises(SAEFileError, match="no weights"):
        load_any(folder)


# ---------------------------------------------------------------------------------------------- concept statistics


def test_concept_statistics_reproduce_the_released_per_step_selection_and_statistics(tmp_path):
    stats = synthetic_statistics()
    params = {"Cats": {"percentile": 99.0, "multiplier": -5.0}, "Dogs": {"percentile": 95.0, "multiplier": -30.0}}
    torch.save(params, tmp_path / "class_params.pth")
    base = make_random_sae_file(concepts=[])
    result = import_concept_statistics(base, write_pickle(tmp_path / "cls.pkl", stats), tmp_path / "class_params.pth",
                                       percentile=97.0)
    assert [c.label for c in result.concepts] == ["Cats", "Dogs", "Birds"]
    assert [c.default_strength for c in result.concepts] == [-5.0, -30.0, -1.0]
    assert result.num_buckets == 100 and result.selection_mode == "saeuron"
    percentiles = {"Cats": 99.0, "Dogs": 95.0, "Birds": 97.0}
    for c, name in enumerate(stats):
        for step in range(100):
            # What SAEMaskedUnlearningHook precomputes for this step; step 0 (noisiest) is the last bucket.
            score = released_saeuron_score(stats, name, step)
            idx = torch.where(score > torch.quantile(score, percentiles[name] / 100))[0]
            mu = stats[name][:, step, idx].float().mean(0)
            theta = sum(v[:, step, idx].float().mean(0) for v in stats.values()) / len(stats)
            bucket = 99 - step
            row = result.tables.latents[c, bucket]
            assert row[row >= 0].tolist() == idx.tolist()
            torch.testing.assert_close(result.tables.mean_acts[c, bucket, : len(idx)], mu)
            torch.testing.assert_close(result.tables.thresholds[c, bucket, : len(idx)], theta)


def test_converted_statistics_round_trip_through_the_file(tmp_path):
    base = make_random_sae_file(concepts=[])
    result = import_concept_statistics(base, write_pickle(tmp_path / "cls.pkl", synthetic_statistics(steps=10)))
    save_sae_file(result, tmp_path / "out.safetensors")
    loaded = load_sae_file(tmp_path / "out.safetensors")
    assert loaded.concepts == result.concepts and torch.equal(loaded.tables.latents, result.tables.latents)


def test_statistics_saved_with_torch_save_load_too(tmp_path):
    torch.save(synthetic_statistics(steps=10), tmp_path / "cls.pt")
    result = import_concept_statistics(make_random_sae_file(concepts=[]), tmp_path / "cls.pt")
    assert result.num_buckets == 10


@pytest.mark.parametrize("alter, message", [
    (lambda s: s.__setitem__("Cats", s["Cats"][:, :, :32]), "32 latents"),
    (lambda s: s.__setitem__("Cats", s["Cats"][:, :5]), "has 10 steps, others have 5"),
    (lambda s: s.__setitem__("Cats", s["Cats"][0]), "n_prompts"),
    (lambda s: s.clear(), "non-empty dict"),
])
def test_malformed_statistics_are_refused(tmp_path, alter, message):
    stats = synthetic_statistics(steps=10)
    alter(stats)
    with pytest.raises(SAEFileError, match=message):
        import_concept_statistics(make_random_sae_file(concepts=[]), write_pickle(tmp_path / "cls.pkl", stats))


def test_step_counts_that_do_not_map_one_to_one_are_refused(tmp_path):
    stats = synthetic_statistics(steps=300, n=64)
    with pytest.raises(SAEFileError, match="one-to-one"):
        import_concept_statistics(make_random_sae_file(concepts=[]), write_pickle(tmp_path / "cls.pkl", stats))


# ---------------------------------------------------------------------------------------------- hostile pickles


class CreatesMarker:
    """A pickle payload that, if ever unpickled with plain pickle, creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_hostile_payload_is_real(tmp_path):
    pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "control"))).close()  # plain pickle runs it
    assert (tmp_path / "control").exists()


def test_hostile_statistics_pickle_runs_nothing_and_fails_clearly(tmp_path):
    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "cls.pkl", {"Cats": CreatesMarker(marker)})
    with pytest.raises(SAEFileError, match="refusing to load global io.open"):
        import_concept_statistics(make_random_sae_file(concepts=[]), path)
    assert not marker.exists()


def test_hostile_torch_save_archives_run_nothing(tmp_path, sae):
    marker = tmp_path / "marker"
    torch.save({"Cats": CreatesMarker(marker)}, tmp_path / "class_params.pth")
    with pytest.raises(SAEFileError, match="cannot load safely"):
        load_pickle(tmp_path / "class_params.pth")
    folder = write_openai_folder(tmp_path / HOOK, sae)
    # padded past the size check, so that the unpickler itself meets the hostile object
    torch.save({"pre_bias": CreatesMarker(marker), "pad": torch.zeros(4096)}, folder / "state_dict.pth")
    with pytest.raises(SAEFileError, match="cannot load safely"):
        load_any(folder)
    assert not marker.exists()


def test_pickle_loader_still_reads_plain_tensor_pickles_of_every_protocol(tmp_path):
    value = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3)[:, 1:]}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        assert torch.equal(load_pickle(path)["a"], value["a"])
