"""What an SAE reads, in the file (DESIGN §7): the signal (the block's output or its update), the tokens, the input
preparation (input_unit_norm, SAEParate's pre-encoder), the strength unit and each latent's mean activation. Every
public family's layout is detected from its files and imported with its meaning; files written before version 2 keep
loading as block-output SAEs; bad means, unknown values and latent-like labels are refused clearly."""

import json
import pickle

import pytest
import torch

from helpers_families import random_raw, write_hub_topk, write_saemnesia, write_saeparate, write_saeuron, \
    write_sdxl_unbox, write_unbox
from saemnesia_core.importers import checkpoint_header, load_any
from saemnesia_core.sae_file import SAEFileError, load_sae_file, read_header, save_sae_file
from saemnesia_tools.testing import make_random_sae_file
from saemnesia_tools.toy import assets

SD15 = "unet.up_blocks.1.attentions.1"
SDXL = "unet.down_blocks.2.attentions.1"


def test_each_family_is_detected_from_its_files_and_imported_with_what_it_reads(tmp_path):
    raw = random_raw(d=16, n=64, k=4, seed=0, means=True)
    cases = {
        "saeuron": (write_saeuron(tmp_path / "a", SD15, raw), {}, ("sparsify", "output", "block", SD15)),
        "saeparate": (write_saeparate(tmp_path / "b", SD15, random_raw(16, 64, 4, 1, pre_encoder=True)), {},
                      ("sparsify", "output", "block", SD15)),
        "saemnesia": (write_saemnesia(tmp_path / "c", raw, {"Cats": (99.0, -1.0)}),
                      {"hookpoint": SD15, "reads": "update", "strength_unit": "beta"},
                      ("sparsify", "update", "block", SD15)),
        "sdxl-unbox": (write_sdxl_unbox(tmp_path / "d", SDXL, raw), {}, ("unbox", "update", "block", SDXL)),
        "flux-18": (write_unbox(tmp_path / "e" / "SAE_flux_18", raw),
                    {"hookpoint": "transformer.transformer_blocks.18"},
                    ("unbox", "update", "image", "transformer.transformer_blocks.18")),
        "hub image": (write_hub_topk(tmp_path / "f", "cc3m-transformer_blocks.18-1", raw), {},
                      ("hub-topk", "output", "image", "transformer.transformer_blocks.18")),
        "hub text": (write_hub_topk(tmp_path / "g", "cc3m-transformer_blocks.18-0", raw), {},
                     ("hub-topk", "output", "text", "transformer.transformer_blocks.18")),
        "hub single": (write_hub_topk(tmp_path / "h", "cc3m-single_transformer_blocks.9", raw), {},
                       ("hub-topk", "output", "joined", "transformer.single_transformer_blocks.9")),
    }
    for name, (folder, options, (layout, reads, tokens, hookpoint)) in cases.items():
        f = load_any(folder, **options)
        assert (f.provenance["imported_from"]["format"], f.reads, f.tokens, f.hookpoint) == \
            (layout, reads, tokens, hookpoint), name
        assert torch.equal(f.weights["encoder.weight"], (random_raw(16, 64, 4, 1, pre_encoder=True)
                                                          if name == "saeparate" else raw).W_enc), name
        header = checkpoint_header(folder) if name != "saemnesia" else None
        if header is not None:  # what the concept route shows for a folder, from its config and names alone
            assert (header.reads, header.config.num_latents) == (reads, 64), name
    assert load_any(cases["saeparate"][0]).config.pre_encoder
    assert load_any(cases["saemnesia"][0], **cases["saemnesia"][1]).strength_unit == "beta"
    assert torch.equal(load_any(cases["sdxl-unbox"][0]).latent_means, raw.means)


def test_a_version_2_file_round_trips_everything_it_says_about_its_reading(tmp_path):
    raw = random_raw(d=16, n=64, k=4, seed=0, means=True)
    imported = load_any(write_sdxl_unbox(tmp_path, SDXL, raw), model_family="sdxl")
    path = tmp_path / "unbox.safetensors"
    save_sae_file(imported, path)
    header = read_header(path)
    assert (header.format_version, header.reads, header.tokens, header.has_latent_means) == (2, "update", "block", True)
    assert "the block's update (output − input)" in header.reads_text
    again = load_sae_file(path)
    assert torch.equal(again.latent_means, raw.means) and again.reads == "update"
    parate = load_any(write_saeparate(tmp_path / "p", SD15, random_raw(16, 64, 4, 1, pre_encoder=True)))
    save_sae_file(parate, tmp_path / "parate.safetensors")
    loaded = load_sae_file(tmp_path / "parate.safetensors")
    assert loaded.config.pre_encoder and "pre_encoder.0.weight" in loaded.weights
    assert "a GELU pre-encoder" in loaded.reads_text and loaded.build_sae().pre_encoder is not None


