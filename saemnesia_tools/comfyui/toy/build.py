"""Regenerate the whole toy world from scratch, deterministically: judges → text-to-image model → the text
encoder's SAE (`text_sae.py`, DESIGN §6.8) → per SAE site (`saemnesia_tools.toy.assets.ALL_SITES`) activations → an
unsupervised (SAeUron) SAE → the supervised (SAEmnesia) SAE fine-tuned from it → concept statistics on held-out
prompts → the supervised SAE's strengths calibrated (`calibration.py`, DESIGN §6.7) → each SAE's erasure measured
per concept → the shipped files → the build report.

    python -m saemnesia_tools.comfyui.toy.build                 # the shipped recipe (about 4 hours on 2 CPU cores)
    python -m saemnesia_tools.comfyui.toy.build --report-only   # rewrite models/toy/build_report.json (minutes)
    python -m saemnesia_tools.comfyui.toy.build --smoke --out runs/toy_smoke/models   # every stage at a tiny size

Stages whose output exists are skipped (delete a file to redo its stage); an interrupted model training resumes
from its checkpoint. Everything is seeded; results repeat on the same machine and thread count.

The report is written by `build_report` from the shipped files alone: what each stage recorded in its file's
header (recipe, training provenance, timings) and what can be measured again from the files (the judges on
their held-out renders, the model's quality on the grid). So the report can always be rebuilt without the
4-hour training, and nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from saemnesia_core.files import write_json_atomic
from saemnesia_core.sae_file import load_sae_file, read_header, save_sae_file
from saemnesia_tools.toy import assets, demo
from saemnesia_tools.toy.judges import NO_OBJECT, STYLE_CLASSES, Judges, held_out_accuracy, train_judges
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES
from saemnesia_tools.training import SupervisedConfig, TrainConfig, collect, saeuron_grid
from saemnesia_tools.training.pipeline import train_sae_pair
from saemnesia_tools.training.centralisation import centralisation
from saemnesia_tools.training.directions import concept_directions
from saemnesia_tools.training.specs import PromptSpec
from saemnesia_tools.training.shards import ActivationDataset

from ..capture import ComfyCaptureSource
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_comfy import toy_model
from . import train as toy_train
from .recipe import Recipe
from .calibration import calibrate_strengths, cells_showing, fit_artifact_judge
from .sampling import PromptEncoder, generate
from .text_sae import build_text_sae

HELDOUT_SEED_OFFSET = 1_000_000   # held-out activations (the concept statistics) use recipe.seed + this
JUDGES_HELDOUT_OFFSET = 1000      # the judges' held-out renders use recipe.seed + this
QUALITY_SEED = 10_000             # the quality check's first seed
ERASURE_SEED = 7_000_000          # the per-concept erasure measurement's first seed


# ---------------------------------------------------------------------------------------------------- stages


def build_judges(recipe: Recipe, path: Path) -> Judges:
    if path.exists():
        return Judges.load(path)
    judges = train_judges(recipe.judge_pool, recipe.judge_steps, seed=recipe.seed, no_object=recipe.judge_no_object,
                          colour_jitter=recipe.judge_colour_jitter)
    judges.save(path)
    return judges


def build_model(recipe: Recipe, path: Path, work: Path) -> None:
    """The model phases, exported; with an absence phase, the first phases' model is exported to
    work/model_base.safetensors (kept, so that the absence phase can be redone from it alone) and the absence phase
    continues from that file."""
    if path.exists():
        return
    t = time.time()
    base = work / "model_base.safetensors" if recipe.absence_phase else path
    provenance = {"recipe": "saemnesia_tools.comfyui.toy.build", "phases": recipe.model_phases}
    if not base.exists():
        previous = None
        for i, (weighting, schedule, stop_at, seed, text_aux) in enumerate(recipe.model_phases):
            run = work / f"model_phase{i + 1}"
            trainer = toy_train.train(run, schedule, recipe.model_batch, recipe.model_lr, seed, weighting, stop_at,
                                      init=previous, text_aux=text_aux)
            previous = run / "checkpoint.pt"
        toy_train.export(trainer, base, {**provenance, "seconds_this_run": round(time.time() - t, 1)})
    if recipe.absence_phase:
        weighting, schedule, stop_at, seed, text_aux, absence, lr = recipe.absence_phase
        trainer = toy_train.train(work / "model_absence", schedule, recipe.model_batch, lr, seed, weighting, stop_at,
                                  init=base, text_aux=text_aux, absence=absence)
        toy_train.export(trainer, path, {**provenance, "absence_phase": recipe.absence_phase,
                                         "seconds_this_run": round(time.time() - t, 1)})


def site_work(work: Path, site: assets.SAESite) -> Path:
    """The site's intermediate files (activations, SAE checkpoints)."""
    return work / site.hookpoint.removeprefix("unet.")


