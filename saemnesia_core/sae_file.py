"""The SAE file (DESIGN §7): one .safetensors holding the weights, the concept tables and a JSON header.

Tensors: `encoder.weight` [n, d], `encoder.bias` [n], `W_dec` [n, d], `b_dec` [d] (sparsify names, any float
dtype), SAEParate's `pre_encoder.0.weight` [d, d] and `pre_encoder.0.bias` [d] when the SAE has a pre-encoder, and,
when the file has concepts, `concepts.latents` int64, `concepts.mean_acts` and `concepts.thresholds` float32, each
[C, T, L]; `latents.mean_acts` float32 [n] when the checkpoint came with each latent's mean activation (sdxl-unbox's
and the Flux SAE's `mean.pt`); `concepts.directions` float32 [C, T, d] when the file holds each concept's mean
difference from its absence (shift mode, DESIGN §6.9). The safetensors string metadata holds one key, "saemnesia", whose JSON value carries
everything else, so the concept list is readable from the header alone.

Format version 2 adds what an SAE reads (`reads`: the block's output or its update; `tokens`: which of the block's
tokens), the pre-encoder, the strength unit and the latent means. A file that uses none of them is written as
version 1, which every earlier build reads the same way; a build that knows only version 1 refuses version 2
instead of misreading it. Version 3 adds the directions, and only a file that holds them is written as version 3.

Every problem with a file raises `SAEFileError` with a message that says what is wrong.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .concepts import (
    MAX_CALIBRATION,
    MEASURED_KEYS,
    Concept,
    ConceptTables,
)
from .files import atomic_path
from .sae import SAEConfig, TopKSAE
from .sae_format import (
    FORMAT_VERSION,
    DIRECTIONS,
    LATENT_MEANS,
    METADATA_KEY,
    TABLE_NAMES,
    TOKEN_LAYOUTS,
    VERSIONS,
    check_structure,
    check_values,
    default_tokens,
    is_calibration,
    is_erasure_record,
    is_int,
    weight_names,
)
from .safetensors_index import MAX_HEADER_BYTES, SAEFileError, read_index


@dataclass(kw_only=True)
class SAEDescription:
    """What an SAE file says about its SAE besides the tensors: the fields SAEHeader and SAEFile share."""

    config: SAEConfig
    concepts: list[Concept]
    hookpoint: str
    """diffusers-style module path, e.g. "unet.up_blocks.1.attentions.1"."""
    model_family: str
    """Base model family: "sd15", "sdxl", "toy", … ("unknown" when an import could not tell)."""
    num_buckets: int
    supervised: bool
    """Trained with SAEmnesia's concept supervision."""
    selection_mode: str = "saemnesia"
    provenance: dict = field(default_factory=dict)
    """Free-form JSON: how the SAE was trained or where it was imported from."""
    reads: str = "output"
    """SIGNALS: the block's output, or its update (output − input)."""
    tokens: str = ""
    """TOKEN_LAYOUTS; empty: default_tokens(hookpoint)."""
    strength_unit: str = "mean"
    """STRENGTH_UNITS."""

    def __post_init__(self):
        if not self.tokens and isinstance(self.hookpoint, str):
            self.tokens = default_tokens(self.hookpoint)

    @property
    def reads_text(self) -> str:
        """What the SAE reads, said for people (inspect, the Load SAE tooltip, the concept route)."""
        signal = "the block's update (output − input)" if self.reads == "update" else "the block's output"
        prep = [p for p, on in (("standardised tokens (input_unit_norm)", self.config.input_unit_norm),
                                ("a GELU pre-encoder", self.config.pre_encoder)) if on]
        return f"{signal}, {TOKEN_LAYOUTS.get(self.tokens, self.tokens)}" + (f"; {', '.join(prep)}" if prep else "")


def description_of(source: SAEDescription) -> dict:
    """The shared fields of a header or file, as keyword arguments for the other."""
    return {f.name: getattr(source, f.name) for f in fields(SAEDescription)}


