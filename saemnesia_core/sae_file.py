"""The SAE file (DESIGN §7): one .safetensors holding the weights, the concept tables and a JSON header.

Tensors: `encoder.weight` [n, d], `encoder.bias` [n], `W_dec` [n, d], `b_dec` [d] (sparsify names, any float
dtype) and, when the file has concepts, `concepts.latents` int64, `concepts.mean_acts` and
`concepts.thresholds` float32, each [C, T, L]. The safetensors string metadata holds one key, "saemnesia",
whose JSON value carries everything else, so the concept list is readable from the header alone.

Every problem with a file raises `SAEFileError` with a message that says what is wrong.
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .concepts import MAX_CALIBRATION, MAX_STRENGTH, MEASURED_KEYS, Concept, ConceptTables
from .files import atomic_path
from .sae import SAEConfig, TopKSAE

FORMAT_VERSION = 1
METADATA_KEY = "saemnesia"
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Larger headers are refused before reading them (and never written): thousands of concepts fit in well under
1 MiB."""
MAX_BUCKETS = 10_000
"""Timestep buckets a file may have: the papers use 50 or 100; the tables and the eraser grow with the count."""

SELECTION_MODES = ("saemnesia", "saeuron")
"""saemnesia: each concept's assigned latent in every bucket; saeuron: latents selected by score per bucket."""

WEIGHT_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
TABLE_NAMES = ("concepts.latents", "concepts.mean_acts", "concepts.thresholds")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
"""safetensors dtype names we can check (the weights and tables use only some of them; _check_structure says which)."""
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class SAEFileError(ValueError):
    """A file that is not a valid SAE file (or importable checkpoint); the message says why."""


@dataclass
class SAEHeader:
    """Everything in a file except the tensors' values: what `read_header` returns."""

    config: SAEConfig
    concepts: list[Concept]
    hookpoint: str
    model_family: str
    num_buckets: int
    supervised: bool
    selection_mode: str
    provenance: dict
    dtype: torch.dtype
    """dtype of the weights as stored."""
    format_version: int = FORMAT_VERSION


@dataclass
class SAEFile:
    """One SAE with its concepts, in memory: what save_sae_file writes and load_sae_file returns."""

    config: SAEConfig
    weights: dict[str, Tensor]
    """The four sparsify-named tensors."""
    concepts: list[Concept]
    tables: ConceptTables | None
    """None exactly when there are no concepts."""
    hookpoint: str
    """diffusers-style module path, e.g. "unet.up_blocks.1.attentions.1"."""
    model_family: str
    """Base model family: "sd15", "sdxl", "toy", … ("unknown" when an import could not tell)."""
    num_buckets: int
    supervised: bool
    """Trained with SAEmnesia's concept supervision."""
    provenance: dict = field(default_factory=dict)
    """Free-form JSON: how the SAE was trained or where it was imported from."""
    selection_mode: str = "saemnesia"

    @property
    def header(self) -> SAEHeader:
        dtype = self.weights["encoder.weight"].dtype if "encoder.weight" in self.weights else torch.float32
        return SAEHeader(self.config, self.concepts, self.hookpoint, self.model_family, self.num_buckets,
                         self.supervised, self.selection_mode, self.provenance, dtype)

    def build_sae(self, device=None, dtype=None) -> TopKSAE:
        """The TopKSAE module with these weights (stored dtype unless one is given; shares their memory if unchanged)."""
        sae = TopKSAE(self.config, device="meta")
        sae.load_state_dict(self.weights, assign=True)
        return sae.to(device=device, dtype=dtype or self.weights["encoder.weight"].dtype)


# ---------------------------------------------------------------------------------------------- writing


def validate_sae_file(sae_file: SAEFile) -> None:
    """Raise SAEFileError unless `sae_file` would make a valid file (what save and load both check)."""
    _check_structure(sae_file.header, {name: (t.dtype, tuple(t.shape)) for name, t in _tensors(sae_file).items()})
    _check_values(sae_file)
    header_bytes = len(_metadata_json(sae_file.header).encode()) + 256 * len(_tensors(sae_file))
    if header_bytes > MAX_HEADER_BYTES:  # what we write, we can read
        raise SAEFileError(f"the header would take about {header_bytes} bytes, more than the {MAX_HEADER_BYTES} bytes "
                           "a reader accepts: shorten the provenance or the concept list")


def save_sae_file(sae_file: SAEFile, path) -> None:
    """Validate, then write whole or not at all (files.atomic_path)."""
    validate_sae_file(sae_file)
    tensors = {name: t.detach().cpu().contiguous() for name, t in _tensors(sae_file).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: _metadata_json(sae_file.header)})


