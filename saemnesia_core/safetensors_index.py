"""Reading a safetensors file's header safely: the string metadata and each tensor's dtype and shape, without
reading tensor data (what the UI does on every refresh), and every defect as an SAEFileError that says what is
wrong."""

from __future__ import annotations

import os
import stat

import torch
from safetensors import safe_open


class SAEFileError(ValueError):
    """A file that is not a valid SAE file (or importable checkpoint); the message says why."""


MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Larger headers are refused before reading them (and never written): thousands of concepts fit in well under
1 MiB."""
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
"""safetensors dtype names we can check (the weights and tables use only some of them; sae_format.check_structure says which)."""


def read_index(path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple]]]:
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
