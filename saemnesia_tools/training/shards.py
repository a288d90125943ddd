# SPDX-License-Identifier: GPL-3.0-or-later
"""Sharded activation storage: fixed-shape records in safetensors shards, a JSON index, streaming readers.

A *record* is one block output of one generated sample at one sampling step and CFG branch: ``acts``
``[H*W, d]`` (fp16 by default). Each shard holds whole samples only, so an interrupted collection resumes
by skipping the samples the index lists, without duplicating rows. Per-record columns:

    acts      [R, H*W, d]  float16   the hooked block's output, tokens = spatial positions
    t         [R]          float32   model timestep / (training timesteps - 1), 1 = pure noise
    timestep  [R]          float32   the raw model timestep
    step      [R]          int32     sampling step index (0 = first step)
    branch    [R]          int8      0 = cond, 1 = uncond (BRANCHES)
    sample    [R]          int64     sample id (index of the prompt spec in the collection)
    labels    [R, G]       int32     label id per concept group (index into label_vocab[group]), -1 = none

Readers verify each shard's sha256 when they load it, read shards sequentially (in a seeded random order),
and shuffle through a bounded buffer: the dataset is never loaded into RAM as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from saemnesia_core.files import remove_stale_temporaries, write_bytes_atomic, write_json_atomic

INDEX_NAME = "index.json"
FORMAT = "saemnesia-activations"
VERSION = 1
BRANCHES = ("cond", "uncond")
COLUMNS = ("acts", "t", "timestep", "step", "branch", "sample", "labels")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardError(ValueError):
    """A dataset whose index or shards are missing, corrupt or inconsistent."""


@dataclass
class RecordBatch:
    """A batch of R records (columns as in the module docstring)."""

    acts: torch.Tensor      # [R, H*W, d]
    t: torch.Tensor         # [R]
    timestep: torch.Tensor  # [R]
    step: torch.Tensor      # [R]
    branch: torch.Tensor    # [R]
    sample: torch.Tensor    # [R]
    labels: torch.Tensor    # [R, G]

    def __len__(self) -> int:
        return self.acts.shape[0]

    def select(self, rows: torch.Tensor) -> "RecordBatch":
        """The records at ``rows`` (an index or boolean mask over R)."""
        return RecordBatch(*(getattr(self, name)[rows] for name in COLUMNS))

    @staticmethod
    def cat(batches: Sequence["RecordBatch"]) -> "RecordBatch":
        return RecordBatch(*(torch.cat([getattr(b, name) for b in batches]) for name in COLUMNS))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in COLUMNS}


def _ranges(ids: Sequence[int]) -> list[list[int]]:
    """Sorted unique ids as half-open ``[start, stop)`` ranges (compact in the JSON index)."""
    out: list[list[int]] = []
    for i in sorted(set(int(i) for i in ids)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _header_from_index(index: dict) -> dict:
    return {k: v for k, v in index.items() if k not in ("shards", "num_records")}


def _shard_samples(shards: list[dict]) -> set[int]:
    return {i for s in shards for a, b in s["samples"] for i in range(a, b)}


def completed_samples(root: str | Path) -> set[int]:
    """Sample ids already stored under ``root`` (empty if nothing was collected there yet)."""
    index_path = Path(root) / INDEX_NAME
    return _shard_samples(json.loads(index_path.read_text())["shards"]) if index_path.exists() else set()


class ShardWriter:
    """Append samples to a dataset directory; reopening an existing one resumes it.

    Rows are buffered and written as one shard once ``records_per_shard`` is reached (only at a sample
    boundary). Each shard and then the index are replaced atomically, so after a crash the index lists
    exactly the complete samples on disk; the buffered ones are collected again.
    """

    def __init__(self, root: str | Path, *, d: int, height: int, width: int, label_vocab: dict[str, list[str]],
                 hookpoint: str, model_id: str, source: dict | None = None, dtype: str = "float16",
                 shard_mb: float = 128.0):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.header = {
            "format": FORMAT, "version": VERSION, "d": int(d), "height": int(height), "width": int(width),
            "tokens_per_record": int(height) * int(width), "dtype": dtype, "hookpoint": hookpoint,
            "model_id": model_id, "label_groups": list(label_vocab), "label_vocab": label_vocab,
            "branches": list(BRANCHES), "source": source or {},
        }
        record_bytes = self.header["tokens_per_record"] * d * torch.finfo(_DTYPES[dtype]).bits // 8
        self.records_per_shard = max(1, int(shard_mb * 2**20 // record_bytes))
        index_path = self.root / INDEX_NAME
        if index_path.exists():
            index = json.loads(index_path.read_text())
            old = _header_from_index(index)
            if old != self.header:
                diff = sorted(k for k in set(old) | set(self.header) if old.get(k) != self.header.get(k))
                raise ShardError(f"{self.root}: cannot resume, the existing dataset differs in {diff}")
            self.shards = index["shards"]
        else:
            self.shards = []
        remove_stale_temporaries(self.root)
        self._completed = _shard_samples(self.shards)
        self._pending: list[RecordBatch] = []
        self._pending_samples: list[int] = []
        self._write_index()

    @property
    def num_records(self) -> int:
        return sum(s["records"] for s in self.shards)

    def is_complete(self, sample_id: int) -> bool:
        """True when the sample's records are already on disk (or buffered for the next shard)."""
        return sample_id in self._completed or sample_id in self._pending_samples

    def write_sample(self, sample_id: int, acts: torch.Tensor, *, t, timestep, step, branch,
                     labels: Sequence[int]) -> None:
        """Add all records of one sample: ``acts`` [R, H*W, d]; t, timestep, step, branch [R]; labels [G]."""
        if self.is_complete(sample_id):
            raise ShardError(f"sample {sample_id} is already in the dataset")
        rows, tokens, d = acts.shape
        if (tokens, d) != (self.header["tokens_per_record"], self.header["d"]):
            raise ShardError(f"sample {sample_id}: records are [{tokens}, {d}], the dataset stores "
                             f"[{self.header['tokens_per_record']}, {self.header['d']}]")
        if len(labels) != len(self.header["label_groups"]):
            raise ShardError(f"sample {sample_id}: {len(labels)} labels for groups {self.header['label_groups']}")

        def column(values, dtype):
            return torch.as_tensor(values, dtype=dtype).reshape(rows).cpu()

        self._pending.append(RecordBatch(
            acts=acts.detach().to("cpu", _DTYPES[self.header["dtype"]]),
            t=column(t, torch.float32), timestep=column(timestep, torch.float32),
            step=column(step, torch.int32), branch=column(branch, torch.int8),
            sample=torch.full((rows,), sample_id, dtype=torch.int64),
            labels=torch.as_tensor(labels, dtype=torch.int32).reshape(1, -1).expand(rows, -1).contiguous(),
        ))
        self._pending_samples.append(sample_id)
        if sum(len(b) for b in self._pending) >= self.records_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then the index (both atomically)."""
        if not self._pending:
            return
        batch = RecordBatch.cat(self._pending)
        data = save_safetensors_bytes(batch.to_tensors())
        name = f"shard-{len(self.shards):06d}.safetensors"
        write_bytes_atomic(self.root / name, data)
        self.shards.append({"file": name, "records": len(batch), "sha256": hashlib.sha256(data).hexdigest(),
                            "samples": _ranges(self._pending_samples)})
        self._completed.update(self._pending_samples)
        self._pending, self._pending_samples = [], []
        self._write_index()

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()  # on an error, drop the partial buffer: a resumed run collects those samples again

    def _write_index(self) -> None:
        write_json_atomic(self.root / INDEX_NAME, {**self.header, "num_records": self.num_records,
                                                   "shards": self.shards})


def merge_parts(root: str | Path, parts: Sequence[str | Path]) -> dict:
    """Write ``root/index.json`` listing the shards of several part datasets (one per collecting rank)."""
    root = Path(root)
    header, shards = None, []
    for part in parts:
        index = json.loads((Path(part) / INDEX_NAME).read_text())
        part_header = _header_from_index(index)
        if header is None:
            header = part_header
        elif part_header != header:
            raise ShardError(f"{part}: its header differs from the other parts")
        rel = os.path.relpath(part, root)
        shards += [{**s, "file": f"{rel}/{s['file']}"} for s in index["shards"]]
    index = {**header, "num_records": sum(s["records"] for s in shards), "shards": shards}
    write_json_atomic(root / INDEX_NAME, index)
    return index


def validation_mask(sample: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Deterministic split by sample id (all records of a sample fall on one side): [R] bool, True = held out."""
    mixed = (sample.to(torch.int64) * 2654435761 + seed * 40503 + 12345) % 4294967291
    mixed = (mixed * 1103515245 + 3266489917) % 4294967291  # stays below 2**63
    return mixed.to(torch.float64) / 4294967291.0 < fraction