def _tensors(sae_file: SAEFile) -> dict[str, Tensor]:
    tensors = dict(sae_file.weights)
    if sae_file.tables is not None:
        t = sae_file.tables
        tensors.update(zip(TABLE_NAMES, (t.latents, t.mean_acts, t.thresholds)))
    return tensors


def _metadata_json(h: SAEHeader) -> str:
    meta = {
        "format_version": FORMAT_VERSION,
        "d_in": h.config.d_in, "num_latents": h.config.num_latents, "k": h.config.k,
        "activation": "topk", "input_unit_norm": h.config.input_unit_norm,
        "hookpoint": h.hookpoint, "model_family": h.model_family, "num_buckets": h.num_buckets,
        "supervised": h.supervised, "selection_mode": h.selection_mode,
        "concepts": [{"label": c.label, "group": c.group, "latent": c.latent,
                      "default_strength": float(c.default_strength),
                      **({"erasure": c.erasure} if c.erasure is not None else {}),
                      **({"calibration": float(c.calibration)} if c.calibration is not None else {})}
                     for c in h.concepts],
        "provenance": h.provenance,
    }
    try:
        return json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SAEFileError(f"metadata is not plain JSON (check provenance): {e}") from e


# ---------------------------------------------------------------------------------------------- reading


def read_header(path) -> SAEHeader:
    """Metadata and concepts without reading any tensor data (fast enough for every UI refresh)."""
    metadata, entries = _read_index(path)
    if METADATA_KEY not in metadata:
        raise SAEFileError(f"{path}: a safetensors file without SAEmnesia metadata; import it with "
                           "`saemnesia convert` (importers.load_any) instead")
    with _naming(path):
        header = _parse_metadata(metadata[METADATA_KEY], entries.get("encoder.weight", (None,))[0])
        _check_structure(header, entries)
    return header


def is_sae_file(path) -> bool:
    """Whether a safetensors file carries our metadata (a sparsify sae.safetensors does not)."""
    return METADATA_KEY in _read_index(path)[0]


def load_sae_file(path) -> SAEFile:
    """Read and validate a whole file (shapes, dtypes, finite values, latent ids in range)."""
    h = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # the safetensors reader's own errors (SafetensorError, OSError, …)
        raise SAEFileError(f"{path}: cannot read tensors: {e}") from e
    tables = ConceptTables(*(tensors[n] for n in TABLE_NAMES)) if h.concepts else None
    sae_file = SAEFile(h.config, {n: tensors[n] for n in WEIGHT_NAMES}, h.concepts, tables, h.hookpoint,
                       h.model_family, h.num_buckets, h.supervised, h.provenance, h.selection_mode)
    with _naming(path):
        _check_values(sae_file)
    return sae_file


@contextmanager
def _naming(path):
    """Prefix the file's path to SAEFileErrors raised inside."""
    try:
        yield
    except SAEFileError as e:
        raise SAEFileError(f"{path}: {e}") from None


