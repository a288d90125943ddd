"""The whole pipeline from labelled activations to shipped files (DESIGN §4-5): an unsupervised TopK SAE, its
supervised fine-tune, and each with concept statistics from held-out records. The toy build runs it per SAE site
and for its text-encoder SAE; each file is made only when missing, so a rerun redoes only what was deleted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saemnesia_core.sae_file import save_sae_file

from .shards import ActivationDataset
from .statistics import compute_statistics
from .supervised import SupervisedConfig, finetune_supervised
from .trainer import TrainConfig, train_unsupervised


def train_sae_pair(train_data, heldout, work: Path, unsupervised: TrainConfig, supervised: SupervisedConfig, *,
                   saemnesia_out: Path, saeuron_out: Path | None = None, percentile: float | None = None,
                   provenance: dict | None = None, model_family: str = "unknown", progress: bool = True) -> None:
    """train_data → unsupervised SAE (`<work>/sae_unsupervised.safetensors`) → supervised fine-tune
    (`<work>/sae_supervised.safetensors`) → `saemnesia_out` with SAEmnesia statistics; with `saeuron_out`, the
    unsupervised SAE with SAeUron statistics too, and the fine-tune starts from that file. Statistics come from
    `heldout` over `supervised.num_buckets` buckets; `provenance` is added to each file's. Checkpoints go under
    `work`, so an interrupted run resumes; a file that exists is not made again."""
    dead = ActivationDataset(train_data)  # a latent is dead when silent for a whole epoch (AuxK's threshold)
    unsupervised_file = work / "sae_unsupervised.safetensors"

    def save_with_statistics(source: Path, mode: str, out: Path) -> None:
        sae_file = compute_statistics(source, heldout, mode=mode, num_buckets=supervised.num_buckets,
                                      progress=progress, **({"percentile": percentile} if percentile else {}))
        sae_file.provenance.update(provenance or {})
        out.parent.mkdir(parents=True, exist_ok=True)
        save_sae_file(sae_file, out)

    if not (unsupervised_file.exists() if saeuron_out is None else saeuron_out.exists()):
        unsupervised = dataclasses.replace(unsupervised,
                                           dead_tokens_threshold=dead.num_records * dead.tokens_per_record)
        train_unsupervised(train_data, unsupervised, out=unsupervised_file,
                           checkpoint_dir=work / "sae_unsupervised_ckpt", model_family=model_family, progress=progress)
        if saeuron_out is not None:
            save_with_statistics(unsupervised_file, "saeuron", saeuron_out)
    if not saemnesia_out.exists():
        finetune_supervised(saeuron_out or unsupervised_file, train_data, supervised,
                            out=work / "sae_supervised.safetensors", checkpoint_dir=work / "sae_supervised_ckpt",
                            model_family=model_family, progress=progress)
        save_with_statistics(work / "sae_supervised.safetensors", "saemnesia", saemnesia_out)