class ActivationDataset:
    """Read-only view of a collected dataset (``root/index.json`` plus its shards)."""

    def __init__(self, root: str | Path, *, verify: bool = True):
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.exists():
            raise ShardError(f"{self.root}: no {INDEX_NAME} (not an activation dataset)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{index_path}: not JSON ({e})") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ShardError(f"{index_path}: not a {FORMAT} v{VERSION} index")
        self.verify = verify
        self.shards = self.index["shards"]
        self.d = self.index["d"]
        self.tokens_per_record = self.index["tokens_per_record"]
        self.label_groups: list[str] = self.index["label_groups"]
        self.label_vocab: dict[str, list[str]] = self.index["label_vocab"]
        self.hookpoint: str = self.index["hookpoint"]
        self.num_records = sum(s["records"] for s in self.shards)
        self.num_tokens = self.num_records * self.tokens_per_record

    def load_shard(self, i: int) -> RecordBatch:
        """Shard ``i`` as a RecordBatch, after checking its size, checksum and columns."""
        entry = self.shards[i]
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: cannot read shard ({e})") from None
        if self.verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ShardError(f"{path}: checksum mismatch (the shard is corrupt or was modified)")
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad bytes
            raise ShardError(f"{path}: not a readable safetensors shard ({e})") from None
        missing = [c for c in COLUMNS if c not in tensors]
        if missing or tensors["acts"].shape[0] != entry["records"]:
            raise ShardError(f"{path}: missing columns {missing} or wrong record count")
        return RecordBatch(*(tensors[c] for c in COLUMNS))

    def verify_all(self) -> None:
        """Check every shard's checksum; raises ShardError naming the first bad one."""
        for i in range(len(self.shards)):
            self.load_shard(i)

    def _shard_order(self, shuffle: bool, seed: int, epoch: int) -> list[int]:
        if not shuffle:
            return list(range(len(self.shards)))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=gen).tolist()

    def _filtered_shards(self, order, where: Callable[[RecordBatch], torch.Tensor] | None) -> Iterator[RecordBatch]:
        for i in order:
            shard = self.load_shard(i)
            if where is not None:
                shard = shard.select(where(shard))
            if len(shard):
                yield shard

    def iter_records(self, batch_records: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                     buffer_records: int = 4096, where: Callable[[RecordBatch], torch.Tensor] | None = None,
                     drop_last: bool = False) -> Iterator[RecordBatch]:
        """Batches of whole records; ``where(batch) -> [R] bool`` filters rows (e.g. a validation split)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
        shards = self._filtered_shards(self._shard_order(shuffle, seed, epoch), where)
        yield from _shuffle_buffer(shards, batch_records, buffer_records, shuffle, gen, RecordBatch.cat,
                                   RecordBatch.select, keep_last=not drop_last)

    def iter_tokens(self, batch_tokens: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                    buffer_tokens: int = 2**17, where: Callable[[RecordBatch], torch.Tensor] | None = None,
                    ) -> Iterator[torch.Tensor]:
        """Full batches of single tokens ``[batch_tokens, d]`` (store dtype), mixed across records and shards.
        The last partial batch of an epoch is dropped."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 2)
        tokens = (shard.acts.reshape(-1, self.d) for shard in
                  self._filtered_shards(self._shard_order(shuffle, seed, epoch), where))
        yield from _shuffle_buffer(tokens, batch_tokens, buffer_tokens, shuffle, gen, torch.cat,
                                   lambda rows, index: rows[index], keep_last=False)

    def steps_per_epoch(self, batch_tokens: int) -> int:
        """Upper bound of full token batches per epoch (exact without a ``where`` filter)."""
        return self.num_tokens // batch_tokens


