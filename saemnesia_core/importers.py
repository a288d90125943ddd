"""Bring SAEs from other layouts into our SAE file (DESIGN §7.1), with what each reads.

Layouts, told apart by the files a folder holds (LAYOUTS; `layout=` / `--layout` overrides):
- our own .safetensors file;
- "sparsify": `cfg.json` + `sae.safetensors` — sparsify, SAeUron, SAEmnesia, and SAEParate (its `cfg.json` has
  `use_pre_encoder_gelu`, its weights `pre_encoder.0.*`); given as the folder itself or as a parent holding one folder
  per hookpoint; `d_model` / `n_dirs_local` accepted for `d_in` / `num_latents`;
- "openai": `config.json` (or `cfg.json`) + `state_dict.pth` with OpenAI / sdxl-unbox key names (pre_bias,
  latent_bias, decoder.weight [d, n]) — SAEmnesia's state-dict checkpoint;
- "unbox": the same plus `mean.pt` — sdxl-unbox's SDXL SAEs (folders `<hookpoint>_k10_hidden5120_…/final/`) and the
  Flux SAE `antoniomari/SAE_flux_18`: they read the block's update, and `mean.pt` (each latent's mean activation, the
  authors' unit of a latent's strength) is kept in the file;
- "hub-topk": `config.json` (`features`, `pages`, `k`) + `model.safetensors` (encoder.weight, encoder.bias,
  decoder.weight [d, n], bias) — TopK SAEs saved with PyTorchModelHubMixin (Krea / finebooru Flux SAEs); folders named
  like `cc3m-transformer_blocks.18-1` (stream 1: image tokens, 0: text tokens) or `…-single_transformer_blocks.9`
  (joined text and image tokens).
What a layout cannot tell — the block, the model, SAEmnesia's `residual_sae` (reads the update) and `use_beta` (the
beta strength unit) — comes from the caller (`hookpoint`, `model_family`, `reads`, `strength_unit`), and an import
that needs the block and cannot find it in the folder's name says so. Concept statistics (SAeUron / SAEmnesia
pickles) are imported by `concept_statistics`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .pickles import load_pickle
from .sae import SAEConfig
from .sae_file import (
    SAEFile,
    SAEFileError,
    SAEHeader,
    is_sae_file,
    load_sae_file,
    validate_sae_file,
)
from .sae_format import (
    SIGNALS,
    STRENGTH_UNITS,
    TOKEN_LAYOUTS,
    weight_names,
)

CONFIG_FILES = ("cfg.json", "config.json")
WEIGHT_FILES = ("sae.safetensors", "state_dict.pth", "model.safetensors")
"""A checkpoint folder holds one config and one weights file of these names. The importer and Load SAE's listing both
use them."""
LAYOUTS = {
    "sparsify": "cfg.json + sae.safetensors (sparsify, SAeUron, SAEmnesia, SAEParate)",
    "openai": "config.json + state_dict.pth (SAEmnesia's state-dict checkpoint)",
    "unbox": "config.json + state_dict.pth + mean.pt (sdxl-unbox's SDXL SAEs, the Flux SAE SAE_flux_18)",
    "hub-topk": "config.json (features, pages, k) + model.safetensors (Krea / finebooru Flux SAEs)",
}
WEIGHTS_OF = {"sparsify": "sae.safetensors", "openai": "state_dict.pth", "unbox": "state_dict.pth",
              "hub-topk": "model.safetensors"}
READS = {"sparsify": "output", "openai": "output", "unbox": "update", "hub-topk": "output"}
"""What each layout's SAEs read unless the caller says otherwise (SAEmnesia's residual_sae: `reads="update"`)."""
MAX_WIDTH, MAX_LATENTS = 2**16, 2**24
"""Largest d_in and num_latents a checkpoint config may ask for (SD-size SAEs: 1280 and 20480; Flux: 3072 and
about 10^5)."""

EXAMPLE_HOOKPOINT = "unet.up_blocks.1.attentions.1"
_HOOKPOINT = re.compile(r"^(unet\.|transformer\.)?(down_blocks|mid_block|up_blocks|transformer_blocks|"
                        r"single_transformer_blocks)\b")
_UNBOX_SUFFIX = re.compile(r"_k\d+_hidden\d+.*$")
_HUB_NAME = re.compile(r"(?:^|-)((?:single_)?transformer_blocks\.\d+)(?:-([01]))?$")


def load_any(path, hookpoint: str | None = None, model_family: str | None = None, *, layout: str | None = None,
             reads: str | None = None, tokens: str | None = None, strength_unit: str | None = None) -> SAEFile:
    """Our file, or a checkpoint folder of any layout above, as an SAEFile.

    `hookpoint` picks a sub-folder of a multi-hookpoint folder and names the hookpoint when the folder does not;
    `layout` overrides the detection; `hookpoint`, `model_family`, `reads`, `tokens` and `strength_unit`, when given,
    override what the source says.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors" and is_sae_file(path):
        sae_file = load_sae_file(path)
    elif path.is_file() and path.name in WEIGHT_FILES:
        sae_file = import_checkpoint_folder(path.parent, hookpoint, layout)
    elif path.is_dir():
        sae_file = import_checkpoint_folder(_checkpoint_folder(path, hookpoint), hookpoint, layout)
    elif path.exists():
        raise SAEFileError(f"{path}: not an SAE file nor a checkpoint folder (expected a .safetensors with "
                           f"SAEmnesia metadata, or a folder with {' or '.join(CONFIG_FILES)})")
    else:
        raise SAEFileError(f"{path}: no such file or folder")
    for name, value, known in (("reads", reads, SIGNALS), ("tokens", tokens, tuple(TOKEN_LAYOUTS)),
                               ("strength_unit", strength_unit, STRENGTH_UNITS)):
        if value is not None and value not in known:
            raise SAEFileError(f"{name} must be one of {', '.join(known)}, got {value!r}")
    overrides = {k: v for k, v in (("hookpoint", hookpoint and _diffusers_hookpoint(hookpoint)),
                                   ("model_family", model_family), ("reads", reads), ("tokens", tokens),
                                   ("strength_unit", strength_unit)) if v}
    if overrides:
        sae_file = dataclasses.replace(sae_file, **overrides)
        validate_sae_file(sae_file)
    return sae_file