def _read_index(path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple]]]:
    """(string metadata, {tensor name: (dtype, shape)}) of a safetensors file, by safetensors' own reader.

    The library checks the header's JSON, its size (up to 100 MB), the dtypes, and that the tensors' offsets
    agree with their shapes and cover the data exactly. What it lacks, and this adds before opening the file:
    a header cap suited to a request the UI makes on every refresh (MAX_HEADER_BYTES, 16 MiB, instead of
    100 MB), a refusal of anything that is not a regular file (opening a FIFO blocks), and errors of our own
    type whose messages say what is wrong.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SAEFileError(f"{path}: not a regular file")
            prefix = os.read(fd, 8)
        finally:
            os.close(fd)
    except OSError as e:
        raise SAEFileError(f"{path}: cannot read: {e}") from e
    if len(prefix) < 8:
        raise SAEFileError(f"{path}: too short to be a safetensors file ({info.st_size} bytes)")
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > info.st_size - 8:
        raise SAEFileError(f"{path}: not a safetensors file (its first 8 bytes do not give a header length that fits "
                           f"in its {info.st_size} bytes)")
    if header_bytes > MAX_HEADER_BYTES:
        raise SAEFileError(f"{path}: header of {header_bytes} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            index = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except Exception as e:  # the library's SafetensorError, or OSError
        raise SAEFileError(f"{path}: {_library_error(e)}") from e
    entries = {}
    for name, (dtype, shape) in index.items():
        if dtype not in _DTYPES:
            raise SAEFileError(f"{path}: tensor {name!r} has dtype {dtype}, which SAE files do not use")
        entries[name] = (_DTYPES[dtype], shape)
    return metadata, entries


def _library_error(e: Exception) -> str:
    """safetensors' reader's message, said plainly."""
    text = str(e)
    if "not fully covered" in text:
        return "truncated (or padded): the tensors listed in the header do not cover the file's data exactly"
    if "invalid JSON" in text:
        return f"header is not valid JSON or not a safetensors header ({text.split(': ', 1)[-1]})"
    if "header too" in text:
        return f"not a safetensors file ({text.split(': ', 1)[-1]})"
    return f"not a valid safetensors file: {text}"


def _parse_metadata(text: str, dtype: torch.dtype | None) -> SAEHeader:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SAEFileError(f"metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise SAEFileError("metadata is not a JSON object")
    get = _Getter(meta, "metadata")
    version = get("format_version", int)
    if version != FORMAT_VERSION:
        raise SAEFileError(f"unknown format version {version} (this build reads version {FORMAT_VERSION})")
    if get("activation", str) != "topk":
        raise SAEFileError(f"unsupported activation {meta['activation']!r} (only 'topk')")
    try:
        config = SAEConfig(get("d_in", int), get("num_latents", int), get("k", int), get("input_unit_norm", bool))
    except ValueError as e:
        raise SAEFileError(f"metadata: {e}") from e
    concepts = [_parse_concept(c, i) for i, c in enumerate(get("concepts", list))]
    return SAEHeader(config, concepts, get("hookpoint", str), get("model_family", str), get("num_buckets", int),
                     get("supervised", bool), get("selection_mode", str), get("provenance", dict),
                     dtype if dtype is not None else torch.float32, version)


def _parse_concept(entry, i: int) -> Concept:
    if not isinstance(entry, dict):
        raise SAEFileError(f"metadata: concepts[{i}] is not an object")
    get = _Getter(entry, f"concepts[{i}]")
    latent = entry.get("latent")
    if latent is not None and not _is_int(latent):
        raise SAEFileError(f"concepts[{i}]: latent must be an int or null, got {latent!r}")
    try:
        strength = float(get("default_strength", float))
    except OverflowError as e:
        raise SAEFileError(f"concepts[{i}]: default_strength out of range") from e
    erasure = entry.get("erasure")
    if erasure is not None and not _is_erasure_record(erasure):
        raise SAEFileError(f"concepts[{i}]: erasure must be {{{', '.join(MEASURED_KEYS)}}} with counts from 0 to "
                           f"images, got {erasure!r}")
    calibration = entry.get("calibration")
    if calibration is not None and not _is_calibration(calibration):
        raise SAEFileError(f"concepts[{i}]: calibration must be a number in (0, {MAX_CALIBRATION:g}], got "
                           f"{calibration!r}")
    return Concept(get("label", str), get("group", str), latent, strength, erasure,
                   None if calibration is None else float(calibration))


def _is_calibration(value) -> bool:
    """κ_c (Concept.calibration): a number in (0, MAX_CALIBRATION] (NaN and infinities fail)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_CALIBRATION


def _is_erasure_record(record) -> bool:
    """The measured erasure of a concept (Concept.erasure): its keys, a finite strength, consistent counts."""
    if not isinstance(record, dict) or set(record) != set(MEASURED_KEYS):
        return False
    images = record["images"]
    counts = [record[k] for k in ("seen_without", "gone", "other_kept")]
    return (isinstance(record["strength"], (int, float)) and not isinstance(record["strength"], bool)
            and abs(record["strength"]) <= MAX_STRENGTH and _is_int(images) and 0 < images <= 10_000
            and all(_is_int(c) and 0 <= c <= images for c in counts))


