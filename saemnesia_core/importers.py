"""Bring SAEs and concept statistics from other layouts into our SAE file (DESIGN §7.1).

- our own .safetensors file;
- a sparsify / SAeUron folder: `cfg.json` + `sae.safetensors`, given as the folder itself or as a parent holding
  one folder per hookpoint; `d_model` / `n_dirs_local` accepted for `d_in` / `num_latents`;
- SAEmnesia's root-level checkpoint (the same files without a hookpoint folder) and its `state_dict.pth`
  variant (OpenAI / sdxl-unbox key names: pre_bias, latent_bias, decoder.weight [d, n]);
- SAeUron / SAEmnesia concept statistics: a pickle `{concept: tensor[n_prompts, steps, n]}` of spatially
  averaged latents over a DDIM run, plus optional `class_params.pth` `{concept: {percentile, multiplier}}`.

Pickles are never given to `pickle.load`: torch.save archives go through `torch.load(weights_only=True)`
and plain pickles through an unpickler that only knows how to rebuild tensors.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .concepts import Concept, build_tables, saeuron_scores, select_saeuron
from .sae import SAEConfig
from .sae_file import (MAX_BUCKETS, WEIGHT_NAMES, SAEFile, SAEFileError, is_clean_name, is_sae_file, load_sae_file,
                       validate_sae_file)
from .timesteps import bucket_index, ddim_timesteps, timestep_to_t

CONFIG_FILES = ("cfg.json", "config.json")
WEIGHT_FILES = ("sae.safetensors", "state_dict.pth")
"""A checkpoint folder holds one config and one weights file of these names (sparsify / SAeUron: cfg.json +
sae.safetensors; SAEmnesia: config.json + state_dict.pth). The importer and Load SAE's listing both use them."""
MAX_WIDTH, MAX_LATENTS = 2**16, 2**24
"""Largest d_in and num_latents a checkpoint config may ask for (SD-size SAEs: 1280 and 20480; Flux: 3072 and
about 10^5)."""
MAX_TABLE_VALUES = 2**28
"""Largest concepts × steps × latents an import of concept statistics may build (1 GiB of float32)."""
DEFAULT_PERCENTILE = 99.999
"""SAeUron's percentile for styles: about one latent of 20480 per timestep."""

EXAMPLE_HOOKPOINT = "unet.up_blocks.1.attentions.1"
_HOOKPOINT = re.compile(r"^(unet\.|transformer\.)?(down_blocks|mid_block|up_blocks|transformer_blocks)\b")


