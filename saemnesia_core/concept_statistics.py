"""Concept statistics from SAeUron / SAEmnesia (DESIGN §5, §7.1): pickles `{concept: tensor[n_prompts, steps, n]}`
of spatially averaged latents over a DDIM run, and optional `class_params.pth` `{concept: {percentile, multiplier}}`,
turned into an SAE file's concepts, selected SAeUron-style. Pickles are read only through `pickles.load_pickle`, and
every shape, storage size and value is checked before any computation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import Tensor

from .concepts import Concept, build_tables, saeuron_scores, select_saeuron
from .pickles import load_pickle
from .sae_file import SAEFile, SAEFileError, validate_sae_file
from .sae_format import MAX_BUCKETS, is_clean_name
from .timesteps import bucket_index, ddim_timesteps, timestep_to_t

MAX_TABLE_VALUES = 2**28
"""Largest concepts × steps × latents an import of concept statistics may build (1 GiB of float32)."""
DEFAULT_PERCENTILE = 99.999
"""SAeUron's percentile for styles: about one latent of 20480 per timestep."""


def import_concept_statistics(sae_file: SAEFile, concept_stats_pkl, class_params_pth=None,
                              percentile: float = DEFAULT_PERCENTILE, group: str = "object",
                              num_train_timesteps: int = 1000, steps_offset: int = 1) -> SAEFile:
    """Replace the file's concepts by those of a SAeUron/SAEmnesia statistics pickle, selected SAeUron-style.

    Pickle steps index a DDIM run ("leading" spacing, step 0 = noisiest); each step maps to its model timestep,
    then t, then a bucket. There are as many buckets as steps, so the mapping is one-to-one. Per-concept
    percentile and multiplier come from class_params.pth when given (the multiplier becomes the default strength).
    """
    stats = _read_concept_stats(load_pickle(concept_stats_pkl), sae_file.config.num_latents, concept_stats_pkl)
    params = _read_class_params(load_pickle(class_params_pth), class_params_pth) if class_params_pth else {}
    labels = list(stats)
    steps = next(iter(stats.values())).shape[1]
    buckets = bucket_index(timestep_to_t(ddim_timesteps(steps, num_train_timesteps, steps_offset),
                                         num_train_timesteps), steps)
    if len(set(buckets.tolist())) != steps:
        raise SAEFileError(f"{concept_stats_pkl}: {steps} DDIM steps over {num_train_timesteps} timesteps do not "
                           "map one-to-one onto buckets")

    sums = torch.zeros(len(labels), steps, sae_file.config.num_latents)
    counts = torch.tensor([stats[label].shape[0] for label in labels], dtype=torch.float64)
    for c, label in enumerate(labels):
        sums[c, buckets] = stats[label].sum(0, dtype=torch.float32)
    percentiles = [params.get(label, {}).get("percentile", percentile) for label in labels]
    selection = select_saeuron(saeuron_scores(sums, counts), percentiles)
    tables = build_tables(selection, sums / counts.float()[:, None, None])
    concepts = [Concept(label, group, None, params.get(label, {}).get("multiplier", -1.0)) for label in labels]
    provenance = dict(sae_file.provenance)
    provenance["concept_statistics"] = {
        "file": Path(concept_stats_pkl).name, "class_params": Path(class_params_pth).name if class_params_pth else None,
        "steps": steps, "schedule": f"DDIM leading, {num_train_timesteps} timesteps, steps_offset {steps_offset}",
        "percentiles": dict(zip(labels, percentiles)), "prompts": dict(zip(labels, counts.long().tolist())),
    }
    result = dataclasses.replace(sae_file, concepts=concepts, tables=tables, num_buckets=steps,
                                 selection_mode="saeuron", provenance=provenance)
    validate_sae_file(result)
    return result


def _read_concept_stats(stats, num_latents: int, where) -> dict[str, Tensor]:
    """Shapes, storage and values checked before any computation: a tensor whose shape claims more values than its
    storage holds (an expanded or overlapping view) could make every later step allocate without bound."""
    if not isinstance(stats, dict) or not stats:
        raise SAEFileError(f"{where}: expected a non-empty dict {{concept: tensor[n_prompts, steps, n_latents]}}")
    steps = None
    for label, t in stats.items():
        if not isinstance(label, str) or not is_clean_name(label):
            raise SAEFileError(f"{where}: concept names must be non-empty strings without spaces around them or "
                               f"control characters, got {label!r}")
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point() or min(t.shape[:2]) == 0:
            raise SAEFileError(f"{where}: {label!r} must be a float tensor [n_prompts ≥ 1, steps ≥ 1, n_latents]")
        if t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise SAEFileError(f"{where}: {label!r} claims shape {list(t.shape)} but its storage holds fewer values "
                               "(an expanded or overlapping view)")
        if t.shape[2] != num_latents:
            raise SAEFileError(f"{where}: {label!r} has {t.shape[2]} latents, the SAE has {num_latents}")
        if steps is not None and t.shape[1] != steps:
            raise SAEFileError(f"{where}: {label!r} has {t.shape[1]} steps, others have {steps}")
        steps = t.shape[1]
        if steps > MAX_BUCKETS:
            raise SAEFileError(f"{where}: {steps} steps; at most {MAX_BUCKETS} are supported")
        if not bool(torch.isfinite(t).all()):
            raise SAEFileError(f"{where}: {label!r} contains NaN or Inf")
    if len(stats) * steps * num_latents > MAX_TABLE_VALUES:
        raise SAEFileError(f"{where}: {len(stats)} concepts × {steps} steps × {num_latents} latents exceed the "
                           f"{MAX_TABLE_VALUES} values an import may build")
    return stats


def _read_class_params(params, where) -> dict[str, dict[str, float]]:
    if not isinstance(params, dict):
        raise SAEFileError(f"{where}: expected {{concept: {{'percentile': p, 'multiplier': m}}}}")
    out = {}
    for label, entry in params.items():
        if not isinstance(entry, dict):
            raise SAEFileError(f"{where}: {label!r}: expected {{'percentile': p, 'multiplier': m}}, got {entry!r}")
        try:
            values = {key: float(entry[key]) for key in ("percentile", "multiplier") if key in entry}
        except (TypeError, ValueError, RuntimeError) as e:
            raise SAEFileError(f"{where}: {label!r}: percentile and multiplier must be numbers ({e})") from e
        if not all(map(math.isfinite, values.values())) or not 0 <= values.get("percentile", 50) <= 100:
            raise SAEFileError(f"{where}: {label!r}: bad percentile or multiplier {values}")
        out[label] = values
    return out