@dataclass(kw_only=True)
class SAEHeader(SAEDescription):
    """Everything in a file except the tensors' values: what `read_header` returns."""

    dtype: torch.dtype = torch.float32
    """dtype of the weights as stored."""
    has_latent_means: bool = False
    """The file holds each latent's mean activation (LATENT_MEANS)."""
    has_directions: bool = False
    """The file holds each concept's mean difference from its absence (DIRECTIONS): shift mode can use it."""
    format_version: int = FORMAT_VERSION


@dataclass(kw_only=True)
class SAEFile(SAEDescription):
    """One SAE with its concepts, in memory: what save_sae_file writes and load_sae_file returns."""

    weights: dict[str, Tensor]
    """The four sparsify-named tensors."""
    tables: ConceptTables | None = None
    """None exactly when there are no concepts."""
    latent_means: Tensor | None = None
    """[n] float32 each latent's mean activation, as the checkpoint's authors measured it (their unit of a
    latent's strength), or None."""

    @property
    def header(self) -> SAEHeader:
        dtype = self.weights["encoder.weight"].dtype if "encoder.weight" in self.weights else torch.float32
        return SAEHeader(**description_of(self), dtype=dtype, has_latent_means=self.latent_means is not None,
                         has_directions=self.tables is not None and self.tables.directions is not None,
                         format_version=_version(self))

    @property
    def concept_tables(self) -> ConceptTables:
        """The tables, or empty ones for a file without concepts (an eraser of it edits nothing)."""
        return self.tables if self.tables is not None else ConceptTables.empty(self.num_buckets)

    def build_sae(self, device=None, dtype=None) -> TopKSAE:
        """The TopKSAE module with these weights (stored dtype unless one is given; shares their memory if
        unchanged)."""
        sae = TopKSAE(self.config, device="meta")
        sae.load_state_dict(self.weights, assign=True)
        return sae.to(device=device, dtype=dtype or self.weights["encoder.weight"].dtype)


# ---------------------------------------------------------------------------------------------- writing


def validate_sae_file(sae_file: SAEFile) -> None:
    """Raise SAEFileError unless `sae_file` would make a valid file (what save and load both check)."""
    check_structure(sae_file.header, {name: (t.dtype, tuple(t.shape)) for name, t in _tensors(sae_file).items()})
    check_values(sae_file)
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
    if sae_file.latent_means is not None:
        tensors[LATENT_MEANS] = sae_file.latent_means
    if sae_file.tables is not None and sae_file.tables.directions is not None:
        tensors[DIRECTIONS] = sae_file.tables.directions
    return tensors


def _version(f: SAEFile) -> int:
    """The lowest version that says everything the file holds (so earlier builds read what they can): 3 with
    directions, 1 for a file that says nothing version 1 could not, else 2."""
    if f.tables is not None and f.tables.directions is not None:
        return 3
    plain = (f.reads == "output" and f.tokens == default_tokens(f.hookpoint) and f.strength_unit == "mean"
             and not f.config.pre_encoder and f.latent_means is None)
    return 1 if plain else 2


