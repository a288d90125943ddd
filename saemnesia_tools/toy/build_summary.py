# SPDX-License-Identifier: GPL-3.0-or-later
"""The README's lines about the shipped SAEs, written from the build report (models/toy/build_report.json), so
that the numbers people read are the ones the build recorded; tests/test_repository.py checks the README shows
them as written."""

from __future__ import annotations

from saemnesia_tools.toy.render import OBJECTS, STYLES
from saemnesia_tools.training.centralisation import AUROC_THRESHOLD


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _auroc(summary: dict) -> str:
    return f"{summary['mean']:.3f} (worst {summary['worst']:.3f})"


def _centralisation(rows: list[dict], group: str) -> tuple[float, float]:
    """Mean share of the mean difference and mean count of other latents above the threshold, over a group."""
    rows = [r for r in rows if r["group"] == group]
    return (sum(r["mean_difference_share"] for r in rows) / len(rows),
            sum(r["other_latents_above"] for r in rows) / len(rows))


def _calibration(calibration: dict) -> str:
    """The chosen κ (none: the papers' formula, DESIGN §6.7) and the clean erasures at them, against the formula's."""
    chosen, uncalibrated = calibration["chosen"], calibration["uncalibrated_clean_erasures"]

    def at_choice(label: str) -> tuple[int, int]:
        if chosen[label] is None:
            return uncalibrated[label]["clean_erasures"], uncalibrated[label]["judges_only"]
        i = calibration["kappas"].index(chosen[label])
        return calibration["clean_erasures"][label][i], calibration["judges_only_clean_erasures"][label][i]

    clean, judged = (sum(counts) for counts in zip(*map(at_choice, chosen)))
    images = calibration["images"] * len(chosen)
    kappas = ", ".join(f"{label} {'none' if k is None else f'{k:g}'}" for label, k in sorted(chosen.items()))
    return (f"calibrated strengths: κ {kappas} (none: the papers' formula); at these, {clean} of {images} "
            f"images erased cleanly and not flagged ({judged} counting what the judges alone see), against "
            f"{sum(u['clean_erasures'] for u in uncalibrated.values())} "
            f"({sum(u['judges_only'] for u in uncalibrated.values())}) with the papers' formula at γ = −1")


def _training(hookpoint: str, what: str, sae: dict, groups: tuple[str, ...], zeta: float) -> list[str]:
    """The unsupervised SAE's fit, and the fine-tune's AUROC of each group's assigned latents, before → after."""
    unsupervised, supervised, auroc = sae["unsupervised"], sae["supervised"], sae["assigned_latent_auroc"]
    final = unsupervised["final"]
    return [f"`{hookpoint}` ({what}): the unsupervised SAE reaches FVU {final['fvu']:.4f} at L0 = {final['l0']:g} "
            f"after {unsupervised['steps']:,} steps ({unsupervised['minutes']} min; {_pct(final['dead_fraction'])} of "
            f"latents dead)",
            f"the fine-tune (ζ = {zeta:g}, {supervised['epochs']} epochs, {supervised['minutes']} min) takes the AUROC "
            "of the assigned latents for their own concept from before to after, "
            + ", ".join(f"{g}s' {_auroc(auroc[g]['before'])} → {_auroc(auroc[g]['after'])}" for g in groups)]


def site_line(report: dict, hookpoint: str) -> str:
    """One site's training, centralisation and calibration numbers, as one README list item."""
    site = report["saes"][hookpoint]
    groups, supervised = site["groups"], site["supervised"]
    others = tuple(g for g in ("object", "style") if g not in groups)
    parts = _training(hookpoint, " and ".join(f"{g}s" for g in groups), site, (*groups, *others),
                      report["recipe"].get("supervised_exclusivity", 0))
    if "centralisation_after" in supervised:
        shares = []
        for group in groups:
            (share_before, others_before), (share_after, others_after) = (
                _centralisation(supervised[f"centralisation_{when}"], group) for when in ("before", "after"))
            shares.append(f"{_pct(share_before)} of their {group}'s mean difference before the fine-tune and "
                          f"{_pct(share_after)} after, with {others_before:.1f} other latents per {group} before and "
                          f"{others_after:.1f} after above AUROC {AUROC_THRESHOLD:g}")
        parts.append(f"centralisation ({supervised['centralisation_records']}): the assigned latents carry on average "
                     + "; ".join(shares))
    if "calibration" in site:
        parts.append(_calibration(site["calibration"]))
    return "- " + "; ".join(parts) + "."


def text_line(report: dict) -> str:
    """The text encoder's SAE (DESIGN §6.8), as one README list item."""
    sae = report["text_sae"]
    parts = _training(sae["hookpoint"], f"text encoder, objects and styles; {sae['activations']['records']} prompts",
                      sae, ("object", "style"), report["recipe"].get("supervised_exclusivity", 0))
    return "- " + "; ".join(parts) + "."


def model_line(report: dict) -> str:
    """The model's quality on its own images, judged (and, for judges with the no-object class, asked for no
    object), and the judges' accuracy on held-out renders, as one paragraph of the toy-world page."""
    quality, judges = report["quality"], report["judges"]["held_out_renders"]
    prompts = len(OBJECTS) * (len(STYLES) + 1)
    line = (f"On its own generations of the full grid ({prompts} prompts, {quality['images'] // prompts} seeds, Euler {quality['steps']} steps, cfg {quality['cfg']:g}) the judges "
            f"recognise the object in {_pct(quality['object'])} and the style in {_pct(quality['style'])} of "
            f"{quality['images']} images.")
    if "absence" in quality:
        absence = quality["absence"]
        line += (f" Asked for no object (\"An image in Neon style.\" for each style, \"An image.\"; "
                 f"{absence['images']} images) it draws none in {_pct(absence['no_object'])} of them, in the asked "
                 f"look in {_pct(absence['style'])}.")
    line += (f" The judges, on {judges['n']:,} held-out renders: object {_pct(judges['object'])}, style "
             f"{_pct(judges['style'])}")
    if "no_object" in judges:
        line += f"; the {judges['no_object_n']} empty scenes among them judged empty in {_pct(judges['no_object'])}"
    return line + "."


def sae_lines(report: dict) -> str:
    lines = [site_line(report, hookpoint) for hookpoint in report["saes"]]
    return "\n".join(lines + ([text_line(report)] if "text_sae" in report else []))