def absence_grid(repeats: int) -> list[PromptSpec]:
    """The prompts that name no object, each look once per repeat, labelled with their style alone (none for "An
    image."): the objects' absence for shift mode's directions (DESIGN §6.9)."""
    return [PromptSpec(make_prompt(None, s), {"style": s} if s else {}) for _ in range(repeats) for s in (*STYLES, None)]


def site_activations(model, encoder, recipe: Recipe, work: Path, site: assets.SAESite, split: str):
    """The site's labelled activations, collected once (a rerun resumes) into <site_work>/acts_<split>: "train" (the
    grid; the SAEs' training records), "heldout" (the grid at other seeds; the concept statistics' records) or
    "absence" (absence_grid at the held-out seeds; with "heldout", shift mode's directions)."""
    repeats, seed = {"train": (recipe.train_repeats, recipe.seed),
                     "heldout": (recipe.heldout_repeats, recipe.seed + HELDOUT_SEED_OFFSET),
                     "absence": (recipe.heldout_repeats, recipe.seed + HELDOUT_SEED_OFFSET)}[split]
    source = ComfyCaptureSource(model, lambda p: [[encoder(p), {}]], hookpoint=site.hookpoint,
                                steps=recipe.sample_steps, cfg=recipe.cfg, sampler="euler", scheduler="normal",
                                width=32, height=32, model_id="saemnesia-toy-world", model_family="toy")
    specs = absence_grid(repeats) if split == "absence" else saeuron_grid(list(OBJECTS), list(STYLES), repeats=repeats)
    return collect(source, specs, site_work(work, site) / f"acts_{split}", seed=seed, batch_size=72)


def build_saes(recipe: Recipe, models: Path, work: Path, model, encoder, site: assets.SAESite) -> None:
    """Activations at the site → unsupervised SAE → supervised fine-tune → both files with statistics. Each file
    is made only when missing: deleting the SAEmnesia file alone redoes the fine-tune from the shipped SAeUron
    file (the same unsupervised weights), e.g. after a change of the fine-tune's recipe."""
    saemnesia_path, saeuron_path = (assets.path(site.sae(method), models) for method in ("saemnesia", "saeuron"))
    if saemnesia_path.exists() and saeuron_path.exists():
        return
    t = time.time()
    train_data = site_activations(model, encoder, recipe, work, site, "train")
    heldout = site_activations(model, encoder, recipe, work, site, "heldout")
    work = site_work(work, site)
    activations = {"seconds": round(time.time() - t, 1), "train_records": ActivationDataset(train_data).num_records,
                   "heldout_records": ActivationDataset(heldout).num_records}

    train_sae_pair(train_data, heldout, work, TrainConfig(
        expansion_factor=recipe.expansion, k=recipe.k, batch_size=recipe.sae_batch_tokens, epochs=recipe.sae_epochs,
        seed=recipe.seed), SupervisedConfig(
        lr=recipe.supervised_lr, max_epochs=recipe.supervised_epochs, batch_records=recipe.supervised_batch,
        num_buckets=recipe.buckets, exclusivity=recipe.supervised_exclusivity, seed=recipe.seed),
        saemnesia_out=saemnesia_path, saeuron_out=saeuron_path, percentile=recipe.percentile, model_family="toy",
        provenance={"built_by": "saemnesia_tools.comfyui.toy.build", "recipe": asdict(recipe),
                    "activations": activations})


HELD_OUT_CENTRALISATION = "held-out activations, measured by the build"


