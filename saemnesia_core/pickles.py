"""Loading pickled tensors without running code from the file: torch.save archives go through
`torch.load(weights_only=True)`, plain pickles through an unpickler that only knows how to rebuild tensors, dicts and
numbers. Nothing here ever calls `pickle.load`."""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

from .safetensors_index import SAEFileError


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
