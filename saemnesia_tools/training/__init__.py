# SPDX-License-Identifier: GPL-3.0-or-later
"""Training pipeline (DESIGN §4-5): prompt specs -> labelled activation shards -> TopK SAE -> concept statistics.

    specs = saeuron_grid(objects, styles, repeats=4)                       # or read_specs("prompts.jsonl")
    collect(DiffusersSource(pipe, "unet.up_blocks.1.attentions.1"), specs, "acts/")
    # (a ComfyUI MODEL: saemnesia_tools.comfyui.capture.collect_from_comfy(model, encode_prompt, specs, "acts/", ...))
    train_unsupervised("acts/", TrainConfig(expansion_factor=16, k=32), out="sae.safetensors")
    finetune_supervised("sae.safetensors", "acts/", SupervisedConfig(), out="saemnesia.safetensors")
    compute_statistics("saemnesia.safetensors", "heldout_acts/", out="ready.safetensors")
"""

from saemnesia_tools.training.collect import Capture, DiffusersSource, collect, load_diffusers_pipeline
from saemnesia_tools.training.distributed import DistContext, init_distributed
from saemnesia_tools.training.shards import ActivationDataset, RecordBatch, ShardError, ShardWriter
from saemnesia_tools.training.specs import PromptSpec, SpecError, read_specs, saeuron_grid, write_specs
from saemnesia_tools.training.statistics import ConceptActivations, compute_statistics, concept_activations
from saemnesia_tools.training.supervised import SupervisedConfig, SupervisedResult, finetune_supervised
from saemnesia_tools.training.trainer import TrainConfig, TrainResult, train_unsupervised

__all__ = [
    "ActivationDataset", "Capture", "ConceptActivations", "DiffusersSource", "DistContext", "PromptSpec",
    "RecordBatch", "ShardError", "ShardWriter", "SpecError", "SupervisedConfig", "SupervisedResult", "TrainConfig",
    "TrainResult", "collect", "compute_statistics", "concept_activations", "finetune_supervised", "init_distributed",
    "load_diffusers_pipeline", "read_specs", "saeuron_grid", "train_unsupervised", "write_specs",
]
