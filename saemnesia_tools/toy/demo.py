"""What the demo shows and how its rows are judged: shared by `scripts/demo.py` (the real ComfyUI server), the
pool study that chose its rows (`benchmarks/studies/demo_pool.py`, in-process) and the example workflows.

Each row is one prompt "An image of {object} in {style} style." at one seed, in four columns: the original, the
object erased (with the object-site SAE), the style erased (with the style-site SAE), and both (two chained Erase
Concepts nodes). The judges name the object and the style of every image.
"""

from __future__ import annotations

from .render import OBJECTS, STYLES

COLUMNS = ("original", "erase object", "erase style", "erase both")
SEED = 7
# Strengths γ per group, one for every concept of the group: SAEmnesia's −1 is too gentle for objects at the toy's
# 8x8 block and far too strong for styles at its 16x16 block, where it wipes the image; −0.2 erases some styles
# cleanly there (benchmarks/studies/style_gamma_sweep.py).
GAMMAS = {"object": -5.0, "style": -0.2}
# Edit mode per group (saemnesia_core.eraser.MODES): the one the quick evaluation found serves users best, by clean
# erasure (README, "Evaluation"). Replace mode runs at the evaluation's one setting, −1 (every detected token fully
# replaced); exact mode at GAMMAS.
MODES = {"object": "replace", "style": "replace"}
# The evaluation's fitted artifact judge (written by `saemnesia eval`): the demo flags broken images with it.
ARTIFACT_JUDGE = "benchmarks/results/eval_quick/artifact_judge.safetensors"
# Rows shown: the first six of a list fixed by rule before any result of the world with absence was seen: the i-th
# object in the i-th style, in the renderer's orders (no choosing rows that happen to work).
PAIRS = tuple(zip(OBJECTS, STYLES))
CASES = PAIRS[:6]
POOL_STYLES = ("Stripes", "Dots", "Outline", "Gradient")  # the pool study's styles (benchmarks/studies/demo_pool.py)

OUTCOMES = {
    "original_recognised": "original: object and style recognised",
    "object_gone_style_kept": "erase object: object gone, style kept",
    "style_gone_object_kept": "erase style: style gone, object kept",
    "both_gone": "erase both: object and style gone",
}


def prompt(obj: str, style: str) -> str:
    return f"An image of {obj} in {style} style."


def strength(group: str) -> float:
    """The demo's strength for a group's concepts, in that group's mode."""
    return -1.0 if MODES[group] == "replace" else GAMMAS[group]


def erasures(obj: str, style: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per column, what is erased: {group: {concept: γ}}."""
    o, s = {"object": {obj: strength("object")}}, {"style": {style: strength("style")}}
    return dict(zip(COLUMNS, ({}, o, s, {**o, **s})))


def outcomes(obj: str, style: str, judged: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """A row's outcomes (OUTCOMES) from what the judges saw per column: {column: (object, style)}."""
    def seen(column):
        return judged[column][0] == obj, judged[column][1] == style

    return {"original_recognised": seen("original") == (True, True),
            "object_gone_style_kept": seen("erase object") == (False, True),
            "style_gone_object_kept": seen("erase style") == (True, False),
            "both_gone": seen("erase both") == (False, False)}


def tally(rows: list[dict[str, bool]]) -> dict[str, int]:
    """How many rows have each outcome."""
    return {key: sum(row[key] for row in rows) for key in OUTCOMES}