def _metadata_json(h: SAEHeader) -> str:
    v2 = {"reads": h.reads, "tokens": h.tokens, "strength_unit": h.strength_unit, "pre_encoder": h.config.pre_encoder}
    meta = {
        "format_version": h.format_version,
        "d_in": h.config.d_in, "num_latents": h.config.num_latents, "k": h.config.k,
        "activation": "topk", "input_unit_norm": h.config.input_unit_norm, **(v2 if h.format_version > 1 else {}),
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
    metadata, entries = read_index(path)
    if METADATA_KEY not in metadata:
        raise SAEFileError(f"{path}: a safetensors file without SAEmnesia metadata; import it with "
                           "`saemnesia convert` (importers.load_any) instead")
    with _naming(path):
        header = _parse_metadata(metadata[METADATA_KEY], entries.get("encoder.weight", (None,))[0],
                                 LATENT_MEANS in entries, DIRECTIONS in entries)
        check_structure(header, entries)
    return header


def is_sae_file(path) -> bool:
    """Whether a safetensors file carries our metadata (a sparsify sae.safetensors does not)."""
    return METADATA_KEY in read_index(path)[0]


def load_sae_file(path) -> SAEFile:
    """Read and validate a whole file (shapes, dtypes, finite values, latent ids in range)."""
    h = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # the safetensors reader's own errors (SafetensorError, OSError, …)
        raise SAEFileError(f"{path}: cannot read tensors: {e}") from e
    tables = ConceptTables(*(tensors[n] for n in TABLE_NAMES), tensors.get(DIRECTIONS)) if h.concepts else None
    sae_file = SAEFile(**description_of(h), weights={n: tensors[n] for n in weight_names(h.config)}, tables=tables,
                       latent_means=tensors.get(LATENT_MEANS))
    with _naming(path):
        check_values(sae_file)
    return sae_file


@contextmanager
def _naming(path):
    """Prefix the file's path to SAEFileErrors raised inside."""
    try:
        yield
    except SAEFileError as e:
        raise SAEFileError(f"{path}: {e}") from None


def _parse_metadata(text: str, dtype: torch.dtype | None, has_latent_means: bool,
                    has_directions: bool = False) -> SAEHeader:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SAEFileError(f"metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise SAEFileError("metadata is not a JSON object")
    get = _Getter(meta, "metadata")
    version = get("format_version", int)
    if version not in VERSIONS:
        raise SAEFileError(f"unknown format version {version} (this build reads versions "
                           f"{', '.join(map(str, VERSIONS))})")
    if get("activation", str) != "topk":
        raise SAEFileError(f"unsupported activation {meta['activation']!r} (only 'topk')")
    v2 = {"reads": get("reads", str), "tokens": get("tokens", str), "strength_unit": get("strength_unit", str),
          "pre_encoder": get("pre_encoder", bool)} if version > 1 else {}
    try:
        config = SAEConfig(get("d_in", int), get("num_latents", int), get("k", int), get("input_unit_norm", bool),
                           v2.pop("pre_encoder", False))
    except ValueError as e:
        raise SAEFileError(f"metadata: {e}") from e
    concepts = [_parse_concept(c, i) for i, c in enumerate(get("concepts", list))]
    return SAEHeader(config=config, concepts=concepts, hookpoint=get("hookpoint", str),
                     model_family=get("model_family", str), num_buckets=get("num_buckets", int),
                     supervised=get("supervised", bool), selection_mode=get("selection_mode", str),
                     provenance=get("provenance", dict), **v2, dtype=dtype if dtype is not None else torch.float32,
                     has_latent_means=has_latent_means, has_directions=has_directions, format_version=version)


def _parse_concept(entry, i: int) -> Concept:
    if not isinstance(entry, dict):
        raise SAEFileError(f"metadata: concepts[{i}] is not an object")
    get = _Getter(entry, f"concepts[{i}]")
    latent = entry.get("latent")
    if latent is not None and not is_int(latent):
        raise SAEFileError(f"concepts[{i}]: latent must be an int or null, got {latent!r}")
    try:
        strength = float(get("default_strength", float))
    except OverflowError as e:
        raise SAEFileError(f"concepts[{i}]: default_strength out of range") from e
    erasure = entry.get("erasure")
    if erasure is not None and not is_erasure_record(erasure):
        raise SAEFileError(f"concepts[{i}]: erasure must be {{{', '.join(MEASURED_KEYS)}}} with counts from 0 to "
                           f"images, got {erasure!r}")
    calibration = entry.get("calibration")
    if calibration is not None and not is_calibration(calibration):
        raise SAEFileError(f"concepts[{i}]: calibration must be a number in (0, {MAX_CALIBRATION:g}], got "
                           f"{calibration!r}")
    return Concept(get("label", str), get("group", str), latent, strength, erasure,
                   None if calibration is None else float(calibration))


class _Getter:
    """meta[key], checked to be of the given JSON type, with a message naming the key."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def __call__(self, key: str, kind: type):
        if key not in self.d:
            raise SAEFileError(f"{self.where}: missing key {key!r}")
        value = self.d[key]
        if kind is int:
            ok = is_int(value)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise SAEFileError(f"{self.where}: {key!r} must be {kind.__name__}, got {value!r}")
        return value
