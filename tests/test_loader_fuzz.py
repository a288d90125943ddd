"""Property-based fuzzing of the SAE file readers and the statistics importer: whatever the bytes, only
SAEFileError may escape; and whatever a file says, what loads can be erased with.

Byte-level targets flip, cut and replace bytes; the coordinated targets build files and statistics whose parts
agree with each other (tensor shapes that match the header's counts, tables of any width and bucket count,
expanded tensors, odd labels and strengths) so that the checks behind the first ones are reached too. Seeded
(derandomised). Every target runs SAEMNESIA_FUZZ_EXAMPLES cases when it is set (by default 2,000 per coordinated
target and 150 per byte-level one); with SAEMNESIA_FUZZ_REPORT=path the module writes how many cases each target
ran and how they ended:

    SAEMNESIA_FUZZ_EXAMPLES=10000 SAEMNESIA_FUZZ_REPORT=benchmarks/results/fuzz_loaders.json \
        .venv/bin/python -m pytest tests/test_loader_fuzz.py
"""

import collections
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.files import write_json_atomic
from saemnesia_core.concept_statistics import import_concept_statistics
from saemnesia_core.importers import load_any
from saemnesia_core.sae_file import METADATA_KEY, SAEFileError, load_sae_file, read_header, save_sae_file
from saemnesia_core.sae_format import MAX_BUCKETS
from saemnesia_tools.testing import make_random_sae_file

COORDINATED_CASES = int(os.environ.get("SAEMNESIA_FUZZ_EXAMPLES", 2000))
BYTE_CASES = int(os.environ.get("SAEMNESIA_FUZZ_EXAMPLES", 150))  # the byte-level targets: 150 in CI
FUZZ = settings(max_examples=BYTE_CASES, deadline=None, derandomize=True)
COORDINATED = settings(max_examples=COORDINATED_CASES, deadline=None, derandomize=True)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    yield
    if os.environ.get("SAEMNESIA_FUZZ_REPORT"):
        write_json_atomic(Path(os.environ["SAEMNESIA_FUZZ_REPORT"]), {
            "written_by": "SAEMNESIA_FUZZ_EXAMPLES=N SAEMNESIA_FUZZ_REPORT=path pytest tests/test_loader_fuzz.py",
            "cases_setting": {"coordinated": COORDINATED_CASES, "byte_level": BYTE_CASES},
            "targets": {name: dict(sorted(counts.items())) for name, counts in sorted(OUTCOMES.items())}})


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


def readers_raise_only_sae_file_error(data: bytes, target: str = "bytes") -> list[str]:
    """Every reader either returns or raises SAEFileError (anything else fails the test); the readers that
    returned. A file that loads must also give a working eraser for all its concepts."""
    loaded = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        path.write_bytes(data)
        loaded = read_all(path)
    OUTCOMES[target]["cases"] += 1
    OUTCOMES[target]["loaded" if "load_sae_file" in loaded else "refused"] += 1
    return loaded


def read_all(path: Path) -> list[str]:
    loaded = []
    for read in (read_header, load_sae_file, load_any):
        try:
            result = read(path)
            loaded.append(read.__name__)
        except SAEFileError:
            continue
        if read is load_sae_file:
            erase_with_every_concept(result)
    return loaded


def erase_with_every_concept(sae_file) -> None:
    """What the loader accepts, the eraser can use: every concept at its default strength, every bucket, with a
    finite output for a finite input."""
    eraser = ConceptEraser.from_file(sae_file, {c.label: None for c in sae_file.concepts})
    x = torch.randn(2, 3, sae_file.config.d_in)
    for t in (0.0, 0.5, 1.0):
        out = eraser(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all(), f"non-finite output at t = {t}"


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
    readers_raise_only_sae_file_error(bytes(data), 'flipped header bytes')


@FUZZ
@given(st.sampled_from(sorted(json.loads(INDEX["__metadata__"][METADATA_KEY]))), json_values | st.just("<delete>"))
def test_mutated_metadata_fields_raise_only_sae_file_error(key, value):
    meta = json.loads(INDEX["__metadata__"][METADATA_KEY])
    if value == "<delete>":
        del meta[key]
    else:
        meta[key] = value
    readers_raise_only_sae_file_error(with_index({**INDEX, "__metadata__": {METADATA_KEY: json.dumps(meta)}}), 'metadata fields')


@FUZZ
@given(st.integers(0, 1), st.sampled_from(["label", "group", "latent", "default_strength"]), json_values)
def test_mutated_concept_entries_raise_only_sae_file_error(which, key, value):
    meta = json.loads(INDEX["__metadata__"][METADATA_KEY])
    meta["concepts"][which][key] = value
    readers_raise_only_sae_file_error(with_index({**INDEX, "__metadata__": {METADATA_KEY: json.dumps(meta)}}), 'concept entries')


@FUZZ
@given(st.sampled_from(sorted(k for k in INDEX if k != "__metadata__")),
       st.sampled_from(["dtype", "shape", "data_offsets"]), json_values)
def test_mutated_tensor_entries_raise_only_sae_file_error(name, field, value):
    index = json.loads(json.dumps(INDEX))
    index[name][field] = value
    readers_raise_only_sae_file_error(with_index(index), 'tensor index entries')


@FUZZ
@given(json_values)
def test_arbitrary_json_headers_raise_only_sae_file_error(index):
    readers_raise_only_sae_file_error(with_index(index), 'arbitrary JSON headers')


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_sae_file_error(data):
    readers_raise_only_sae_file_error(data, 'arbitrary bytes')


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
            OUTCOMES["statistics pickle bytes"]["imported"] += 1
        except SAEFileError:
            OUTCOMES["statistics pickle bytes"]["refused"] += 1
    OUTCOMES["statistics pickle bytes"]["cases"] += 1


# ------------------------------------------------------------------------------------ coordinated mutations

# Each draw is usually valid and sometimes hostile, so that most cases get past the first check they meet.
names = st.sampled_from(["a", "b", "Cats", "Dogs", "Van_Gogh", "Neon"]) | st.sampled_from(["a", "b", "Hearts"]) | \
    st.text(st.characters(codec="utf-8"), min_size=0, max_size=6)
numbers = st.sampled_from([-1.0, -5.0, -0.2, 2.0, -30.0]) | st.sampled_from([-1.0, -5.0]) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e39, -1e300, 100.0, 100.5])


