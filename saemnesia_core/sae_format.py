"""What a valid SAE file is (DESIGN §7): the format's names and limits, and the checks its header and tensors pass
before anything uses them. `sae_file` reads and writes the file; every problem raises `SAEFileError` with a message
that says what is wrong."""

from __future__ import annotations

import unicodedata

import torch

from .concepts import MAX_CALIBRATION, MAX_STRENGTH, MEASURED_KEYS, latent_ref
from .sae import SAEConfig
from .safetensors_index import SAEFileError

FORMAT_VERSION = 3
VERSIONS = (1, 2, 3)
METADATA_KEY = "saemnesia"
MAX_BUCKETS = 10_000
"""Timestep buckets a file may have: the papers use 50 or 100; the tables and the eraser grow with the count."""

SELECTION_MODES = ("saemnesia", "saeuron")
"""saemnesia: each concept's assigned latent in every bucket; saeuron: latents selected by score per bucket."""

WEIGHT_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
PRE_ENCODER_NAMES = ("pre_encoder.0.weight", "pre_encoder.0.bias")
TABLE_NAMES = ("concepts.latents", "concepts.mean_acts", "concepts.thresholds")
LATENT_MEANS = "latents.mean_acts"
DIRECTIONS = "concepts.directions"  # optional [C, T, d] float32: shift mode's mean differences (format version 3)

SIGNALS = ("output", "update")
"""What an SAE reads at its block: the output, or the update (output − input) that sdxl-unbox, the Flux SAE and
SAEmnesia's `residual_sae` read."""
TOKEN_LAYOUTS = {
    "block": "every token of the block's output: a UNet block's positions (channels last), a text layer's tokens",
    "image": "the image tokens of a DiT block",
    "joined": "a Flux single-stream block's text and image tokens together (the edit reaches the image part)",
    "text": "the text tokens of a DiT block",
}
"""Which of the hooked block's tokens the SAE was trained on."""
STRENGTH_UNITS = ("mean", "beta")
"""What a strength γ multiplies: the concept's mean activation, or SAEmnesia's β = ‖z‖₂ / ‖W_dec[i]‖₂ (use_beta)."""


def default_tokens(hookpoint: str) -> str:
    """What an SAE reads when its file does not say (version 1): a DiT block's image tokens, else the whole output."""
    return "image" if hookpoint.startswith("transformer.") else "block"