class _Getter:
    """meta[key], checked to be of the given JSON type, with a message naming the key."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def __call__(self, key: str, kind: type):
        if key not in self.d:
            raise SAEFileError(f"{self.where}: missing key {key!r}")
        value = self.d[key]
        if kind is int:
            ok = _is_int(value)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise SAEFileError(f"{self.where}: {key!r} must be {kind.__name__}, got {value!r}")
        return value


def is_clean_name(text: str) -> bool:
    """A label or group name people can read and type: not empty, no spaces around it, no control or format
    characters (ANSI escapes, zero-width or direction marks)."""
    return bool(text) and text == text.strip() and not any(unicodedata.category(ch).startswith("C") for ch in text)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------- validation


def _check_structure(h: SAEHeader, tensors: dict[str, tuple[torch.dtype, tuple]]) -> None:
    """Metadata fields and tensor names/dtypes/shapes agree with each other (no tensor values needed)."""
    cfg, C, T = h.config, len(h.concepts), h.num_buckets
    for name in ("hookpoint", "model_family"):
        if not isinstance(getattr(h, name), str) or not is_clean_name(getattr(h, name)):
            raise SAEFileError(f"{name} must be a non-empty string without spaces around it or control characters, "
                               f"got {getattr(h, name)!r}")
    if not _is_int(T) or not 1 <= T <= MAX_BUCKETS:
        raise SAEFileError(f"num_buckets must be an int from 1 to {MAX_BUCKETS}, got {T!r}")
    if not isinstance(h.supervised, bool) or not isinstance(h.provenance, dict):
        raise SAEFileError("supervised must be a bool and provenance a dict")
    if h.selection_mode not in SELECTION_MODES:
        raise SAEFileError(f"unknown selection mode {h.selection_mode!r} (known: {', '.join(SELECTION_MODES)})")
    labels = [c.label for c in h.concepts]
    if any(not isinstance(c.label, str) or not isinstance(c.group, str) for c in h.concepts):
        raise SAEFileError("concept labels and groups must be strings")
    for text in (*labels, *(c.group for c in h.concepts)):
        if not is_clean_name(text):
            raise SAEFileError(f"concept label or group {text!r} is empty, has spaces around it or control characters")
    if len(set(labels)) != len(labels):
        raise SAEFileError(f"concept labels must be unique, got {labels}")
    for c in h.concepts:
        if c.erasure is not None and not _is_erasure_record(c.erasure):
            raise SAEFileError(f"concept {c.label!r}: erasure record {c.erasure!r} is not {list(MEASURED_KEYS)} "
                               "with counts from 0 to images")
        if c.calibration is not None and not _is_calibration(c.calibration):
            raise SAEFileError(f"concept {c.label!r}: calibration {c.calibration!r} is not a number in "
                               f"(0, {MAX_CALIBRATION:g}]")
        if c.latent is not None and not (_is_int(c.latent) and 0 <= c.latent < cfg.num_latents):
            raise SAEFileError(f"concept {c.label!r} points at latent {c.latent}, but the SAE has "
                               f"{cfg.num_latents} latents")
        if not isinstance(c.default_strength, (int, float)) or not abs(c.default_strength) <= MAX_STRENGTH:
            raise SAEFileError(f"concept {c.label!r}: default strength {c.default_strength} is outside "
                               f"[-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]")
        if h.selection_mode == "saemnesia" and c.latent is None:
            raise SAEFileError(f"concept {c.label!r} has no assigned latent, required by selection mode saemnesia")

    expected = {"encoder.weight": (cfg.num_latents, cfg.d_in), "encoder.bias": (cfg.num_latents,),
                "W_dec": (cfg.num_latents, cfg.d_in), "b_dec": (cfg.d_in,)}
    if C:
        if "concepts.latents" not in tensors:
            raise SAEFileError(f"missing tensor concepts.latents (the metadata lists {C} concepts)")
        table_shape = tensors["concepts.latents"][1]
        if len(table_shape) != 3:
            raise SAEFileError(f"concepts.latents must be [C, T, L], got shape {list(table_shape)}")
        expected.update(dict.fromkeys(TABLE_NAMES, (C, T, table_shape[2])))
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing:
        raise SAEFileError(f"missing tensor(s): {', '.join(sorted(missing))}")
    if extra:
        raise SAEFileError(f"unexpected tensor(s): {', '.join(sorted(extra))}")
    for name, shape in expected.items():
        dtype, actual = tensors[name]
        if tuple(actual) != shape:
            raise SAEFileError(f"tensor {name} has shape {list(actual)}, expected {list(shape)} "
                               f"(d_in={cfg.d_in}, num_latents={cfg.num_latents}, concepts={C}, buckets={T})")
        want = _FLOATS if name in WEIGHT_NAMES else (torch.int64,) if name == "concepts.latents" else (torch.float32,)
        if dtype not in want:
            raise SAEFileError(f"tensor {name} has dtype {dtype}, expected one of {[str(w) for w in want]}")


def _check_values(f: SAEFile) -> None:
    """Finite weights and statistics; table latents in range and consistent with the assigned latents."""
    for name, t in f.weights.items():
        if not bool(torch.isfinite(t).all()):
            raise SAEFileError(f"tensor {name} contains NaN or Inf")
    if f.tables is None:
        return
    n = f.config.num_latents
    latents = f.tables.latents
    if bool(((latents < -1) | (latents >= n)).any()):
        bad = latents[(latents < -1) | (latents >= n)][0].item()
        raise SAEFileError(f"concept table points at latent {bad}, but the SAE has {n} latents (−1 = padding)")
    for name, t in (("mean_acts", f.tables.mean_acts), ("thresholds", f.tables.thresholds)):
        if not bool(torch.isfinite(t).all()):
            raise SAEFileError(f"concept table {name} contains NaN or Inf")
    if f.selection_mode == "saemnesia":
        for c, concept in enumerate(f.concepts):
            if not bool((latents[c] == concept.latent).any(-1).all()):
                raise SAEFileError(f"concept {concept.label!r}: assigned latent {concept.latent} is missing from "
                                   "its table in some bucket")
