"""Regenerate the whole toy world from scratch, deterministically: judges → text-to-image model → its quality
on the full grid → per SAE site (objects: up_blocks.1.attentions.1, styles: up_blocks.2.attentions.2)
activations → an unsupervised (SAeUron) SAE → the supervised (SAEmnesia) SAE fine-tuned from it → concept
statistics on held-out prompts → the shipped files.

    python -m saemnesia_comfy.toy_build                 # the shipped recipe (about 4 hours on 2 CPU cores)
    python -m saemnesia_comfy.toy_build --smoke --out runs/toy_smoke   # every stage at toy-of-the-toy size (minutes)

Stages whose output exists are skipped (delete a file to redo its stage); an interrupted model training
resumes from its checkpoint. Everything is seeded; results repeat on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saemnesia_core.sae_file import save_sae_file
from saemnesia_core.toy.judges import STYLE_CLASSES, Judges, train_judges
from saemnesia_core.toy.prompts import make_prompt
from saemnesia_core.toy.render import OBJECTS, STYLES
from saemnesia_core.training.shards import ActivationDataset
from saemnesia_core.training import (SupervisedConfig, TrainConfig, collect, compute_statistics,
                                     finetune_supervised, saeuron_grid, train_unsupervised)

from . import toy_model, toy_train
from .capture import ComfyCaptureSource
from .runtime import REPO_ROOT
from .toy_sampling import PromptEncoder, generate

# Where the SAEs read, and the files they ship as. Objects: SAeUron's and SAEmnesia's block (8x8 tokens).
# Styles: the toy reads its styles from the text again in the 16x16 decoder level (swapping the prompt at the
# 8x8 blocks alone leaves 7 of 8 styles; README), so its style SAE sits at that level's last block, the last
# cross-attention before the image is drawn (SAeUron's style block for SD1.5, up.1.2, is the same kind of place).
SAE_SITES = {
    "unet.up_blocks.1.attentions.1": ("toy_saemnesia.safetensors", "toy_saeuron.safetensors"),
    "unet.up_blocks.2.attentions.2": ("toy_saemnesia_styles.safetensors", "toy_saeuron_styles.safetensors"),
}


@dataclass
class Recipe:
    """Every size and setting of a build; `smoke()` shrinks all of them."""

    judge_pool: int = 12000
    judge_steps: int = 1500
    # Two phases. 1: Min-SNR-5 weighting learns palettes and textures fast, but objects stayed at chance: it
    # starves the high-noise steps where shapes are decided, and CLIP's causal text encoder let its padding
    # positions (most of what cross-attention sees) carry only the style. 2: plain v-loss weighting plus an
    # auxiliary loss making the mean text embedding tell object and style.
    # Each phase: (loss weighting, LR schedule length, stop at step, seed, text auxiliary loss weight).
    model_phases: tuple = (("minsnr", 2400, 1516, 0, 0.0), ("v", 1500, 900, 1, 0.1))
    model_batch: int = 64
    model_lr: float = 8e-4
    sample_steps: int = 25
    cfg: float = 5.0
    quality_seeds: int = 2          # images per (object, style) prompt in the quality check
    train_repeats: int = 8          # copies of the labelled grid whose activations train the SAEs
    heldout_repeats: int = 2        # copies for the concept statistics (other seeds)
    expansion: int = 16
    k: int = 8
    sae_batch_tokens: int = 4096
    sae_epochs: int = 10
    supervised_lr: float = 1e-3
    supervised_epochs: int = 40
    supervised_batch: int = 128
    buckets: int = 50
    percentile: float = 99.9        # SAeUron selection: about 2 of 2048 latents
    seed: int = 0

    @classmethod
    def smoke(cls) -> "Recipe":
        return cls(judge_pool=400, judge_steps=20, model_phases=(("minsnr", 3, 2, 0, 0.0), ("v", 2, 2, 1, 0.1)), model_batch=8,
                   sample_steps=2, quality_seeds=1,
                   train_repeats=1, heldout_repeats=1, sae_epochs=1, supervised_epochs=2, supervised_batch=16,
                   sae_batch_tokens=512, buckets=4, percentile=99.0)


def labelled_grid(repeats: int):
    return saeuron_grid(list(OBJECTS), list(STYLES), repeats=repeats)


def build_judges(recipe: Recipe, path: Path, report: dict) -> Judges:
    if path.exists():
        return Judges.load(path)
    t = time.time()
    judges, accuracy = train_judges(recipe.judge_pool, recipe.judge_steps, seed=recipe.seed)
    judges.save(path)
    report["judges"] = {**accuracy, "minutes": round((time.time() - t) / 60, 1)}
    return judges


def build_model(recipe: Recipe, path: Path, work: Path, report: dict) -> None:
    if path.exists():
        return
    t = time.time()
    previous = None
    for i, (weighting, schedule, stop_at, seed, text_aux) in enumerate(recipe.model_phases):
        run = work / f"model_phase{i + 1}"
        trainer = toy_train.train(run, schedule, recipe.model_batch, recipe.model_lr, seed, weighting, stop_at,
                                  init=previous, text_aux=text_aux)
        previous = run / "checkpoint.pt"
    toy_train.export(trainer, path, {"recipe": "saemnesia_comfy.toy_build", "phases": recipe.model_phases})
    report["model"] = {"phases": recipe.model_phases, "batch": recipe.model_batch,
                       "minutes_this_run": round((time.time() - t) / 60, 1)}


def grid_accuracy(model, vae, encoder, judges: Judges, recipe: Recipe, seed_offset=10_000) -> dict:
    """Object and style top-1 accuracy of the judges on the model's generations of the full grid."""
    items = [(o, s) for o in OBJECTS for s in (*STYLES, None)] * recipe.quality_seeds
    seeds = [seed_offset + i for i in range(len(items))]
    images = generate(model, vae, encoder, [make_prompt(o, s) for o, s in items], seeds,
                      steps=recipe.sample_steps, cfg=recipe.cfg)
    objects, styles = judges.predict(images)
    return {"object": sum(p == o for p, (o, _) in zip(objects, items)) / len(items),
            "style": sum(p == (s or STYLE_CLASSES[-1]) for p, (_, s) in zip(styles, items)) / len(items),
            "images": len(items), "steps": recipe.sample_steps, "cfg": recipe.cfg, "sampler": "euler"}


