"""The SAE file (DESIGN §7): round trips, the header-only reader, atomic saves, and one clear error per defect."""

import dataclasses
import os
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import saemnesia_core.sae_file as sae_file_module
from saemnesia_core.concepts import Concept
from saemnesia_tools.testing import make_random_sae_file
from saemnesia_core.sae_file import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    SAEFileError,
    load_sae_file,
    read_header,
    save_sae_file,
)


def assert_same_file(a, b):
    assert (a.config, a.concepts, a.hookpoint, a.model_family, a.num_buckets, a.supervised, a.provenance,
            a.selection_mode) == (b.config, b.concepts, b.hookpoint, b.model_family, b.num_buckets, b.supervised,
                                  b.provenance, b.selection_mode)
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        assert a.weights[name].dtype == b.weights[name].dtype and torch.equal(a.weights[name], b.weights[name])
    for name in ("latents", "mean_acts", "thresholds"):
        assert torch.equal(getattr(a.tables, name), getattr(b.tables, name))


def raw_parts(path):
    """(tensors, metadata dict) of a saved file, for writing altered copies with safetensors directly."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    return tensors, meta


def write_raw(path, tensors, meta):
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "sae.safetensors"
    return path, make_random_sae_file(path=path)


@pytest.mark.parametrize("kwargs", [dict(supervised=True), dict(supervised=False),
                                    dict(dtype=torch.float16, input_unit_norm=True), dict(dtype=torch.bfloat16),
                                    dict(concepts=(Concept("Cats", "object", None, calibration=0.25), "Dogs"))])
def test_save_then_load_round_trips_everything(tmp_path, kwargs):
    original = make_random_sae_file(**kwargs, path=tmp_path / "f.safetensors")
    assert_same_file(load_sae_file(tmp_path / "f.safetensors"), original)


def test_file_without_concepts_round_trips(tmp_path):
    original = dataclasses.replace(make_random_sae_file(), concepts=[], tables=None)
    save_sae_file(original, tmp_path / "f.safetensors")
    loaded = load_sae_file(tmp_path / "f.safetensors")
    assert loaded.concepts == [] and loaded.tables is None


def test_metadata_is_one_json_document_with_the_documented_fields(saved):
    _, meta = raw_parts(saved[0])
    # a file that reads the block's output and uses nothing else of version 2 is written as version 1
    assert meta["format_version"] == 1 < FORMAT_VERSION and meta["activation"] == "topk"
    assert not {"reads", "tokens", "strength_unit", "pre_encoder"} & meta.keys()
    assert {"d_in", "num_latents", "k", "input_unit_norm", "hookpoint", "model_family", "num_buckets",
            "supervised", "selection_mode", "concepts", "provenance"} <= meta.keys()
    assert meta["concepts"][0].keys() == {"label", "group", "latent", "default_strength"}


def test_a_calibrated_concept_stores_its_kappa_and_an_uncalibrated_one_writes_no_key(tmp_path):
    path = tmp_path / "f.safetensors"
    make_random_sae_file(concepts=(Concept("Cats", "object", None, calibration=0.25), "Dogs"), path=path)
    cats, dogs = raw_parts(path)[1]["concepts"]
    assert cats["calibration"] == 0.25 and "calibration" not in dogs
    assert [c.calibration for c in read_header(path).concepts] == [0.25, None]


def test_header_reader_returns_metadata_and_concepts_without_reading_tensors(saved, monkeypatch):
    path, original = saved
    monkeypatch.setattr(sae_file_module, "load_file", lambda *a, **k: pytest.fail("read tensor data"))
    header = read_header(path)
    assert header.concepts == original.concepts and header.config == original.config
    assert (header.hookpoint, header.model_family, header.num_buckets) == ("unet.up_blocks.1.attentions.1", "toy", 4)
    assert header.dtype == torch.float32 and header.format_version == 1  # nothing of version 2 in it


def test_build_sae_has_the_file_weights(saved):
    sae = saved[1].build_sae(dtype=torch.float16)
    assert sae.dtype == torch.float16
    torch.testing.assert_close(sae.W_dec, saved[1].weights["W_dec"].half())
    assert saved[1].build_sae().dtype == torch.float32


def test_save_is_atomic_and_leaves_no_temporary_file(saved, monkeypatch):
    path, original = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sae_file_module, "save_file", crash)
    with pytest.raises(OSError):
        save_sae_file(dataclasses.replace(original, hookpoint="unet.mid_block.attentions.0"), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_save_refuses_an_invalid_file_before_writing(tmp_path):
    bad = dataclasses.replace(make_random_sae_file(), hookpoint="")
    with pytest.raises(SAEFileError, match="hookpoint"):
        save_sae_file(bad, tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()


# One defect per case: (how to alter the tensors/metadata, what the message must say).
def _drop(key):
    return lambda t, m: m.pop(key)


def _set(key, value):
    return lambda t, m: m.__setitem__(key, value)


DEFECTS = {
    "missing metadata key": (_drop("k"), "missing key 'k'"),
    "unknown format version": (_set("format_version", 99), "unknown format version 99"),
    "wrongly typed field": (_set("num_buckets", "four"), "'num_buckets' must be int"),
    "unsupported activation": (_set("activation", "groupmax"), "unsupported activation"),
    "k larger than n": (_set("k", 1000), "k = 1000 exceeds"),
    "unknown selection mode": (_set("selection_mode", "magic"), "unknown selection mode"),
    "duplicate labels": (lambda t, m: m["concepts"].append(dict(m["concepts"][0])), "unique"),
    "concept latent out of range": (lambda t, m: m["concepts"][0].__setitem__("latent", 64), "latent 64"),
    "missing tensor": (lambda t, m: t.pop("b_dec"), "missing tensor(s): b_dec"),
    "unexpected tensor": (lambda t, m: t.__setitem__("W_skip", torch.zeros(16, 16)), "unexpected tensor(s): W_skip"),
    "shape mismatch": (lambda t, m: t.__setitem__("W_dec", torch.zeros(64, 15)), "W_dec has shape [64, 15]"),
    "integer weights": (lambda t, m: t.__setitem__("b_dec", torch.zeros(16, dtype=torch.int64)), "dtype"),
    "NaN in weights": (lambda t, m: t["encoder.weight"].__setitem__((3, 4), float("nan")), "NaN or Inf"),
    "Inf in statistics": (lambda t, m: t["concepts.mean_acts"].__setitem__((0, 0, 0), float("inf")), "NaN or Inf"),
    "table latent out of range": (lambda t, m: t["concepts.latents"].__setitem__((1, 2, 0), 64), "latent 64"),
    "tables for the wrong bucket count": (_set("num_buckets", 5), "expected [3, 5, 1]"),
    "zero calibration": (lambda t, m: m["concepts"][0].__setitem__("calibration", 0), "calibration must be a number"),
    "calibration too large": (lambda t, m: m["concepts"][1].__setitem__("calibration", 1e3), r"in (0, 100]"),
    "calibration not a number": (lambda t, m: m["concepts"][0].__setitem__("calibration", "0.5"), "calibration"),
    "assigned latent missing from its table": (
        lambda t, m: t["concepts.latents"].__setitem__((0, 1, 0), (m["concepts"][0]["latent"] + 1) % 64),
        "missing from its table"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_raises_sae_file_error_saying_what_is_wrong(saved, tmp_path, defect):
    alter, message = DEFECTS[defect]
    tensors, meta = raw_parts(saved[0])
    alter(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    write_raw(bad, tensors, meta)
    with pytest.raises(SAEFileError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_sae_file(bad)


def test_a_file_that_is_not_safetensors_says_so_without_quoting_an_absurd_header_length(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("These are my notes, not an SAE.\n" * 10)
    with pytest.raises(SAEFileError, match="not a safetensors file") as caught:
        read_header(bad)
    assert str(int.from_bytes(b"These ar", "little")) not in str(caught.value)


def test_oversized_header_is_refused_before_reading_it(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * (MAX_HEADER_BYTES + 1))
    with pytest.raises(SAEFileError, match="exceeds"):
        read_header(bad)


def test_what_the_safetensors_reader_lacks_is_checked_before_it_opens_the_file(tmp_path):
    from safetensors import safe_open

    big = tmp_path / "big.safetensors"  # a valid file whose header (20 MB) the library reads, but a UI refresh should not
    save_file({"W_dec": torch.zeros(2, 2)}, str(big), metadata={METADATA_KEY: "x" * 20_000_000})
    with safe_open(str(big), framework="pt") as f:
        assert len(f.metadata()[METADATA_KEY]) == 20_000_000
    with pytest.raises(SAEFileError, match="exceeds"):
        read_header(big)
    fifo = tmp_path / "fifo.safetensors"  # opening a FIFO for reading blocks until a writer comes
    os.mkfifo(fifo)
    with pytest.raises(SAEFileError, match="not a regular file"):
        read_header(fifo)


def test_header_that_is_not_json_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        read_header(bad)


def test_truncated_file_is_refused_by_header_reader_and_loader(saved, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(saved[0].read_bytes()[:-10])
    for read in (read_header, load_sae_file):
        with pytest.raises(SAEFileError, match="truncated"):
            read(bad)


def test_safetensors_file_without_our_metadata_points_to_the_importer(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"W_dec": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(SAEFileError, match="convert"):
        read_header(plain)


def test_missing_file_is_an_sae_file_error(tmp_path):
    with pytest.raises(SAEFileError, match="cannot read"):
        load_sae_file(tmp_path / "nothing.safetensors")