def weight_names(config: SAEConfig) -> tuple[str, ...]:
    """The SAE's parameter tensors in a file with this config."""
    return WEIGHT_NAMES + (PRE_ENCODER_NAMES if config.pre_encoder else ())

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def is_clean_name(text: str) -> bool:
    """A label or group name people can read and type: not empty, no spaces around it, no control or format
    characters (ANSI escapes, zero-width or direction marks)."""
    return bool(text) and text == text.strip() and not any(unicodedata.category(ch).startswith("C") for ch in text)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_calibration(value) -> bool:
    """κ_c (Concept.calibration): a number in (0, MAX_CALIBRATION] (NaN and infinities fail)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_CALIBRATION


def is_erasure_record(record) -> bool:
    """The measured erasure of a concept (Concept.erasure): its keys, a finite strength, consistent counts."""
    if not isinstance(record, dict) or set(record) != set(MEASURED_KEYS):
        return False
    images = record["images"]
    counts = [record[k] for k in ("seen_without", "gone", "other_kept")]
    return (isinstance(record["strength"], (int, float)) and not isinstance(record["strength"], bool)
            and abs(record["strength"]) <= MAX_STRENGTH and is_int(images) and 0 < images <= 10_000
            and all(is_int(c) and 0 <= c <= images for c in counts))


# ---------------------------------------------------------------------------------------------- validation


def check_structure(h, tensors: dict[str, tuple[torch.dtype, tuple]]) -> None:
    """An SAEHeader's metadata fields and tensor names/dtypes/shapes agree with each other (no tensor values needed)."""
    cfg, C, T = h.config, len(h.concepts), h.num_buckets
    for name in ("hookpoint", "model_family"):
        if not isinstance(getattr(h, name), str) or not is_clean_name(getattr(h, name)):
            raise SAEFileError(f"{name} must be a non-empty string without spaces around it or control characters, "
                               f"got {getattr(h, name)!r}")
    if not is_int(T) or not 1 <= T <= MAX_BUCKETS:
        raise SAEFileError(f"num_buckets must be an int from 1 to {MAX_BUCKETS}, got {T!r}")
    if not isinstance(h.supervised, bool) or not isinstance(h.provenance, dict):
        raise SAEFileError("supervised must be a bool and provenance a dict")
    if h.selection_mode not in SELECTION_MODES:
        raise SAEFileError(f"unknown selection mode {h.selection_mode!r} (known: {', '.join(SELECTION_MODES)})")
    for name, known in (("reads", SIGNALS), ("tokens", tuple(TOKEN_LAYOUTS)), ("strength_unit", STRENGTH_UNITS)):
        if getattr(h, name) not in known:
            raise SAEFileError(f"unknown {name} {getattr(h, name)!r} (known: {', '.join(known)})")
    labels = [c.label for c in h.concepts]
    refs = [label for label in labels if isinstance(label, str) and latent_ref(label) is not None]
    if refs:
        raise SAEFileError(f"concept labels {refs} look like latent references (#N name latents, not concepts)")
    if any(not isinstance(c.label, str) or not isinstance(c.group, str) for c in h.concepts):
        raise SAEFileError("concept labels and groups must be strings")
    for text in (*labels, *(c.group for c in h.concepts)):
        if not is_clean_name(text):
            raise SAEFileError(f"concept label or group {text!r} is empty, has spaces around it or control characters")
    if len(set(labels)) != len(labels):
        raise SAEFileError(f"concept labels must be unique, got {labels}")
    for c in h.concepts:
        if c.erasure is not None and not is_erasure_record(c.erasure):
            raise SAEFileError(f"concept {c.label!r}: erasure record {c.erasure!r} is not {list(MEASURED_KEYS)} "
                               "with counts from 0 to images")
        if c.calibration is not None and not is_calibration(c.calibration):
            raise SAEFileError(f"concept {c.label!r}: calibration {c.calibration!r} is not a number in "
                               f"(0, {MAX_CALIBRATION:g}]")
        if c.latent is not None and not (is_int(c.latent) and 0 <= c.latent < cfg.num_latents):
            raise SAEFileError(f"concept {c.label!r} points at latent {c.latent}, but the SAE has "
                               f"{cfg.num_latents} latents")
        if not isinstance(c.default_strength, (int, float)) or not abs(c.default_strength) <= MAX_STRENGTH:
            raise SAEFileError(f"concept {c.label!r}: default strength {c.default_strength} is outside "
                               f"[-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]")
        if h.selection_mode == "saemnesia" and c.latent is None:
            raise SAEFileError(f"concept {c.label!r} has no assigned latent, required by selection mode saemnesia")

    expected = {"encoder.weight": (cfg.num_latents, cfg.d_in), "encoder.bias": (cfg.num_latents,),
                "W_dec": (cfg.num_latents, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.pre_encoder:
        expected.update(zip(PRE_ENCODER_NAMES, ((cfg.d_in, cfg.d_in), (cfg.d_in,))))
    if h.has_latent_means:
        expected[LATENT_MEANS] = (cfg.num_latents,)
    if C:
        if "concepts.latents" not in tensors:
            raise SAEFileError(f"missing tensor concepts.latents (the metadata lists {C} concepts)")
        table_shape = tensors["concepts.latents"][1]
        if len(table_shape) != 3:
            raise SAEFileError(f"concepts.latents must be [C, T, L], got shape {list(table_shape)}")
        expected.update(dict.fromkeys(TABLE_NAMES, (C, T, table_shape[2])))
        if DIRECTIONS in tensors:
            expected[DIRECTIONS] = (C, T, cfg.d_in)
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
        want = _FLOATS if name in weight_names(cfg) else (torch.int64,) if name == "concepts.latents" else \
            (torch.float32,)
        if dtype not in want:
            raise SAEFileError(f"tensor {name} has dtype {dtype}, expected one of {[str(w) for w in want]}")


def check_values(f) -> None:
    """An SAEFile's finite weights and statistics; table latents in range and consistent with the assigned latents."""
    for name, t in f.weights.items():
        if not bool(torch.isfinite(t).all()):
            raise SAEFileError(f"tensor {name} contains NaN or Inf")
    if f.latent_means is not None and not bool((torch.isfinite(f.latent_means) & (f.latent_means >= 0)).all()):
        raise SAEFileError(f"{LATENT_MEANS} must hold finite, non-negative mean activations")
    if f.tables is None:
        return
    n = f.config.num_latents
    latents = f.tables.latents
    if bool(((latents < -1) | (latents >= n)).any()):
        bad = latents[(latents < -1) | (latents >= n)][0].item()
        raise SAEFileError(f"concept table points at latent {bad}, but the SAE has {n} latents (−1 = padding)")
    for name, t in (("mean_acts", f.tables.mean_acts), ("thresholds", f.tables.thresholds),
                    ("directions", f.tables.directions)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise SAEFileError(f"concept table {name} contains NaN or Inf")
    if f.selection_mode == "saemnesia":
        for c, concept in enumerate(f.concepts):
            if not bool((latents[c] == concept.latent).any(-1).all()):
                raise SAEFileError(f"concept {concept.label!r}: assigned latent {concept.latent} is missing from "
                                   "its table in some bucket")