def collect_activations(model, encoder, recipe: Recipe, hookpoint: str, out: Path, repeats: int, seed: int):
    source = ComfyCaptureSource(model, lambda p: [[encoder(p), {}]], hookpoint=hookpoint, steps=recipe.sample_steps,
                                cfg=recipe.cfg, sampler="euler", scheduler="normal", width=32, height=32,
                                model_id="saemnesia-toy-world", model_family="toy")
    return collect(source, labelled_grid(repeats), out, seed=seed, batch_size=72)


def build_saes(recipe: Recipe, models: Path, work: Path, model, encoder, hookpoint: str, report: dict) -> None:
    """Activations at `hookpoint` → unsupervised SAE → supervised fine-tune → both files with statistics."""
    outputs = [models / "saemnesia" / name for name in SAE_SITES[hookpoint]]
    if all(p.exists() for p in outputs):
        return
    work = work / hookpoint.removeprefix("unet.")
    report = report.setdefault("saes", {}).setdefault(hookpoint, {})
    t = time.time()
    train_data = collect_activations(model, encoder, recipe, hookpoint, work / "acts_train", recipe.train_repeats,
                                     recipe.seed)
    heldout = collect_activations(model, encoder, recipe, hookpoint, work / "acts_heldout", recipe.heldout_repeats,
                                  recipe.seed + 1_000_000)
    report["activations_minutes"] = round((time.time() - t) / 60, 1)
    ds = ActivationDataset(train_data)
    tokens_per_epoch = ds.num_records * ds.tokens_per_record  # dead = silent for a whole epoch (AuxK's threshold)
    t = time.time()
    unsup = train_unsupervised(train_data, TrainConfig(
        expansion_factor=recipe.expansion, k=recipe.k, batch_size=recipe.sae_batch_tokens, epochs=recipe.sae_epochs,
        dead_tokens_threshold=tokens_per_epoch, seed=recipe.seed), out=work / "sae_unsupervised.safetensors",
        checkpoint_dir=work / "sae_unsupervised_ckpt", model_family="toy")
    report["unsupervised"] = {"steps": unsup.steps, "final": unsup.history[-1] if unsup.history else {},
                              "minutes": round((time.time() - t) / 60, 1)}
    t = time.time()
    sup = finetune_supervised(work / "sae_unsupervised.safetensors", train_data, SupervisedConfig(
        lr=recipe.supervised_lr, max_epochs=recipe.supervised_epochs, batch_records=recipe.supervised_batch,
        num_buckets=recipe.buckets, seed=recipe.seed), out=work / "sae_supervised.safetensors",
        checkpoint_dir=work / "sae_supervised_ckpt", model_family="toy")
    report["supervised"] = {"epochs": len(sup.history), "minutes": round((time.time() - t) / 60, 1),
                            "selectivity_before": sup.selectivity_before, "selectivity_after": sup.selectivity_after}
    outputs[0].parent.mkdir(parents=True, exist_ok=True)
    for source, mode, out in ((work / "sae_supervised.safetensors", "saemnesia", outputs[0]),
                              (work / "sae_unsupervised.safetensors", "saeuron", outputs[1])):
        sae_file = compute_statistics(source, heldout, mode=mode, num_buckets=recipe.buckets,
                                      percentile=recipe.percentile)
        sae_file.provenance.update({"built_by": "saemnesia_comfy.toy_build", "recipe": asdict(recipe)})
        save_sae_file(sae_file, out)


def build(models: Path, work: Path, recipe: Recipe) -> dict:
    (models / "toy").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report_path = models / "toy" / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["recipe"] = asdict(recipe)

    def save_report():
        report_path.write_text(json.dumps(report, indent=1) + "\n")

    judges = build_judges(recipe, models / "toy" / "toy_judges.safetensors", report)
    save_report()
    model_path = models / "toy" / "toy_world.safetensors"
    build_model(recipe, model_path, work, report)
    save_report()
    model, clip, vae = toy_model.load_toy_model(model_path)
    encoder = PromptEncoder(clip)
    if "quality" not in report:
        report["quality"] = grid_accuracy(model, vae, encoder, judges, recipe)
        save_report()
    for hookpoint in SAE_SITES:
        build_saes(recipe, models, work, model, encoder, hookpoint, report)
        save_report()
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models", help="where the shipped files go")
    p.add_argument("--work", type=Path, help="intermediate files (default: <out>/../runs/toy_build)")
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny size (for CI)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.smoke() if args.smoke else Recipe()
    work = args.work or (args.out.parent / "runs" / ("toy_build_smoke" if args.smoke else "toy_build"))
    report = build(args.out, work, recipe)
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