def _shuffle_buffer(pieces: Iterator, batch: int, buffer: int, shuffle: bool, gen: torch.Generator, cat, take,
                    keep_last: bool) -> Iterator:
    """Batches of `batch` rows from `pieces` (row-indexable chunks: shards' records or tokens), mixed through a
    buffer of at most `buffer` rows plus one piece: when full it is shuffled and all but half of it emitted, so
    memory stays bounded and rows mix across pieces. `take(rows, index)` selects rows; the final partial batch
    is yielded only with `keep_last`."""
    pending, count = [], 0

    def drain(keep: int) -> Iterator:
        nonlocal pending, count
        merged = cat(pending)
        if shuffle:
            merged = take(merged, torch.randperm(len(merged), generator=gen))
        emit = (len(merged) - keep) // batch * batch
        for start in range(0, emit, batch):
            yield take(merged, slice(start, start + batch))
        rest = take(merged, slice(emit, None))
        pending, count = ([rest] if len(rest) else []), len(rest)

    for piece in pieces:
        pending.append(piece)
        count += len(piece)
        if count >= max(buffer, batch):
            yield from drain(keep=buffer // 2 if shuffle else 0)
    if pending:
        yield from drain(keep=0)
    if pending and keep_last:
        yield pending[0]


def as_dataset(data: "ActivationDataset | str | Path") -> ActivationDataset:
    """A dataset from a folder path, or the dataset itself."""
    return data if isinstance(data, ActivationDataset) else ActivationDataset(data)