def measure_centralisation(recipe: Recipe, models: Path, work: Path, model, encoder, site: assets.SAESite) -> None:
    """Centralisation per concept (DESIGN §4.4) of the unsupervised SAE (the SAeUron file) and the supervised one,
    with the supervised file's assignment, on the held-out activations (the statistics' records, those of
    benchmarks/studies/centralising_finetune.py): it replaces the trainer's record, made on its validation split of
    the training activations, and fills it in for files fine-tuned before the trainer made one. Skipped when done."""
    path = assets.path(site.saemnesia, models)
    sae_file = load_sae_file(path)
    if sae_file.provenance.get("centralisation_records") == HELD_OUT_CENTRALISATION:
        return
    heldout = site_activations(model, encoder, recipe, work, site, "heldout")
    unsupervised = load_sae_file(assets.path(site.saeuron, models)).build_sae(dtype=torch.float32)
    provenance = {**sae_file.provenance, "centralisation_records": HELD_OUT_CENTRALISATION,
                  "centralisation_before": centralisation(unsupervised, sae_file.concepts, heldout),
                  "centralisation_after": centralisation(sae_file.build_sae(dtype=torch.float32),
                                                         sae_file.concepts, heldout)}
    save_sae_file(replace(sae_file, provenance=provenance), path)


def add_directions(recipe: Recipe, models: Path, work: Path, model, encoder, site: assets.SAESite) -> None:
    """Shift mode's directions (DESIGN §6.9) into both of the site's SAE files, from the held-out grid and the
    prompts without objects at the site. Skipped for a file that has them."""
    paths = [assets.path(site.sae(method), models) for method in ("saemnesia", "saeuron")]
    files = {path: load_sae_file(path) for path in paths}
    if all(f.tables.directions is not None for f in files.values()):
        return
    data = [site_activations(model, encoder, recipe, work, site, split) for split in ("heldout", "absence")]
    for path, f in files.items():
        if f.tables.directions is None:
            directions = concept_directions(data, f.concepts, f.num_buckets)
            save_sae_file(replace(f, tables=replace(f.tables, directions=directions)), path)


def measure_erasure(recipe: Recipe, sae_path: Path, strength: float, model, vae, encoder: PromptEncoder,
                    judges: Judges, seen_without: dict) -> None:
    """Store in the SAE file, per concept, how well it erases that concept at `strength` (Concept.erasure): up to 8
    images showing the concept (an object in every style, a style on every object), judged without and with the
    erasure.
    The checklist shows it, so people see which concepts this SAE acts on. Skipped when recorded."""
    sae_file = load_sae_file(sae_path)
    if all(c.erasure is not None and c.erasure["strength"] == strength for c in sae_file.concepts):
        return
    loaded = load_sae_path(sae_path)

    def judged(m, cells):
        images = generate(m, vae, encoder, [make_prompt(o, s) for o, s in cells],
                          [ERASURE_SEED + i for i in range(len(cells))], steps=recipe.sample_steps, cfg=recipe.cfg)
        return list(zip(*judges.predict(images)))

    measured = []
    for c in tqdm(sae_file.concepts, desc=f"erasure per concept ({sae_path.name})"):
        cells, own, other = cells_showing(c, recipe.erasure_images)
        if c.label not in seen_without:
            seen_without[c.label] = sum(j[own] == cell[own] for j, cell in zip(judged(model, cells), cells))
        after = judged(erase_concepts(model, loaded, {c.label: strength}, strength), cells)
        measured.append(replace(c, erasure={
            "strength": strength, "images": len(cells), "seen_without": seen_without[c.label],
            "gone": sum(j[own] != cell[own] for j, cell in zip(after, cells)),
            "other_kept": sum(j[other] == cell[other] for j, cell in zip(after, cells))}))
    save_sae_file(replace(sae_file, concepts=measured), sae_path)