def is_checkpoint_folder(file_names) -> bool:
    """Whether a folder holding these file names is an importable checkpoint folder (a config and weights)."""
    names = set(file_names)
    return bool(names & set(CONFIG_FILES)) and bool(names & set(WEIGHT_FILES))


def detect_layout(folder: Path) -> str:
    """The layout of a checkpoint folder, from the files it holds (LAYOUTS)."""
    names = {p.name for p in folder.iterdir()}
    if "sae.safetensors" in names:
        return "sparsify"
    if "model.safetensors" in names:
        return "hub-topk"
    if "state_dict.pth" in names:
        return "unbox" if "mean.pt" in names else "openai"
    raise SAEFileError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def _config_file(folder: Path) -> Path | None:
    return next((folder / name for name in CONFIG_FILES if (folder / name).is_file()), None)


def _checkpoint_folder(path: Path, hookpoint: str | None) -> Path:
    """The folder itself if it holds a config, else its one (or the named) hookpoint sub-folder, looking one level
    down or into a sub-folder's `final/` (sdxl-unbox's checkpoints)."""
    if _config_file(path):
        return path
    subs = sorted(f for d in path.iterdir() if d.is_dir() for f in (d, d / "final") if f.is_dir() and _config_file(f))
    if hookpoint:
        named = [d for d in subs if _hookpoint_in_name(d) == _normalize_hookpoint(hookpoint)]
        if named:
            return named[0]
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise SAEFileError(f"{path}: no {' or '.join(CONFIG_FILES)} in the folder or its sub-folders")
    raise SAEFileError(f"{path} holds {len(subs)} hookpoints ({', '.join(d.relative_to(path).as_posix() for d in subs)}"
                       "); choose one (hookpoint=… / --hookpoint)")


def _hookpoint_in_name(folder: Path) -> str | None:
    """The hookpoint a checkpoint folder's name (or, for `final/`, its parent's) gives, in diffusers style."""
    name = folder.resolve().name
    if name == "final":
        name = folder.resolve().parent.name
    name = _UNBOX_SUFFIX.sub("", name)
    hub = _HUB_NAME.search(name)
    if hub and not _HOOKPOINT.match(name):
        name = hub.group(1)
    return _normalize_hookpoint(name) if _HOOKPOINT.match(name) else None


