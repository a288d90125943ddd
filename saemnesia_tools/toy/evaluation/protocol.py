"""What the evaluation generates: the test grid, the selection and rephrasing sets, their seeds, the methods
compared and the settings that change an image (DESIGN §9).

Each object and each style is erased in turn; the test set is the full grid (every object in every style and
unstyled, the papers' prompt form) with fixed seeds. Methods, side by side:

- none: no erasure (the ceiling for IRA and CRA);
- SAEmnesia: the supervised SAE's assigned latent, γ per concept from the γ grid chosen by (UA + IRA)/2 on a
  selection set (other seeds), and the single γ = −1 for every concept, in exact mode (with the file's calibrated
  strengths, DESIGN §6.7, where it has them, and once more without them) and in paper mode;
- SAeUron mode: the unsupervised SAE, latents by score at the percentiles that keep 1, 2 and 3 latents per
  bucket (as 99.999 / 99.995 / 99.99 do of 20480, DESIGN §5.2) × the same γ grid, chosen the same way;
- SAEmnesia, multi-site: the node's default (γ = −1, calibrated, exact) at every block that reads the group (the
  group's SAEmnesia files chained, `assets.MULTI_SITE`, DESIGN §6.6);
- SAEmnesia, replace: the same SAE as a detector only; detected tokens take the nearest undetected token's
  activations (DESIGN §6.4), one setting for every concept (strength −1: replace fully), no search;
- SAEmnesia, text encoder: the toy's text SAE (one file for objects and styles, at a layer of the CLIP text
  encoder, DESIGN §6.8) erases the concept in the conditioning before sampling; γ = −1 and γ tuned as above;
- negative prompt: the concept's word as ComfyUI's negative conditioning, no patch.

Every method is also scored for image quality (quality.py): an artifact rate on the target's images, and KID of
the other images against renders of their prompts. The artifact judge is fitted on the model's own un-erased
images of the quality set (its own seeds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from saemnesia_core.concepts import DEFAULT_EDIT

from ..prompts import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, make_prompt
from ..render import OBJECTS, STYLES

OBJECT, STYLE = "object", "style"
GROUP_CONCEPTS = {OBJECT: OBJECTS, STYLE: STYLES}
LOOKS = (*STYLES, None)  # a grid row: the object in every style, then unstyled
GAMMAS = (-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0)
PAPER_PERCENTILES = {1: 99.999, 2: 99.995, 3: 99.99}  # SAeUron latents per bucket each keeps of 20480
# Seed bases, disjoint from the toy build's (SAE training 0…, held-out statistics 1e6…, quality check 1e4…)
TEST_SEED, SELECT_SEED, REPHRASE_SEED, QUALITY_SEED = 2_000_000, 3_000_000, 4_000_000, 7_000_000
QUALITY_FIT_SEEDS = 2  # un-erased images per grid prompt the artifact judge is fitted on (one more calibrates it)

SAE_METHODS = ("saemnesia", "saeuron")  # UNet-side SAEs, one file per group (assets.SITES)
TEXT = "text"  # Setting.sae's method for the text-encoder SAE, one file for both groups (assets.TEXT_SAE)
MULTI_SITE = "multisite"  # Setting.sae's method for the group's SAEmnesia files at every block (assets.MULTI_SITE)
ENCODER_BLOCK = "encoder"  # Setting.sae's method for the encoder block's SAEmnesia file alone (assets.ENCODER_SITE)
METHODS = {  # name -> (label in reports, configurations searched per concept)
    "none": ("no erasure", None),
    "saemnesia": ("SAEmnesia (γ tuned)", "gammas"),
    "saemnesia_gamma1": ("SAEmnesia (γ = −1)", 1),
    # the same setting at every block that reads the group (the group's SAEmnesia files chained, DESIGN §6.6)
    "saemnesia_multisite": ("SAEmnesia, multi-site (γ = −1)", 1),
    # the papers' z·γ·μ on the same file, its calibrations ignored (DESIGN §6.7): what γ = −1 did before them
    "saemnesia_uncalibrated": ("SAEmnesia, uncalibrated (γ = −1)", 1),
    # the formula of the released hooks (2·x̂ − x + change, DESIGN §6.1), so rows compare with the papers' tables
    "saemnesia_paper": ("SAEmnesia, paper mode (γ tuned)", "gammas"),
    "saemnesia_paper_gamma1": ("SAEmnesia, paper mode (γ = −1)", 1),
    "saeuron": ("SAeUron mode (tuned)", "kept×gammas"),
    "replace": ("SAEmnesia, replace", 1),
    # the text-encoder SAE (DESIGN §6.8): the prompt's conditioning is edited, the UNet runs unpatched
    "text": ("SAEmnesia, text encoder (γ tuned)", "gammas"),
    "text_gamma1": ("SAEmnesia, text encoder (γ = −1)", 1),
    "negative": ("negative prompt", 1),
    # Erase Concepts at its defaults (DEFAULT_EDIT: mode, branches, γ) with the group's SAEmnesia file: the row the
    # bar holds (one of the rows above when the defaults are theirs; then its images come from the cache)
    "default": ("the node's default", 1),
}
QUALITY_METRICS = ("AR", "CE", "RM", "KID")


@dataclass(frozen=True)
class Item:
    """One image: an object (None = none, for the artifact judge's own images) in a style (None = unstyled), its
    seed, and the wording (None = the papers' form)."""

    obj: str | None
    style: str | None
    seed: int
    template: int | None = None  # index into HELD_OUT_TEMPLATES

    @property
    def prompt(self) -> str:
        template = TRAIN_TEMPLATES[0] if self.template is None else HELD_OUT_TEMPLATES[self.template]
        return make_prompt(self.obj, self.style, template)

    def concept(self, group: str) -> str | None:
        return self.obj if group == OBJECT else self.style


@dataclass(frozen=True)
class Judged:
    """An item and what the judges saw in its image (style "Unstyled" for none)."""

    item: Item
    obj: str
    style: str

    def predicted(self, group: str) -> str:
        return self.obj if group == OBJECT else self.style


@dataclass(frozen=True)
class Setting:
    """What changes the images: which SAE erases what, or a negative prompt. `sae` is (method, group): the SAE
    file of SAE_METHODS that erases that group's concepts (assets.SITES), (MULTI_SITE, group) for the group's
    SAEmnesia files at every block that reads it (assets.MULTI_SITE), (ENCODER_BLOCK, group) for the encoder
    block's file alone, or (TEXT, group) for the text-encoder SAE; `erase` holds (label, γ, latents kept per bucket
    — SAeUron only, 0 for SAEmnesia). `site_strengths`: a multi-site edit's γ per file in the chain's order, one
    Erase Concepts node per block (empty: `erase`'s γ at every block); `text_strength`: the text-encoder SAE also
    erases the same labels, at this γ in exact mode, in the prompts' conditioning (0: not at all)."""

    sae: tuple[str, str] | None = None
    erase: tuple[tuple[str, float, int], ...] = ()
    negative: str = ""
    mode: str = "exact"  # the eraser's mode (DESIGN §6)
    uncalibrated: bool = False  # ignore the SAE file's calibrations (DESIGN §6.7)
    branches: str = "both"  # the CFG branches edited (shift mode moves the cond branch, DESIGN §6.9)
    site_strengths: tuple[float, ...] = ()
    text_strength: float = 0.0

    def key(self) -> dict:
        """What identifies the images (fields at the default of one added later are left out, so that the images of
        settings made before it keep their cache)."""
        later = {"uncalibrated": False, "branches": "both", "site_strengths": (), "text_strength": 0.0}
        return {k: v for k, v in asdict(self).items() if k not in later or v != later[k]}


@dataclass(frozen=True)
class Protocol:
    """Everything one run generates; QUICK and FULL differ only here. Defaults are the full protocol."""

    object_targets: tuple[str, ...] = OBJECTS
    style_targets: tuple[str, ...] = STYLES
    test_seeds: int = 5            # images per grid prompt in the test set (UnlearnCanvas: 5 seeds)
    select_seeds: int = 1          # images per prompt in the selection set
    select_others: int = 9         # images per other concept of the group in the selection set (the target: all)
    rephrase_seeds: int = 2        # images per rephrased prompt of the target
    steps: int = 25
    cfg: float = 5.0
    gammas: tuple[float, ...] = GAMMAS
    kept: tuple[int, ...] = (1, 2, 3)  # SAeUron latents per bucket

    def targets(self) -> list[tuple[str, tuple[str, ...]]]:
        """(group, targets) for each group with targets."""
        return [(g, t) for g, t in ((OBJECT, self.object_targets), (STYLE, self.style_targets)) if t]


FULL = Protocol()
# Quick: 4 of 8 targets per group (every other one), one seed per prompt, γ ∈ {−1, −5, −15, −30}, 1 or 2 SAeUron
# latents per bucket.
QUICK = Protocol(object_targets=OBJECTS[::2], style_targets=STYLES[::2], test_seeds=1, select_seeds=1,
                 select_others=1, rephrase_seeds=1, steps=25, gammas=(-1.0, -5.0, -15.0, -30.0), kept=(1, 2))


def default_setting(group: str, concept: str) -> Setting:
    """Erase Concepts at its defaults (DEFAULT_EDIT) erasing `concept` with its group's SAEmnesia file."""
    return Setting(("saemnesia", group), ((concept, DEFAULT_EDIT.strength, 0),), mode=DEFAULT_EDIT.mode,
                   branches=DEFAULT_EDIT.branches)


def _grid_index(obj: str | None, style: str | None) -> int:
    """The cell's place in the grid; the scenes without an object (obj None) follow it."""
    return (len(OBJECTS) if obj is None else OBJECTS.index(obj)) * len(LOOKS) + LOOKS.index(style)


def _item(obj: str, style: str | None, rep: int, base: int, template: int | None = None) -> Item:
    """Seeds depend only on (prompt, repetition, set): the same image recurs wherever that prompt does."""
    return Item(obj, style, base + 100 * rep + _grid_index(obj, style), template)


def grid_items(seeds: int) -> list[Item]:
    """The full grid, `seeds` images per prompt."""
    return [_item(o, s, r, TEST_SEED) for r in range(seeds) for o in OBJECTS for s in LOOKS]


def _target_cells(group: str, concept: str) -> list[tuple[str, str | None]]:
    """Every grid cell showing the concept: an object in all looks, or a style on all objects."""
    return [(concept, s) for s in LOOKS] if group == OBJECT else [(o, concept) for o in OBJECTS]


def selection_items(group: str, concept: str, protocol: Protocol) -> list[Item]:
    """What γ (and the SAeUron percentile) are chosen on: every cell of the target, plus `select_others` cells
    of each other concept of its group (rotating through the looks / objects), with seeds of their own."""
    cells = _target_cells(group, concept)
    others = [c for c in GROUP_CONCEPTS[group] if c != concept]
    for i, other in enumerate(others):
        own = _target_cells(group, other)
        if group == STYLE:
            own = [c for c in own if c[1] is not None]
        cells += [own[(i + j) % len(own)] for j in range(min(protocol.select_others, len(own)))]
    return [_item(o, s, r, SELECT_SEED) for r in range(protocol.select_seeds) for o, s in cells]


def quality_items(base: int = QUALITY_SEED, fit_seeds: int = QUALITY_FIT_SEEDS) -> tuple[list[Item], list[Item]]:
    """The artifact judge's own un-erased images: (fit: `fit_seeds` per prompt, calibration: one more), from seed
    `base` (the toy build fits its own judge at seeds of its own). The prompts are the grid's and those that name no
    object ("An image in Neon style.", "An image."): the model's own empty scenes are no more artifacts than its
    drawings are."""
    cells = [(o, s) for o in (*OBJECTS, None) for s in LOOKS]
    items = [_item(o, s, r, base) for r in range(fit_seeds + 1) for o, s in cells]
    fit = fit_seeds * len(cells)
    return items[:fit], items[fit:]


def rephrase_items(group: str, concept: str, seeds: int) -> list[Item]:
    """The target's cells worded with every held-out template (never seen in training)."""
    return [_item(o, s, r, REPHRASE_SEED, t) for r in range(seeds) for t in range(len(HELD_OUT_TEMPLATES))
            for o, s in _target_cells(group, concept)]


def example_cells(group: str, concept: str) -> list[tuple[str, str | None]]:
    """For the examples figure: an image of the target and one of neither the target nor its grid neighbour."""
    i = GROUP_CONCEPTS[group].index(concept)
    if group == OBJECT:
        return [(concept, STYLES[i % len(STYLES)]), (OBJECTS[(i + 1) % len(OBJECTS)], STYLES[(i + 2) % len(STYLES)])]
    return [(OBJECTS[i % len(OBJECTS)], concept), (OBJECTS[(i + 3) % len(OBJECTS)], STYLES[(i + 1) % len(STYLES)])]


def scaled_percentile(num_latents: int, kept: int) -> float:
    """The percentile whose strictly-greater quantile selection keeps `kept` of `num_latents` latents, as
    99.999 / 99.995 / 99.99 keep 1 / 2 / 3 of 20480: the quantile lands halfway between the kept-th and
    (kept+1)-th largest score."""
    return 100.0 * (num_latents - kept - 0.5) / (num_latents - 1)


def configurations_searched(method: str, protocol: Protocol) -> int:
    spec = METHODS[method][1]
    return {None: 0, "gammas": len(protocol.gammas), "kept×gammas": len(protocol.kept) * len(protocol.gammas)}.get(
        spec, spec)


def planned_images(protocol: Protocol) -> int:
    """Images the run generates at most (cache hits and shared settings make it fewer)."""
    tuned = sum(configurations_searched(m, protocol) for m, (_, spec) in METHODS.items() if isinstance(spec, str))
    per_target = lambda g, c: (len(selection_items(g, c, protocol)) * tuned
                               + (len(METHODS) - 1) * len(grid_items(protocol.test_seeds))
                               + len(METHODS) * len(rephrase_items(g, c, protocol.rephrase_seeds)))
    total = len(grid_items(protocol.test_seeds)) * (1 + 2 * len(protocol.object_targets))  # none + sequential
    total += sum(map(len, quality_items()))
    return total + sum(per_target(g, c) for g, targets in protocol.targets() for c in targets)