def mostly(valid: list, hostile: list):
    """Four valid draws to one hostile."""
    return st.sampled_from(valid * 4 + hostile)


@st.composite
def coordinated_files(draw):
    """A header and tensors that agree on their counts (often) while any value may be hostile."""
    d, n = draw(st.sampled_from([(8, 16), (4, 8)]))
    C = draw(st.integers(0, 3))
    T = draw(mostly([1, 2, 5], [0, -1]) if C else mostly([1, 7, MAX_BUCKETS], [MAX_BUCKETS + 1, 10**9, 0, -3]))
    L = draw(mostly([1, 2, 3], [0]))
    supervised = draw(st.booleans())
    concepts = [{"label": draw(names), "group": draw(mostly(["object", "style"], ["", " x", "\u202e"])),
                 "latent": draw(mostly(list(range(n)), [None, -1, n, n + 1])), "default_strength": draw(numbers)}
                for _ in range(C)]
    meta = {"format_version": 1, "d_in": d, "num_latents": draw(mostly([n], [n + 1])), "k": draw(mostly([1, 2, 3], [0])),
            "activation": "topk", "input_unit_norm": draw(st.booleans()),
            "hookpoint": draw(mostly(["unet.up_blocks.1.attentions.1"], ["x\x1b", ""])), "model_family": "toy",
            "num_buckets": T, "supervised": supervised, "selection_mode": "saemnesia" if supervised else "saeuron",
            "concepts": concepts, "provenance": {}}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensors = {"encoder.weight": torch.randn(n, d, generator=g), "encoder.bias": torch.randn(n, generator=g),
               "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if C:
        shape = (C, max(T, 1), L)  # a header count of 0 or less still comes with tensors
        tensors["concepts.latents"] = torch.randint(-2, n + 2, shape, generator=g)
        if draw(mostly([True], [False])) and L:  # tables that agree with the assigned latents
            tensors["concepts.latents"][:, :, 0] = torch.tensor([c["latent"] if isinstance(c["latent"], int)
                                                                 else 0 for c in concepts])[:, None]
        tensors["concepts.mean_acts"] = torch.rand(shape, generator=g) * draw(mostly([1.0, 5.0], [1e30, float("nan")]))
        tensors["concepts.thresholds"] = torch.rand(shape, generator=g)
    return meta, tensors


@COORDINATED
@given(coordinated_files())
def test_coordinated_header_and_table_mutations_load_and_erase_or_raise_only_sae_file_error(case):
    meta, tensors = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
        loaded = read_all(path)
    OUTCOMES["coordinated files"]["cases"] += 1
    OUTCOMES["coordinated files"]["loaded" if "load_sae_file" in loaded else "refused"] += 1


@st.composite
def statistics_payloads(draw):
    """{label: tensor[prompts, steps, latents]} of any dtype and shape, sometimes expanded, plus class params."""
    stats = {}
    for _ in range(draw(st.integers(1, 3))):
        shape = (draw(mostly([1, 2, 3], [0])), draw(mostly([1, 4, 5], [0])), draw(mostly([16], [15, 17])))
        dtype = draw(mostly([torch.float16, torch.float32], [torch.int32, torch.bool]))
        t = torch.zeros(shape).to(dtype) if 0 in shape else (torch.rand(shape) * 3).to(dtype)
        if draw(mostly([False], [True])) and shape[0] >= 1:  # a view whose shape claims more than its storage holds
            t = t[:1].expand(draw(st.sampled_from([2, 10**6])), *shape[1:])
        elif dtype.is_floating_point and t.numel() and draw(mostly([False], [True])):
            t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e4]))
        stats[draw(names)] = t
    params = draw(mostly([None], [{}]) | st.dictionaries(names, st.dictionaries(
        st.sampled_from(["percentile", "multiplier", "other"]), numbers | st.text(max_size=3), max_size=2),
        max_size=2))
    return stats, params, draw(st.booleans())


@COORDINATED
@given(statistics_payloads())
def test_coordinated_statistics_payloads_import_or_raise_only_sae_file_error(case):
    stats, params, zip_format = case
    with tempfile.TemporaryDirectory() as tmp:
        stats_path, params_path = Path(tmp) / "cls.pkl", Path(tmp) / "class_params.pth"
        for obj, path in ((stats, stats_path), (params, params_path)):
            if zip_format:
                torch.save(obj, path)
            else:
                with open(path, "wb") as f:
                    pickle.dump(obj, f, protocol=2)
        try:
            result = import_concept_statistics(BASE, stats_path, params_path if params is not None else None)
        except SAEFileError:
            OUTCOMES["coordinated statistics"]["refused"] += 1
        else:
            erase_with_every_concept(result)
            OUTCOMES["coordinated statistics"]["imported"] += 1
    OUTCOMES["coordinated statistics"]["cases"] += 1
