"""How the evaluation scores judged images: UnlearnCanvas' UA, IRA and CRA adapted to the toy world, SAeUron's
(UA + IRA)/2 selection criterion, and the per-method summary (DESIGN §9)."""

from __future__ import annotations

from collections import Counter

from .protocol import METHODS, OBJECT, QUALITY_METRICS, STYLE, Judged, Protocol, configurations_searched

DEFINITIONS = """\
object target c:  UA  = share of c's images (every style and unstyled) not judged c
                  IRA = object accuracy on the other objects' images
                  CRA = style accuracy on every styled image (c's included)
style target s:   UA  = share of s's images not judged s
                  IRA = style accuracy on the other styles' images (unstyled images excluded)
                  CRA = object accuracy on every image (SAeUron counts only the unstyled ones)
several erased concepts (sequential): UA pools the erased concepts' images, IRA the rest of the group's
image quality:    AR  = share of the target's images the artifact judge flags as broken (quality.py)
                  CE  = clean erasure: share of the target's images with the target gone and not flagged
                  RM  = removed, not replaced: share of the target's images with no object left (the artifact
                        judge's nearest class an empty background; the object judge always names an object)
                        for an object target, judged unstyled for a style target
                  KID = kernel inception distance (×10³ in tables) of the other images to the model's own
                        un-erased images of their prompts at another seed"""

METRICS = ("UA", "IRA", "CRA")


def mean(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def erasure_metrics(judged: list[Judged], group: str, erased) -> dict[str, float | None]:
    """UA, IRA, CRA (DEFINITIONS) after erasing the concepts `erased` of `group`; None when no
    image qualifies (e.g. IRA once every concept of the group is erased)."""
    erased = set(erased)
    ua = mean(j.predicted(group) != j.item.concept(group) for j in judged if j.item.concept(group) in erased)
    ira = mean(j.predicted(group) == j.item.concept(group) for j in judged
               if j.item.concept(group) is not None and j.item.concept(group) not in erased)
    if group == OBJECT:
        cra = mean(j.style == j.item.style for j in judged if j.item.style is not None)
    else:
        cra = mean(j.obj == j.item.obj for j in judged)
    return {"UA": ua, "IRA": ira, "CRA": cra}


def judged_as(judged: list[Judged], group: str, concept: str) -> dict[str, int]:
    """What the judges saw in the target's images, most frequent first: for a style, "Unstyled" means the style was
    removed and another style that it was replaced (steered); the object judge always names one of the objects."""
    return dict(Counter(j.predicted(group) for j in judged if j.item.concept(group) == concept).most_common())


def selection_score(metrics: dict) -> float:
    """SAeUron's sweep criterion: (UA + IRA)/2."""
    return (metrics["UA"] + metrics["IRA"]) / 2


def best_candidate(candidates: list[dict]) -> dict:
    """The candidate with the highest selection score; ties go to the earliest (max keeps the first; the grids
    list the gentlest setting first)."""
    return max(candidates, key=lambda c: c["score"])


def average(rows: list[dict]) -> dict[str, float | None]:
    return {m: mean(r[m] for r in rows if r.get(m) is not None) for m in METRICS + QUALITY_METRICS}


def summarize(targets: dict, protocol: Protocol) -> dict:
    """Per method: UA/IRA/CRA averaged over each group's targets, the mean of all six, configurations searched."""
    summary = {}
    for method in METHODS:
        entry = {"configurations_searched": configurations_searched(method, protocol)}
        for group, per_concept in targets.items():
            if per_concept:
                entry[group] = average([t["test"][method] for t in per_concept.values()])
        values = [entry[g][m] for g in (OBJECT, STYLE) if g in entry for m in METRICS if entry[g][m] is not None]
        entry["average"] = mean(values)
        entry["rephrased_UA"] = mean(t["rephrased_UA"][method] for pc in targets.values() for t in pc.values()
                                     if t["rephrased_UA"][method] is not None)
        summary[method] = entry
    return summary
