"""The toy build's strength calibration (DESIGN §6.7): per concept, the κ at which the node's default strength
erases cleanly, judged by the toy world's judges and an artifact judge fitted on the model's own images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from saemnesia_core.concepts import with_calibrations
from saemnesia_core.sae_file import load_sae_file, save_sae_file
from saemnesia_tools.toy.evaluation.protocol import quality_items
from saemnesia_tools.toy.evaluation.quality import ArtifactJudge, removed
from saemnesia_tools.toy.judges import Judges
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from .recipe import Recipe
from .sampling import PromptEncoder, generate


CALIBRATION_SEED = 8_000_000      # the strength calibration's first seed (apart from every evaluation set)
ARTIFACT_SEED = 9_000_000         # the calibration's artifact judge: the model's own un-erased images from here


def cells_showing(concept, count: int) -> tuple[list[tuple[str, str]], int, int]:
    """Up to `count` grid cells showing `concept` (an object in every style, a style on every object), and where
    the concept and the other group sit in a cell's (object, style)."""
    cells = [(concept.label, s) for s in STYLES] if concept.group == "object" else [(o, concept.label) for o in OBJECTS]
    return cells[:count], *((0, 1) if concept.group == "object" else (1, 0))


def fit_artifact_judge(recipe: Recipe, model, vae, encoder: PromptEncoder, judges: Judges) -> ArtifactJudge:
    """The evaluation's artifact judge (DESIGN §9.1), fitted as the evaluation fits it but on the model's own
    un-erased grid images at seeds of the build's own (`recipe.artifact_seeds` per prompt, and one more to set its
    thresholds)."""
    fit, calibration = quality_items(ARTIFACT_SEED, recipe.artifact_seeds)
    images = generate(model, vae, encoder, [i.prompt for i in fit + calibration], [i.seed for i in fit + calibration],
                      steps=recipe.sample_steps, cfg=recipe.cfg)
    return ArtifactJudge.fit(judges, (images[:len(fit)], fit), images[len(fit):])


def calibrate_strengths(recipe: Recipe, sae_path: Path, groups: tuple[str, ...], model, vae, encoder: PromptEncoder,
                        judges: Judges, artifact_judge: Callable[[], ArtifactJudge]) -> None:
    """Store κ (Concept.calibration, DESIGN §6.7) for each concept of `groups` (those the file's site erases): the
    κ of `recipe.kappas`, or none (the papers' formula), at which the node's default strength, −1, gave the most
    clean erasures (the concept removed, not replaced: `quality.removed`; the other group's concept kept; the image not
    flagged by `artifact_judge()`) on `recipe.erasure_images` images per concept (seeds CALIBRATION_SEED…), ties
    broken by `choose_kappa`. The counts go in the provenance, with the judges-only counts. Counts recorded under
    the same protocol are not measured again: the choice is made from them, so a change of `choose_kappa` reaches
    the file without new images."""
    kappas = recipe.kappas
    sae_file = load_sae_file(sae_path)
    chosen = [c for c in sae_file.concepts if c.group in groups]
    protocol = {"kappas": list(kappas), "strength": -1.0, "first_seed": CALIBRATION_SEED,
                "images": len(cells_showing(chosen[0], recipe.erasure_images)[0]),
                "criterion": CRITERION,
                "artifact_judge": {"first_seed": ARTIFACT_SEED, "seeds_per_prompt": recipe.artifact_seeds,
                                   "prompts": "the grid and no object"}}
    recorded = sae_file.provenance.get("calibration") or {}
    if ({key: recorded.get(key) for key in protocol} == protocol
            and all(c.label in recorded["clean_erasures"] for c in chosen)):
        counts = {key: recorded[key] for key in COUNTS}
    else:
        counts = measure_clean_erasures(recipe, sae_path, chosen, model, vae, encoder, judges, artifact_judge(),
                                        kappas)
    best = {c.label: choose_kappa(kappas, counts["clean_erasures"][c.label],
                                  counts["judges_only_clean_erasures"][c.label],
                                  counts["uncalibrated_clean_erasures"][c.label]) for c in chosen}
    concepts = with_calibrations(sae_file.concepts, best)
    record = {**protocol, **counts, "chosen": best}
    if concepts == sae_file.concepts and recorded == record:
        return
    provenance = {**sae_file.provenance, "calibration": record}
    save_sae_file(replace(sae_file, concepts=concepts, provenance=provenance), sae_path)


COUNTS = ("clean_erasures", "judges_only_clean_erasures", "uncalibrated_clean_erasures")
CRITERION = ("concept removed (no object left / unstyled), other group's concept kept, image not flagged by the "
             "artifact judge")


def measure_clean_erasures(recipe: Recipe, sae_path: Path, concepts, model, vae, encoder: PromptEncoder,
                           judges: Judges, artifacts: ArtifactJudge, kappas) -> dict:
    """Per concept, the clean erasures at γ = −1 (and those the judges alone count) for each κ of `kappas`, the scan
    stopping at the first κ that erases every image cleanly, and for the papers' formula (no κ)."""
    clean: dict[str, list[int]] = {}
    judges_only: dict[str, list[int]] = {}
    uncalibrated: dict[str, dict] = {}
    loaded = load_sae_path(sae_path)
    for c in tqdm(concepts, desc=f"strength calibration ({sae_path.name})"):
        cells, own, other = cells_showing(c, recipe.erasure_images)
        prompts, seeds = [make_prompt(o, s) for o, s in cells], [CALIBRATION_SEED + i for i in range(len(cells))]

        def erasures(kappa) -> tuple[int, int]:  # at γ = −1 with this κ for c (None: the papers' formula)
            trial = loaded.with_calibrations({c.label: kappa})
            images = generate(erase_concepts(model, trial, {c.label: -1.0}, -1.0), vae, encoder, prompts, seeds,
                              steps=recipe.sample_steps, cfg=recipe.cfg)
            judged = list(zip(*judges.predict(images)))
            gone = removed(artifacts, [j[own] for j in judged], images, c.group).tolist()
            erased = [g and j[other] == cell[other] for g, j, cell in zip(gone, judged, cells)]
            flagged = artifacts.flags(images).tolist()
            return sum(e and not f for e, f in zip(erased, flagged)), sum(erased)

        uncalibrated[c.label] = dict(zip(("clean_erasures", "judges_only"), erasures(None)))
        clean[c.label], judges_only[c.label] = [], []
        for kappa in kappas:  # larger κ cannot beat a κ that erased every image cleanly
            unflagged, by_judges = erasures(kappa)
            clean[c.label].append(unflagged)
            judges_only[c.label].append(by_judges)
            if unflagged == len(cells):
                break
    return dict(zip(COUNTS, (clean, judges_only, uncalibrated)))


def choose_kappa(kappas, clean: list[int], judges_only: list[int], uncalibrated: dict | None = None) -> float | None:
    """The κ with the most clean erasures; among equals, the most the judges alone count (where the artifact judge
    flags every erasure, the judges' choice), then the smaller κ. None (no κ: the papers' formula, DESIGN §6.1) when
    `uncalibrated`, its counts on the same images, does as well: a κ is stored only where it erases better."""
    best = max(range(len(clean)), key=lambda i: (clean[i], judges_only[i], -i))
    formula = uncalibrated and (uncalibrated["clean_erasures"], uncalibrated["judges_only"])
    if formula and formula >= (clean[best], judges_only[best]):
        return None
    return kappas[best]