def _normalize_hookpoint(name: str) -> str:
    """diffusers style with the `unet.` or `transformer.` prefix: up_blocks.1.attentions.1 ->
    unet.up_blocks.1.attentions.1, transformer_blocks.18 -> transformer.transformer_blocks.18."""
    if name.startswith(("down_blocks", "mid_block", "up_blocks")):
        return "unet." + name
    if name.startswith(("transformer_blocks", "single_transformer_blocks")):
        return "transformer." + name
    return name


def _diffusers_hookpoint(name: str) -> str:
    if not _HOOKPOINT.match(name):
        raise SAEFileError(f"hookpoint {name!r} is not a diffusers-style module path (e.g. {EXAMPLE_HOOKPOINT})")
    return _normalize_hookpoint(name)


def _hub_tokens(folder: Path, hookpoint: str) -> str:
    """Which tokens a hub-topk SAE read: a single-stream block's joined ones, or the stream its folder names."""
    if ".single_transformer_blocks." in hookpoint:
        return "joined"
    hub = _HUB_NAME.search(folder.resolve().name)
    return "text" if hub and hub.group(2) == "0" else "image"


def import_checkpoint_folder(folder, hookpoint: str | None = None, layout: str | None = None) -> SAEFile:
    """A checkpoint folder of one of the LAYOUTS (detected from its files unless `layout` is given)."""
    folder = Path(folder)
    cfg_path = _config_file(folder)
    if cfg_path is None:
        raise SAEFileError(f"{folder}: no {' or '.join(CONFIG_FILES)}")
    layout = layout or detect_layout(folder)
    if layout not in LAYOUTS:
        raise SAEFileError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    cfg = _read_json(cfg_path)
    config = _config_from_checkpoint(cfg, cfg_path)
    weight_file = folder / WEIGHTS_OF[layout]
    if not weight_file.is_file():
        raise SAEFileError(f"{folder}: the {layout} layout ({LAYOUTS[layout]}) needs {weight_file.name}")
    _check_weights_can_hold(config, weight_file)
    if layout in ("sparsify", "hub-topk"):
        try:
            weights = load_file(str(weight_file))
        except Exception as e:  # the safetensors reader's own errors
            raise SAEFileError(f"{weight_file}: cannot read: {e}") from e
        if layout == "hub-topk":
            weights = _remap(weights, {"bias": "b_dec"}, weight_file)
    else:
        weights = _remap(load_pickle(weight_file), {"pre_bias": "b_dec", "latent_bias": "encoder.bias"}, weight_file)
    unexpected = set(weights) - set(weight_names(config))
    if unexpected:
        raise SAEFileError(f"{folder}: unsupported tensors {sorted(unexpected)} (skip connections and transcoders are "
                           "not TopK SAEs we can apply)")
    name = hookpoint or cfg.get("hookpoint") or _hookpoint_in_name(folder)
    if not name or not isinstance(name, str):
        raise SAEFileError(f"{folder}: a {layout} checkpoint whose folder name {folder.resolve().name!r} does not say "
                           f"which block it reads; give it (hookpoint=… / --hookpoint {EXAMPLE_HOOKPOINT}, or "
                           "transformer.transformer_blocks.18 for the Flux SAE SAE_flux_18)")
    hookpoint = _diffusers_hookpoint(name)
    means = _latent_means(folder / "mean.pt", config.num_latents) if layout == "unbox" else None
    sae_file = SAEFile(config=config, weights=weights, concepts=[], hookpoint=hookpoint, model_family="unknown",
                       num_buckets=1, supervised=False, reads=READS[layout],
                       tokens=_hub_tokens(folder, hookpoint) if layout == "hub-topk" else "", latent_means=means,
                       provenance={"imported_from": {"format": layout, "folder": folder.resolve().name, "cfg": cfg}})
    try:
        validate_sae_file(sae_file)
    except SAEFileError as e:
        raise SAEFileError(f"{folder}: {e}") from None
    return sae_file


