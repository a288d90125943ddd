"""What the demo shows and how its rows are judged: shared by `scripts/demo.py` (the real ComfyUI server) and the
example workflows.

Each row is one prompt "An image of {object} in {style} style." at one seed, in four columns: the original, the
object erased (with the object-site SAE), the style erased (with the style-site SAE), and both (two chained Erase
Concepts nodes), every Erase Concepts node at its defaults (DEFAULT_EDIT). The judges name the object and the style
of every image.
"""

from __future__ import annotations

from saemnesia_core.concepts import DEFAULT_EDIT

from .judges import NO_OBJECT, UNSTYLED
from .render import OBJECTS, STYLES

COLUMNS = ("original", "erase object", "erase style", "erase both")
SEED = 7
# The papers' formula's strength γ per group for the SAeUron files, which have no calibration (the build records how
# each erases at it): −1 is too gentle for objects at the toy's 8x8 block and far too strong for styles at its 16x16
# block (benchmarks/studies/style_gamma_sweep.py). The demo itself erases at the node's default (DEFAULT_EDIT).
GAMMAS = {"object": -5.0, "style": -0.2}
# The evaluation's fitted artifact judge (written by `saemnesia eval`): the demo flags broken images with it.
ARTIFACT_JUDGE = "benchmarks/results/eval_quick/artifact_judge.safetensors"
# Rows shown: the first six of a list fixed by rule before any result of the world with absence was seen: the i-th
# object in the i-th style, in the renderer's orders (no choosing rows that happen to work).
PAIRS = tuple(zip(OBJECTS, STYLES))
CASES = PAIRS[:6]

OUTCOMES = {
    "original_recognised": "original: object and style recognised",
    "object_removed_style_kept": "erase object: no object left, style kept",
    "style_removed_object_kept": "erase style: unstyled, object kept",
    "both_removed": "erase both: no object left and unstyled",
}


def prompt(obj: str, style: str) -> str:
    return f"An image of {obj} in {style} style."


def erasures(obj: str, style: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per column, what is erased: {group: {concept: γ}}."""
    o, s = {"object": {obj: DEFAULT_EDIT.strength}}, {"style": {style: DEFAULT_EDIT.strength}}
    return dict(zip(COLUMNS, ({}, o, s, {**o, **s})))


def outcomes(obj: str, style: str, judged: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """A row's outcomes (OUTCOMES) from what the judges saw per column: {column: (object, style)}. An erased concept
    counts only when removed (RM, DESIGN §9): another object or style in its place is not."""
    def seen(column, expected_object=obj, expected_style=style):
        return judged[column][0] == expected_object, judged[column][1] == expected_style

    return {"original_recognised": seen("original") == (True, True),
            "object_removed_style_kept": seen("erase object", NO_OBJECT) == (True, True),
            "style_removed_object_kept": seen("erase style", obj, UNSTYLED) == (True, True),
            "both_removed": seen("erase both", NO_OBJECT, UNSTYLED) == (True, True)}


def tally(rows: list[dict[str, bool]]) -> dict[str, int]:
    """How many rows have each outcome."""
    return {key: sum(row[key] for row in rows) for key in OUTCOMES}