def build(models: Path, work: Path, recipe: Recipe) -> dict:
    """Every stage whose file is missing (or, for the erasure records, whose records are), then the report."""
    (models / "toy").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    judges = build_judges(recipe, assets.path(assets.JUDGES, models))
    model_path = assets.path(assets.MODEL, models)
    build_model(recipe, model_path, work)
    model, clip, vae = toy_model.load_toy_model(model_path)
    encoder, seen_without = PromptEncoder(clip), {}
    artifact_judge = functools.cache(lambda: fit_artifact_judge(recipe, model, vae, encoder, judges))
    build_text_sae(recipe, models, work, clip)
    for site in assets.ALL_SITES:
        build_saes(recipe, models, work, model, encoder, site)
        measure_centralisation(recipe, models, work, model, encoder, site)
        add_directions(recipe, models, work, model, encoder, site)
        supervised = assets.path(site.saemnesia, models)
        calibrate_strengths(recipe, supervised, site.groups, model, vae, encoder, judges, artifact_judge)
        # SAEmnesia at the node's default strength (calibrated at its site); SAeUron at the demo's strength for the
        # site's first group
        measure_erasure(recipe, supervised, -1.0, model, vae, encoder, judges, seen_without)
        measure_erasure(recipe, assets.path(site.saeuron, models), demo.GAMMAS[site.groups[0]], model, vae, encoder,
                        judges, seen_without)
    write_unlabelled(models)
    return write_report(models)


def write_unlabelled(models: Path) -> None:
    """assets.UNLABELLED_SAE: the object site's SAeUron weights with no concepts (the teaching example's SAE)."""
    path = assets.path(assets.UNLABELLED_SAE, models)
    if not path.exists():
        labelled = load_sae_file(assets.path(assets.SITES["object"].saeuron, models))
        save_sae_file(replace(labelled, concepts=[], tables=None, provenance={
            "built_by": "saemnesia_tools.comfyui.toy.build", "weights_of": assets.SITES["object"].saeuron}), path)


# ---------------------------------------------------------------------------------------------------- report


def quality_items(recipe: Recipe, judges: Judges) -> dict[str, list[tuple[str | None, str | None, int]]]:
    """The quality check's images as (object, style, seed), `recipe.quality_seeds` per prompt: "grid", every object
    in every look, from QUALITY_SEED; then "absence" (for judges that know NO_OBJECT), every look asked to show no
    object ("An image in Neon style.", "An image.")."""
    parts = {"grid": [(o, s) for o in OBJECTS for s in (*STYLES, None)] * recipe.quality_seeds}
    if judges.knows_no_object:
        parts["absence"] = [(None, s) for s in (*STYLES, None)] * recipe.quality_seeds
    items, seed = {}, QUALITY_SEED
    for part, cells in parts.items():
        items[part] = [(o, s, seed + i) for i, (o, s) in enumerate(cells)]
        seed += len(cells)
    return items


def judged_images(model, vae, encoder, judges: Judges, recipe: Recipe, items) -> list[str]:
    """What the judges see in the image of each (object, style, seed): "object/style"."""
    images = generate(model, vae, encoder, [make_prompt(o, s) for o, s, _ in items], [seed for *_, seed in items],
                      steps=recipe.sample_steps, cfg=recipe.cfg)
    return [f"{o}/{s}" for o, s in zip(*judges.predict(images))]


def quality_summary(recipe: Recipe, items: dict[str, list], judged: dict[str, list[str]]) -> dict:
    """The quality check's accuracies, tallied from what the judges saw in each image (which the report keeps)."""
    def share(part, hit) -> float:
        return sum(hit(item, *seen.split("/")) for item, seen in zip(items[part], judged[part])) / len(items[part])

    asked_style = lambda item, _, style: style == (item[1] or STYLE_CLASSES[-1])
    summary = {"object": share("grid", lambda item, obj, _: obj == item[0]), "style": share("grid", asked_style),
               "images": len(items["grid"]), "first_seed": items["grid"][0][2], "steps": recipe.sample_steps,
               "cfg": recipe.cfg, "sampler": "euler", "judged": judged["grid"]}
    if "absence" in items:
        summary["absence"] = {"no_object": share("absence", lambda item, obj, _: obj == NO_OBJECT),
                              "style": share("absence", asked_style), "images": len(items["absence"]),
                              "first_seed": items["absence"][0][2], "judged": judged["absence"]}
    return summary


def quality_check(model, vae, encoder, judges: Judges, recipe: Recipe) -> dict:
    """The judges' object and style accuracy on the model's images of the full grid and of the scenes asked to show
    no object."""
    items = quality_items(recipe, judges)
    return quality_summary(recipe, items, {part: judged_images(model, vae, encoder, judges, recipe, part_items)
                                           for part, part_items in items.items()})


def _minutes(seconds) -> float | None:
    return None if seconds is None else round(seconds / 60, 1)


CENTRALISATION_KEYS = ("centralisation_records", "centralisation_before", "centralisation_after")