def load_any(path, hookpoint: str | None = None, model_family: str | None = None) -> SAEFile:
    """Our file, or a checkpoint folder of any layout above, as an SAEFile.

    `hookpoint` picks a sub-folder of a multi-hookpoint folder and names the hookpoint when the folder does not;
    `hookpoint` and `model_family`, when given, override what the source says.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors" and is_sae_file(path):
        sae_file = load_sae_file(path)
    elif path.is_file() and path.name in WEIGHT_FILES:
        sae_file = import_checkpoint_folder(path.parent, hookpoint)
    elif path.is_dir():
        sae_file = import_checkpoint_folder(_checkpoint_folder(path, hookpoint), hookpoint)
    elif path.exists():
        raise SAEFileError(f"{path}: not an SAE file nor a checkpoint folder (expected a .safetensors with "
                           f"SAEmnesia metadata, or a folder with {' or '.join(CONFIG_FILES)})")
    else:
        raise SAEFileError(f"{path}: no such file or folder")
    overrides = {k: v for k, v in (("hookpoint", hookpoint and _diffusers_hookpoint(hookpoint)),
                                   ("model_family", model_family)) if v}
    return dataclasses.replace(sae_file, **overrides) if overrides else sae_file


def is_checkpoint_folder(file_names) -> bool:
    """Whether a folder holding these file names is an importable checkpoint folder (a config and weights)."""
    names = set(file_names)
    return bool(names & set(CONFIG_FILES)) and bool(names & set(WEIGHT_FILES))


def _config_file(folder: Path) -> Path | None:
    return next((folder / name for name in CONFIG_FILES if (folder / name).is_file()), None)


def _checkpoint_folder(path: Path, hookpoint: str | None) -> Path:
    """The folder itself if it holds a config, else its one (or the named) hookpoint sub-folder."""
    if _config_file(path):
        return path
    subs = sorted(d for d in path.iterdir() if d.is_dir() and _config_file(d))
    if hookpoint:
        named = [d for d in subs if _normalize_hookpoint(d.name) == _normalize_hookpoint(hookpoint)]
        if named:
            return named[0]
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise SAEFileError(f"{path}: no {' or '.join(CONFIG_FILES)} in the folder or its sub-folders")
    raise SAEFileError(f"{path} holds {len(subs)} hookpoints ({', '.join(d.name for d in subs)}); "
                       "choose one (hookpoint=… / --hookpoint)")


def _normalize_hookpoint(name: str) -> str:
    """diffusers style with the `unet.` prefix, e.g. up_blocks.1.attentions.1 -> unet.up_blocks.1.attentions.1."""
    if name.startswith(("down_blocks", "mid_block", "up_blocks")):
        return "unet." + name
    return name


def _diffusers_hookpoint(name: str) -> str:
    if not _HOOKPOINT.match(name):
        raise SAEFileError(f"hookpoint {name!r} is not a diffusers-style module path (e.g. {EXAMPLE_HOOKPOINT})")
    return _normalize_hookpoint(name)


def import_checkpoint_folder(folder, hookpoint: str | None = None) -> SAEFile:
    """A sparsify / SAeUron / SAEmnesia folder (cfg.json or config.json + sae.safetensors or state_dict.pth)."""
    folder = Path(folder)
    cfg_path = _config_file(folder)
    if cfg_path is None:
        raise SAEFileError(f"{folder}: no {' or '.join(CONFIG_FILES)}")
    cfg = _read_json(cfg_path)
    config = _config_from_checkpoint(cfg, cfg_path)
    weight_file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weight_file is not None:
        _check_weights_can_hold(config, weight_file)
    if (folder / "sae.safetensors").is_file():
        source = "sparsify"
        try:
            weights = load_file(str(folder / "sae.safetensors"))
        except Exception as e:  # the safetensors reader's own errors
            raise SAEFileError(f"{folder / 'sae.safetensors'}: cannot read: {e}") from e
    elif (folder / "state_dict.pth").is_file():
        source = "state_dict.pth"
        weights = _remap_openai_state_dict(load_pickle(folder / "state_dict.pth"), folder / "state_dict.pth")
    else:
        raise SAEFileError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")
    if set(weights) - set(WEIGHT_NAMES):
        raise SAEFileError(f"{folder}: unsupported tensors {sorted(set(weights) - set(WEIGHT_NAMES))} "
                           "(skip connections and transcoders are not TopK SAEs we can apply)")
    name = hookpoint or cfg.get("hookpoint") or folder.resolve().name
    if not hookpoint and not (isinstance(name, str) and _HOOKPOINT.match(name)):
        raise SAEFileError(f"{folder}: cannot tell the hookpoint from the folder name {folder.resolve().name!r}; "
                           f"give it (hookpoint=… / --hookpoint {EXAMPLE_HOOKPOINT})")
    sae_file = SAEFile(config=config, weights=weights, concepts=[], hookpoint=_diffusers_hookpoint(name),
                       model_family="unknown", num_buckets=1, supervised=False,
                       provenance={"imported_from": {"format": source, "folder": folder.resolve().name, "cfg": cfg}})
    try:
        validate_sae_file(sae_file)
    except SAEFileError as e:
        raise SAEFileError(f"{folder}: {e}") from None
    return sae_file


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SAEFileError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(value, dict):
        raise SAEFileError(f"{path}: not a JSON object")
    return value


def _config_from_checkpoint(cfg: dict, where: Path) -> SAEConfig:
    """sparsify's cfg.json, SAEmnesia's aliases (d_model, n_dirs_local) and num_latents = 0 (expansion factor).
    Every field's type and range is checked before any arithmetic."""
    if cfg.get("activation", "topk") != "topk":
        raise SAEFileError(f"{where}: activation {cfg['activation']!r} is not supported (only topk)")
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise SAEFileError(f"{where}: skip connections and transcoders are not supported")

    def field(names: tuple[str, ...], limit: int, required: bool = True) -> int | None:
        value = next((cfg[n] for n in names if cfg.get(n)), None)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise SAEFileError(f"{where}: {' or '.join(names)} must be an int from 1 to {limit}, got {value!r}; "
                               "needs d_in (or d_model), num_latents (or n_dirs_local, or expansion_factor) and k")
        return value

    d_in = field(("d_in", "d_model"), MAX_WIDTH)
    num_latents = field(("num_latents", "n_dirs_local"), MAX_LATENTS, required=False)
    if num_latents is None:
        num_latents = d_in * field(("expansion_factor",), MAX_LATENTS // d_in or 1)
    unit_norm = cfg.get("input_unit_norm", False)
    if not isinstance(unit_norm, bool):
        raise SAEFileError(f"{where}: input_unit_norm must be true or false, got {unit_norm!r}")
    return SAEConfig(d_in, num_latents, field(("k",), num_latents), unit_norm)


def _check_weights_can_hold(config: SAEConfig, weights: Path) -> None:
    """Refuse a config that the weights file is too small to hold (encoder and decoder at 2 bytes a value at
    least), before anything of that size is read or built."""
    needed = 2 * config.num_latents * config.d_in * 2
    if weights.stat().st_size < needed:
        raise SAEFileError(f"{weights}: the config asks for {config.num_latents} latents × {config.d_in} dims, which "
                           f"need at least {needed} bytes, but the file has {weights.stat().st_size}")


def _remap_openai_state_dict(sd, where: Path) -> dict[str, Tensor]:
    """OpenAI / sdxl-unbox names -> sparsify names (decoder.weight [d, n] is transposed to W_dec [n, d])."""
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise SAEFileError(f"{where}: not a state dict of named tensors")
    rename = {"pre_bias": "b_dec", "latent_bias": "encoder.bias"}
    out = {}
    for key, value in sd.items():
        if key == "stats_last_nonzero":
            continue
        if key == "decoder.weight":
            out["W_dec"] = value.T.contiguous()
        elif key in rename or key in WEIGHT_NAMES:
            out[rename.get(key, key)] = value
        else:
            raise SAEFileError(f"{where}: unexpected key {key!r} in state dict")
    missing = set(WEIGHT_NAMES) - set(out)
    if missing:
        raise SAEFileError(f"{where}: missing key(s) for {sorted(missing)}")
    return out


# ---------------------------------------------------------------------------------------------- pickles


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors, dicts and numbers; any other global (os.system, …) is refused before it can run."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def _storage_from_bytes(data: bytes):
    """A pickled tensor's storage is itself a torch.save archive; read it the safe way too."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def load_pickle(path):
    """A torch.save archive or a plain pickle of tensors, loaded without running code from the file."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return torch.load(path, weights_only=True, map_location="cpu")
        with open(path, "rb") as f:
            return _TensorUnpickler(f).load()
    except Exception as e:  # unpickling can fail in many ways; all of them mean "not a file we accept"
        reason = " ".join(str(e).split())[:300]  # torch's loader writes paragraphs: one line is enough
        raise SAEFileError(f"{path}: cannot load safely (only tensors, dicts and numbers are accepted): "
                           f"{type(e).__name__}: {reason}") from e


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
