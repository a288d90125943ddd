"""Where SAE files live in ComfyUI, and loading them once.

SAEs are listed from the `saemnesia` model folder (models/saemnesia/, any extra_model_paths.yaml entries,
and this pack's own models/saemnesia/ with the toy-world SAEs). Entries are our .safetensors files and the
checkpoint folders the importer reads (sparsify / SAeUron `cfg.json` + `sae.safetensors`, SAEmnesia
`config.json` + `state_dict.pth`; importers.CONFIG_FILES / WEIGHT_FILES). Names from the outside (the UI, API prompts)
are only resolved if they are one of the listed entries, so `..` or absolute paths reach nothing.
A loaded SAE keeps its weights once, in a ModelPatcher that ComfyUI's memory manager places.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths

from saemnesia_core.concepts import with_calibrations, with_latent_refs
from saemnesia_core.importers import CONFIG_FILES, WEIGHT_FILES, checkpoint_header, is_checkpoint_folder, load_any
from saemnesia_core.sae import TopKSAE
from saemnesia_core.sae_file import SAEFile, SAEFileError, SAEHeader, read_header

SAE_FOLDER = "saemnesia"
TOY_FOLDER = "saemnesia_toy"
PACK_MODELS = Path(__file__).resolve().parents[1] / "models"
"""The pack's own models: the toy world's SAEs (saemnesia/) and its model (toy/), listed without copying."""


def register_folders() -> None:
    """Add our model folders, keeping any paths extra_model_paths.yaml already gave them."""
    for name, paths, extensions in (
        (SAE_FOLDER, [Path(folder_paths.models_dir) / "saemnesia", PACK_MODELS / "saemnesia"],
         {".safetensors"}),
        (TOY_FOLDER, [Path(folder_paths.models_dir) / "saemnesia_toy", PACK_MODELS / "toy"],
         {".safetensors"}),
    ):
        for path in paths:
            folder_paths.add_model_folder_path(name, str(path))
        folder_paths.folder_names_and_paths[name] = (folder_paths.folder_names_and_paths[name][0], extensions)


def list_sae_entries() -> list[str]:
    """Our .safetensors files and checkpoint folders, as names relative to their base folder.

    The walk follows links but visits each real folder once (a link back into the folder cannot make it loop,
    as ComfyUI's own listing would), never leaves the saemnesia folders (a folder or file that links outside is
    not listed), and lists only regular files (a FIFO named *.safetensors is not)."""
    roots = _roots()
    entries, seen = set(), set()
    for base in folder_paths.get_folder_paths(SAE_FOLDER):
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen or not _inside(real, roots):
                dirnames[:] = []
                continue
            seen.add(real)
            here = [f for f in filenames if os.path.isfile(os.path.join(dirpath, f))
                    and _inside(os.path.join(dirpath, f), roots)]
            rel = Path(os.path.relpath(dirpath, base))
            if is_checkpoint_folder(here) and rel != Path("."):
                entries.add(rel.as_posix())
            entries.update((rel / f).as_posix() for f in here if f.endswith(".safetensors"))
    return sorted(entries)


def _roots() -> list[str]:
    return [os.path.realpath(b) for b in folder_paths.get_folder_paths(SAE_FOLDER) if os.path.isdir(b)]


def _inside(path: str, roots: list[str]) -> bool:
    """Whether `path`, links resolved, lies in one of the saemnesia folders."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def resolve_sae(name: str) -> Path:
    """The path of a listed entry; anything else (unknown, `..`, absolute, leading out of the saemnesia folders,
    itself or through a file inside it) is refused with ValueError or FileNotFoundError."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise ValueError(f"invalid SAE name {name!r}: give a name from the saemnesia model folder")
    if name not in list_sae_entries():
        raise FileNotFoundError(f"no SAE named {name!r} in the saemnesia model folders")
    roots = _roots()
    for base in folder_paths.get_folder_paths(SAE_FOLDER):
        path = Path(base) / name
        inner = [path / f for f in (*CONFIG_FILES, *WEIGHT_FILES) if (path / f).exists()] if path.is_dir() else []
        if path.exists() and all(_inside(str(p), roots) for p in (path, *inner)):
            return path
    raise FileNotFoundError(f"no SAE named {name!r} in the saemnesia model folders")


def fingerprint(path: Path) -> str:
    """Size and mtime of the file (or a folder's weights): a replaced file under the same name reloads."""
    if path.is_dir():
        path = next(path / w for w in WEIGHT_FILES if (path / w).exists())
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def read_entry_header(name: str) -> SAEHeader:
    """The header of an entry without reading tensors (for a checkpoint folder, from its config and its files' names:
    it has no concepts)."""
    path = resolve_sae(name)
    with _naming_the_entry(name, path):
        return checkpoint_header(path) if path.is_dir() else read_header(path)


@contextmanager
def _naming_the_entry(name: str, path: Path):
    """Errors name the entry the user chose, not where the server keeps it."""
    try:
        yield
    except SAEFileError as e:
        raise SAEFileError(str(e).replace(str(path), name)) from None


class SAEWeights(torch.nn.Module):
    """What ComfyUI's memory manager moves: the SAE (ModelPatcher also writes bookkeeping attributes such as
    `device` on the module it manages, which must not land on the SAE itself)."""

    def __init__(self, sae: TopKSAE):
        super().__init__()
        self.sae = sae


@dataclass(eq=False)
class LoadedSAE:
    """An SAE file's concepts and statistics, plus its weights in one ModelPatcher (one copy per device)."""

    name: str
    file: SAEFile  # weights dropped: they live in `sae`
    sae: TopKSAE
    patcher: comfy.model_patcher.ModelPatcher
    _by_dtype: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.file.concepts]

    def with_latent_refs(self, labels) -> "LoadedSAE":
        """The same weights, with a concept for each latent reference ("#123") among `labels`
        (concepts.with_latent_refs)."""
        f = self.file
        concepts, tables = with_latent_refs(f.concepts, f.concept_tables, labels, f.config.num_latents, f.latent_means)
        return self if concepts is f.concepts else replace(self, file=replace(f, concepts=concepts, tables=tables))

    def with_calibrations(self, kappas: dict[str, float | None]) -> "LoadedSAE":
        """The same weights with κ set (None: removed) for the labels in `kappas` (DESIGN §6.7), the file untouched."""
        return replace(self, file=replace(self.file, concepts=with_calibrations(self.file.concepts, kappas)))

    def for_dtype(self, dtype: torch.dtype) -> "LoadedSAE":
        """This SAE with its weights in `dtype`, the dtype the patched model computes in, held by a ModelPatcher of
        its own: ComfyUI's memory manager places and offloads that copy like the model's weights, and the edit
        casts nothing per call (an fp32 file on an fp16 model would otherwise copy the whole encoder each step).
        Made once per dtype and shared by every model that computes in it, and by copies of this LoadedSAE whose
        `file` was replaced (other tables or calibrations of the same weights), which keep their own `file`."""
        if dtype == self.sae.dtype:
            return self
        if dtype not in self._by_dtype:
            offload = comfy.model_management.unet_offload_device()
            sae = TopKSAE(self.sae.cfg, device="meta")
            sae.load_state_dict({k: v.to(offload, dtype) for k, v in self.sae.state_dict().items()}, assign=True)
            self._by_dtype[dtype] = (sae.requires_grad_(False).eval(), _patcher(sae))
        return LoadedSAE(self.name, self.file, *self._by_dtype[dtype], self._by_dtype)


def compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI MODEL's blocks compute in (and so the dtype of the activations the edit sees)."""
    base = model.model
    return base.manual_cast_dtype or base.get_dtype()


def _patcher(sae: TopKSAE) -> comfy.model_patcher.ModelPatcher:
    """The SAE's ModelPatcher. Its `cached_patcher_init` (ComfyUI 0.23+) makes a fresh one with a copy of the
    weights, which is how ComfyUI gives each device of a MultiGPU run its own SAE (`deepclone_multigpu`)."""
    patcher = comfy.model_patcher.ModelPatcher(SAEWeights(sae), load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = (_copy_patcher, (sae,))
    return patcher


def _copy_patcher(sae: TopKSAE, **_options) -> comfy.model_patcher.ModelPatcher:
    return _patcher(copy.deepcopy(sae))  # (options such as disable_dynamic: this patcher is never dynamic)


_cache: dict[tuple[str, str], LoadedSAE] = {}


def load_sae_path(path: Path, name: str | None = None) -> LoadedSAE:
    """Load an SAE from any path (tools and tests; the nodes go through `load_sae`), uncached."""
    sae_file = load_any(path)
    sae = sae_file.build_sae().requires_grad_(False).eval()
    return LoadedSAE(name or Path(path).name, replace(sae_file, weights={}), sae, _patcher(sae))


def load_sae(name: str) -> LoadedSAE:
    """Load a listed SAE (cached by name and fingerprint, so every node using it shares the weights)."""
    path = resolve_sae(name)
    key = (str(path), fingerprint(path))
    if key not in _cache:
        for stale in [k for k in _cache if k[0] == key[0]]:
            del _cache[stale]
        with _naming_the_entry(name, path):
            _cache[key] = load_sae_path(path, name)
    return _cache[key]
