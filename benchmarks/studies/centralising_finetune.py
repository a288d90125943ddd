# SPDX-License-Identifier: GPL-3.0-or-later
"""Does the supervised fine-tune make each object's assigned latent carry its object (DESIGN §4.4)?

The toy's object site (`unet.up_blocks.1.attentions.1`). Per object, the centralisation of three SAEs, all read
with their own assignment on the build's held-out activations (the concept statistics' records):
- the unsupervised SAE (the shipped SAeUron file, which the SAEmnesia files are fine-tuned from), read with the
  assignment of the fine-tune below;
- the toy recipe's fine-tune without L_X (the authors' loss L_rec + β·L_CA + η·L_DC + λ·L_L1, lr 1e-3, at most 40
  epochs, early stopping by validation), as the toy build made it before it took L_X up;
- the same fine-tune from the same SAE on the same records with L_X added (ζ = 3, the weight of the planted test
  in tests/test_training_supervised.py), which penalises other latents' correlation with the label: the toy build's
  recipe since this study.
Centralisation: the assigned latent's AUROC, its share of the object's mean difference, and how many other latents
separate the object with AUROC > 0.8 (`saemnesia_tools.training.centralisation`).

    .venv/bin/python benchmarks/studies/centralising_finetune.py   # about 50 minutes on 2 cores

The activations are the build's own (same recipe, seeds and work folder, `runs/toy_build`), collected when missing.
Writes benchmarks/studies/results/centralising_finetune.json, .md and .png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy import toy_model
from saemnesia_tools.comfyui.toy.build import site_activations, site_work
from saemnesia_tools.comfyui.toy.recipe import Recipe
from saemnesia_tools.comfyui.toy.sampling import PromptEncoder
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_core.sae_file import load_sae_file
from saemnesia_tools.toy import assets
from saemnesia_tools.training import SupervisedConfig, finetune_supervised
from saemnesia_tools.training.centralisation import AUROC_THRESHOLD, centralisation

RESULTS = Path(__file__).resolve().parent / "results"
ZETA = 3.0
SAES = ("unsupervised", "fine-tune without L_X", f"fine-tune with L_X (ζ = {ZETA:g})")


def run(work: Path) -> dict:
    recipe, site = Recipe(), assets.SITES["object"]
    model, clip, _ = toy_model.load_toy_model(assets.path(assets.MODEL))
    encoder = PromptEncoder(clip)
    train = site_activations(model, encoder, recipe, work, site, "train")
    heldout = site_activations(model, encoder, recipe, work, site, "heldout")

    def finetune(zeta: float):
        started = time.time()
        result = finetune_supervised(assets.path(site.saeuron), train, SupervisedConfig(
            lr=recipe.supervised_lr, max_epochs=recipe.supervised_epochs, batch_records=recipe.supervised_batch,
            num_buckets=recipe.buckets, seed=recipe.seed, exclusivity=zeta),
            checkpoint_dir=site_work(work, site) / f"sae_supervised_lx{zeta:g}_ckpt", model_family="toy")
        return result, round((time.time() - started) / 60, 1)

    (plain, _), (exclusive, minutes) = finetune(0.0), finetune(ZETA)
    unsupervised = load_sae_file(assets.path(site.saeuron)).build_sae(dtype=torch.float32)
    objects = [[c for c in r.concepts if c.group == site.group] for r in (plain, exclusive)]
    rows = dict(zip(SAES, (centralisation(unsupervised, objects[0], heldout),
                           centralisation(plain.sae, objects[0], heldout),
                           centralisation(exclusive.sae, objects[1], heldout))))
    return {"site": site.hookpoint, "records": "the build's held-out activations", "zeta": ZETA,
            "threshold": AUROC_THRESHOLD, "finetune_minutes": minutes, "epochs": len(exclusive.history),
            "final_epoch": {k: round(v, 4) for k, v in exclusive.history[-1].items() if k != "epoch"},
            "plain_epochs": len(plain.history),
            "plain_final_epoch": {k: round(v, 4) for k, v in plain.history[-1].items() if k != "epoch"},
            "rows": rows, "torch_threads": torch.get_num_threads()}


def markdown(data: dict) -> str:
    labels = [r["label"] for r in data["rows"][SAES[0]]]
    lines = ["# Does the fine-tune centralise? Objects at the toy's object site", "",
             f"Per object at `{data['site']}`, on {data['records']}: the assigned latent's AUROC for its object, its "
             f"share of the object's mean difference (1 = it carries all of it), and the other latents with AUROC > "
             f"{data['threshold']:g}. Written by `benchmarks/studies/centralising_finetune.py` "
             f"(the L_X fine-tune: {data['epochs']} epochs, {data['finetune_minutes']} min, "
             f"{data['torch_threads']} torch threads).", "",
             "| object | " + " | ".join(f"{s}: AUROC / share / others" for s in SAES) + " |",
             "|---|" + "---|" * len(SAES)]
    for i, label in enumerate(labels):
        cells = [data["rows"][s][i] for s in SAES]
        lines.append(f"| {label} | " + " | ".join(f"{r['auroc']:.3f} / {r['mean_difference_share']:.3f} / "
                                                  f"{r['other_latents_above']}" for r in cells) + " |")
    means = [(sum(r["mean_difference_share"] for r in data["rows"][s]) / len(labels),
              sum(r["other_latents_above"] for r in data["rows"][s]) / len(labels)) for s in SAES]
    lines.append("| mean | " + " | ".join(f"— / {share:.3f} / {others:.1f}" for share, others in means) + " |")
    plain, lx = data["plain_final_epoch"], data["final_epoch"]
    lines += ["", f"Last epoch, without L_X ({data['plain_epochs']} epochs): rec {plain['rec']:g}, "
              f"ca {plain['ca']:g}, val_loss {plain['val_loss']:g}; with L_X: rec {lx['rec']:g}, ca {lx['ca']:g}, "
              f"L_X {lx['x']:g}, val_loss {lx['val_loss']:g} (val_loss includes ζ·L_X).", "",
              "![centralisation](centralising_finetune.png)", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in data["rows"][SAES[0]]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(SAES)
    for j, s in enumerate(SAES):
        xs = [i + (j - (len(SAES) - 1) / 2) * width for i in range(len(labels))]
        axes[0].bar(xs, [r["mean_difference_share"] for r in data["rows"][s]], width, label=s)
        axes[1].bar(xs, [r["other_latents_above"] for r in data["rows"][s]], width, label=s)
    for ax, title in zip(axes, ("assigned latent's share of the mean difference",
                                f"other latents with AUROC > {data['threshold']:g}")):
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=assets.REPO_ROOT / "runs" / "toy_build")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args.work)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "centralising_finetune.json", data)
    write_bytes_atomic(RESULTS / "centralising_finetune.md", markdown(data).encode())
    plot(data, RESULTS / "centralising_finetune.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