def test_files_written_before_version_2_keep_loading_as_block_output_saes(tmp_path):
    make_random_sae_file(path=tmp_path / "v1.safetensors")  # says nothing of version 2: written as version 1
    header = read_header(tmp_path / "v1.safetensors")
    assert (header.format_version, header.reads, header.tokens, header.strength_unit) == (1, "output", "block", "mean")
    for site in assets.ALL_SITES:  # the shipped files read the block's output too, and hold shift mode's directions
        header = read_header(assets.path(site.saemnesia))
        reading = (header.format_version, header.reads, header.tokens, header.strength_unit, header.has_directions)
        assert reading == (3, "output", "block", "mean", True)


def test_a_file_of_a_newer_format_or_with_unknown_reading_values_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    make_random_sae_file(path=path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["saemnesia"])
    for changes, message in (({"format_version": 4}, "unknown format version 4"),
                             ({"format_version": 2, "reads": "input", "tokens": "block", "strength_unit": "mean",
                               "pre_encoder": False}, "unknown reads 'input'"),
                             ({"format_version": 2, "reads": "update", "tokens": "pixels", "strength_unit": "mean",
                               "pre_encoder": False}, "unknown tokens 'pixels'")):
        save_file(tensors, str(path), metadata={"saemnesia": json.dumps({**meta, **changes})})
        with pytest.raises(SAEFileError, match=message):
            read_header(path)


@pytest.mark.parametrize("means, message", [
    (torch.ones(63), r"expected each latent's mean activation, a float tensor \[64\], got \[63\]"),
    (torch.tensor([float("nan")] + [1.0] * 63), "mean activations must be finite and non-negative"),
    (torch.tensor([-1.0] + [1.0] * 63), "mean activations must be finite and non-negative"),
    ({"not": "a tensor"}, r"expected each latent's mean activation, a float tensor \[64\], got dict"),
])
def test_a_bad_mean_pt_is_refused_clearly(tmp_path, means, message):
    raw = random_raw(d=16, n=64, k=4, seed=0, means=True)
    folder = write_sdxl_unbox(tmp_path, SDXL, raw)
    torch.save(means, folder / "mean.pt")
    with pytest.raises(SAEFileError, match=f"mean.pt: {message}"):
        load_any(folder)


def test_a_mean_pt_that_is_a_hostile_pickle_runs_nothing(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    folder = write_sdxl_unbox(tmp_path, SDXL, random_raw(d=16, n=64, k=4, seed=0, means=True))
    (folder / "mean.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SAEFileError, match="cannot load safely"):
        load_any(folder)


def test_labels_that_look_like_latent_references_are_refused_in_a_file(tmp_path):
    with pytest.raises(SAEFileError, match="look like latent references"):
        make_random_sae_file(concepts=("#12", "Dogs"), path=tmp_path / "f.safetensors")


def test_a_folder_that_does_not_name_its_block_asks_for_it(tmp_path):
    folder = write_unbox(tmp_path / "SAE_flux_18", random_raw(d=16, n=64, k=4, seed=0, means=True))
    with pytest.raises(SAEFileError, match="does not say which block it reads; give it .*--hookpoint"):
        load_any(folder)


def test_an_update_reading_eraser_needs_the_block_input_and_is_the_identity_where_nothing_fires():
    from saemnesia_core.concepts import Concept, ConceptTables
    from saemnesia_core.eraser import ConceptEraser
    from saemnesia_tools.testing import random_sae

    sae = random_sae(d=16, n=64, k=4, seed=0)
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    update = (x - base).flatten(2).transpose(1, 2)
    fired = torch.zeros(64).index_add_(0, sae.encode(update).top_indices.flatten(), torch.ones(2 * 16 * 4))
    busiest, other = int(fired.argmax()), int(fired.argmin())  # one latent the update fires, one it does not
    tables = ConceptTables(torch.tensor([[[busiest]], [[other]]]), torch.ones(2, 1, 1),
                           torch.tensor([[[-1e30]], [[1e30]]]))
    concepts = [Concept("Fires", "object", busiest), Concept("Never", "object", other)]
    fires = ConceptEraser(sae, concepts, tables, {"Fires": -1.0}, reads="update")
    with pytest.raises(ValueError, match="reads the block's update .* the block's input was not given"):
        fires(x, 0.5)
    with pytest.raises(ValueError, match="needs both of one shape"):
        fires(x, 0.5, base=base[:, :, :2])
    never = ConceptEraser(sae, concepts, tables, {"Never": -1.0}, reads="update")
    assert torch.equal(never(x, 0.5, base=base), x)
    edited = fires(x, 0.5, base=base)
    assert not torch.equal(edited, x)
    # the change is what the same edit does to the update, written back onto the output
    as_output = ConceptEraser(sae, concepts, tables, {"Fires": -1.0})(x - base, 0.5)
    torch.testing.assert_close(edited - x, as_output - (x - base), rtol=1e-5, atol=1e-5)