def sae_report(models: Path, name: str) -> dict:
    """What a supervised SAE file (a site's, or the text encoder's) recorded about its training and that of the
    unsupervised SAE it was fine-tuned from (DESIGN §4), from its header."""
    supervised = read_header(assets.path(name, models)).provenance
    unsupervised = supervised["unsupervised"]
    report = {"activations": supervised.get("activations"),
              "unsupervised": {"steps": unsupervised["steps"], "tokens": unsupervised["tokens"],
                               "final": unsupervised["final"], "minutes": _minutes(unsupervised.get("seconds"))},
              "supervised": {"epochs": supervised["epochs"], "best_val_loss": supervised["best_val_loss"],
                             "minutes": _minutes(supervised.get("seconds")),
                             "selectivity_before": supervised["selectivity_before"],
                             "selectivity_after": supervised["selectivity_after"],
                             # DESIGN §4.4 (the records: only where the build measured it after the fine-tune)
                             **{key: supervised[key] for key in CENTRALISATION_KEYS if key in supervised}},
              "statistics": {k: v for k, v in supervised["statistics"].items() if k != "dataset"},
              "calibration": supervised.get("calibration"),  # DESIGN §6.7; absent from files made before it
              "assigned_latent_auroc": {group: {when: _summary(supervised[f"selectivity_{when}"], group)
                                                for when in ("before", "after")} for group in ("object", "style")}}
    return {key: value for key, value in report.items() if value is not None}


def _summary(selectivity: list[dict], group: str) -> dict:
    """Mean and worst AUROC of a group's assigned latents for their own concept (from the trainer's record)."""
    aurocs = [entry["auroc"] for entry in selectivity if entry["group"] == group]
    return {"mean": round(sum(aurocs) / len(aurocs), 3), "worst": round(min(aurocs), 3), "concepts": len(aurocs)}


def build_report(models: Path, quality: dict | None = None) -> dict:
    """The build report of the files in `models`: their recorded provenance, and the judges' and the model's
    accuracy measured again (deterministic on the same machine and thread count); `quality`, when given, stands in
    for the model's (the quality check, the slowest part)."""
    provenance = read_header(assets.path(assets.SITES["object"].saemnesia, models)).provenance
    recipe = Recipe(**provenance["recipe"])
    judges = Judges.load(assets.path(assets.JUDGES, models))
    model_path = assets.path(assets.MODEL, models)
    with safe_open(str(model_path), framework="pt") as f:
        model_provenance = json.loads(f.metadata()["provenance"])
    if quality is None:
        model, clip, vae = toy_model.load_toy_model(model_path)
        quality = quality_check(model, vae, PromptEncoder(clip), judges, recipe)
    return {
        "written_by": "python -m saemnesia_tools.comfyui.toy.build --report-only",
        "recipe": provenance["recipe"],  # as the build recorded it (fields added since take their defaults above)
        "judges": {"held_out_renders": held_out_accuracy(
            judges, recipe.judges_heldout, recipe.seed + JUDGES_HELDOUT_OFFSET)},
        "model": model_provenance,
        "quality": quality,
        "saes": {site.hookpoint: {"groups": list(site.groups), **sae_report(models, site.saemnesia)}
                 for site in assets.ALL_SITES},
        **({"text_sae": {"hookpoint": assets.TEXT_HOOKPOINT, **sae_report(models, assets.TEXT_SAE)}}
           if assets.path(assets.TEXT_SAE, models).exists() else {}),
    }


def write_report(models: Path, quality: dict | None = None) -> dict:
    report = build_report(models, quality)
    write_json_atomic(assets.path(assets.BUILD_REPORT, models), report)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=assets.MODELS, help="the models folder the shipped files go to")
    p.add_argument("--work", type=Path, help="intermediate files (default: <out>/../runs/toy_build)")
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny size (for CI)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the build report from the shipped files")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        report = write_report(args.out)
    else:
        recipe = Recipe.smoke() if args.smoke else Recipe()
        work = args.work or (args.out.parent / "runs" / ("toy_build_smoke" if args.smoke else "toy_build"))
        report = build(args.out, work, recipe)
    print(json.dumps({k: v for k, v in report.items() if k not in ("recipe", "saes")}, indent=1))


if __name__ == "__main__":
    main()