def checkpoint_header(folder) -> SAEHeader:
    """What a checkpoint folder holds, from its config and its files' names alone (no weights read): what Load SAE's
    concept route shows for a folder (it has no concepts)."""
    folder = Path(folder)
    cfg_path = _config_file(folder)
    if cfg_path is None:
        raise SAEFileError(f"{folder}: no {' or '.join(CONFIG_FILES)}")
    layout = detect_layout(folder)
    hookpoint = _hookpoint_in_name(folder) or "unknown"
    return SAEHeader(config=_config_from_checkpoint(_read_json(cfg_path), cfg_path), concepts=[], hookpoint=hookpoint,
                     model_family="unknown", num_buckets=1, supervised=False, reads=READS[layout],
                     tokens=_hub_tokens(folder, hookpoint) if layout == "hub-topk" else "",
                     has_latent_means=layout == "unbox")


def _latent_means(path: Path, num_latents: int) -> Tensor:
    """sdxl-unbox's `mean.pt`: each latent's mean activation, [n], finite and non-negative."""
    means = load_pickle(path) if path.is_file() else None
    if not isinstance(means, Tensor) or tuple(means.shape) != (num_latents,) or not means.is_floating_point():
        shape = list(means.shape) if isinstance(means, Tensor) else type(means).__name__
        raise SAEFileError(f"{path}: expected each latent's mean activation, a float tensor [{num_latents}], "
                           f"got {shape}")
    if not bool((torch.isfinite(means) & (means >= 0)).all()):
        raise SAEFileError(f"{path}: mean activations must be finite and non-negative (it holds NaN, Inf or a "
                           "negative value)")
    return means.float().contiguous()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SAEFileError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(value, dict):
        raise SAEFileError(f"{path}: not a JSON object")
    return value


def _config_from_checkpoint(cfg: dict, where: Path) -> SAEConfig:
    """sparsify's cfg.json, SAEmnesia's aliases (d_model, n_dirs_local), num_latents = 0 (expansion factor), the hub
    mixin's constructor (features, pages) and SAEParate's `use_pre_encoder_gelu`. Every field's type and range is
    checked before any arithmetic."""
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
                               "needs d_in (or d_model, features), num_latents (or n_dirs_local, pages, or "
                               "expansion_factor) and k")
        return value

    d_in = field(("d_in", "d_model", "features"), MAX_WIDTH)
    num_latents = field(("num_latents", "n_dirs_local", "pages"), MAX_LATENTS, required=False)
    if num_latents is None:
        num_latents = d_in * field(("expansion_factor",), MAX_LATENTS // d_in or 1)
    flags = {}
    for key, name in (("input_unit_norm", "input_unit_norm"), ("use_pre_encoder_gelu", "pre_encoder")):
        flags[name] = cfg.get(key, False)
        if not isinstance(flags[name], bool):
            raise SAEFileError(f"{where}: {key} must be true or false, got {flags[name]!r}")
    return SAEConfig(d_in, num_latents, field(("k",), num_latents), **flags)


def _check_weights_can_hold(config: SAEConfig, weights: Path) -> None:
    """Refuse a config that the weights file is too small to hold (encoder and decoder at 2 bytes a value at
    least), before anything of that size is read or built."""
    needed = 2 * config.num_latents * config.d_in * 2
    if weights.stat().st_size < needed:
        raise SAEFileError(f"{weights}: the config asks for {config.num_latents} latents × {config.d_in} dims, which "
                           f"need at least {needed} bytes, but the file has {weights.stat().st_size}")


def _remap(sd, rename: dict[str, str], where: Path) -> dict[str, Tensor]:
    """Other key names -> sparsify names: `rename`'s, and decoder.weight [d, n] transposed to W_dec [n, d]; a nested
    {"state_dict": …} is unwrapped and OpenAI's dead-latent counter dropped."""
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise SAEFileError(f"{where}: not a state dict of named tensors")
    out = {}
    for key, value in sd.items():
        if key == "stats_last_nonzero":
            continue
        if key == "decoder.weight":
            out["W_dec"] = value.T.contiguous()
        else:
            out[rename.get(key, key)] = value
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(out)
    if missing:
        raise SAEFileError(f"{where}: missing key(s) for {sorted(missing)}")
    return out
