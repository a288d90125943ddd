"""Property-based fuzzing of the SAE file readers and the statistics importer: whatever the bytes, only
SAEFileError may escape."""

import json
import pickle
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saemnesia_core.testing import make_random_sae_file
from saemnesia_core.importers import import_concept_statistics, load_any
from saemnesia_core.sae_file import METADATA_KEY, SAEFileError, load_sae_file, read_header, save_sae_file

FUZZ = settings(max_examples=150, deadline=None)


def _valid_file_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        make_random_sae_file(d=8, n=16, k=2, concepts=("a", "b"), num_buckets=2, supervised=False, path=path)
        return path.read_bytes()


VALID = _valid_file_bytes()
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
INDEX = json.loads(VALID[8 : 8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN :]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def with_index(index: dict) -> bytes:
    header = json.dumps(index).encode()
    return struct.pack("<Q", len(header)) + header + DATA


def readers_raise_only_sae_file_error(data: bytes) -> list[str]:
    """Every reader either returns or raises SAEFileError (anything else fails the test); the readers that
    returned."""
    loaded = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        path.write_bytes(data)
        for read in (read_header, load_sae_file, load_any):
            try:
                read(path)
                loaded.append(read.__name__)
            except SAEFileError:
                pass
    return loaded


def test_the_unmutated_rebuilt_file_loads():
    assert readers_raise_only_sae_file_error(with_index(INDEX)) == ["read_header", "load_sae_file", "load_any"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "f.safetensors").write_bytes(with_index(INDEX))
        save_sae_file(load_sae_file(Path(tmp) / "f.safetensors"), Path(tmp) / "g.safetensors")


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_every_truncation_is_an_sae_file_error(length):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        path.write_bytes(VALID[:length])
        for read in (read_header, load_sae_file):
            try:
                read(path)
            except SAEFileError:
                continue
            raise AssertionError(f"{read.__name__} accepted a file truncated to {length} bytes")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 8 + HEADER_LEN + 64), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes_in_the_header_raise_only_sae_file_error(flips):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    readers_raise_only_sae_file_error(bytes(data))


@FUZZ
@given(st.sampled_from(sorted(json.loads(INDEX["__metadata__"][METADATA_KEY]))), json_values | st.just("<delete>"))
def test_mutated_metadata_fields_raise_only_sae_file_error(key, value):
    meta = json.loads(INDEX["__metadata__"][METADATA_KEY])
    if value == "<delete>":
        del meta[key]
    else:
        meta[key] = value
    readers_raise_only_sae_file_error(with_index({**INDEX, "__metadata__": {METADATA_KEY: json.dumps(meta)}}))


@FUZZ
@given(st.integers(0, 1), st.sampled_from(["label", "group", "latent", "default_strength"]), json_values)
def test_mutated_concept_entries_raise_only_sae_file_error(which, key, value):
    meta = json.loads(INDEX["__metadata__"][METADATA_KEY])
    meta["concepts"][which][key] = value
    readers_raise_only_sae_file_error(with_index({**INDEX, "__metadata__": {METADATA_KEY: json.dumps(meta)}}))


@FUZZ
@given(st.sampled_from(sorted(k for k in INDEX if k != "__metadata__")),
       st.sampled_from(["dtype", "shape", "data_offsets"]), json_values)
def test_mutated_tensor_entries_raise_only_sae_file_error(name, field, value):
    index = json.loads(json.dumps(INDEX))
    index[name][field] = value
    readers_raise_only_sae_file_error(with_index(index))


@FUZZ
@given(json_values)
def test_arbitrary_json_headers_raise_only_sae_file_error(index):
    readers_raise_only_sae_file_error(with_index(index))


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_sae_file_error(data):
    readers_raise_only_sae_file_error(data)


def _valid_statistics_pickle() -> bytes:
    g = torch.Generator().manual_seed(0)
    return pickle.dumps({name: torch.rand(2, 4, 16, generator=g).half() for name in ("a", "b")})


STATS = _valid_statistics_pickle()
BASE = make_random_sae_file(d=8, n=16, k=2, concepts=())


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(STATS) - 1), st.integers(0, 255)), min_size=1, max_size=6) |
       st.integers(0, len(STATS) - 1))
def test_mutated_statistics_pickles_raise_only_sae_file_error(mutation):
    if isinstance(mutation, int):
        data = STATS[:mutation]
    else:
        data = bytearray(STATS)
        for position, value in mutation:
            data[position] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cls.pkl"
        path.write_bytes(bytes(data))
        try:
            import_concept_statistics(BASE, path)
        except SAEFileError:
            pass
