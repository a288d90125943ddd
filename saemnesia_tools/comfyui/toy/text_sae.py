"""The toy world's text-encoder SAE (DESIGN §6.8): the grid's labelled prompts → the token activations after a layer
of the toy's CLIP → an unsupervised TopK SAE → the supervised (SAEmnesia) fine-tune → statistics with one bucket →
one file, `assets.TEXT_SAE`, for the Erase Concepts (text) node. A stage of the toy build, skipped when its file
exists.

Encoding is deterministic, so the grid's 72 prompts are its whole training set (one record of 77 tokens each); the
evaluation's rephrased prompts are never trained on. The statistics are measured on the same records.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from saemnesia_tools.toy import assets
from saemnesia_tools.toy.render import OBJECTS, STYLES
from saemnesia_tools.training import SupervisedConfig, TrainConfig, saeuron_grid
from saemnesia_tools.training.pipeline import train_sae_pair
from saemnesia_tools.training.shards import ActivationDataset

from ..text_capture import collect_from_clip
from .recipe import Recipe


def build_text_sae(recipe: Recipe, models: Path, work: Path, clip) -> None:
    """Make `assets.TEXT_SAE` in `models` when it is missing (intermediate files under <work>/text_encoder)."""
    out = assets.path(assets.TEXT_SAE, models)
    if out.exists():
        return
    work = work / "text_encoder"
    t = time.time()
    data = collect_from_clip(clip, saeuron_grid(list(OBJECTS), list(STYLES)), work / "acts",
                             hookpoint=assets.TEXT_HOOKPOINT, model_id="saemnesia-toy-world", batch_size=72)
    ds = ActivationDataset(data)
    activations = {"seconds": round(time.time() - t, 1), "records": ds.num_records}
    train_sae_pair(data, data, work, TrainConfig(
        expansion_factor=recipe.expansion, k=recipe.k, batch_size=recipe.sae_batch_tokens,
        epochs=recipe.text_sae_epochs, seed=recipe.seed), SupervisedConfig(
        lr=recipe.supervised_lr, max_epochs=recipe.text_supervised_epochs, batch_records=recipe.text_supervised_batch,
        num_buckets=1, exclusivity=recipe.supervised_exclusivity, seed=recipe.seed),
        saemnesia_out=out, model_family="toy", progress=False,
        provenance={"built_by": "saemnesia_tools.comfyui.toy.build", "recipe": asdict(recipe),
                    "activations": activations})
