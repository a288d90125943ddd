"""The toy world's prompt wording: the SAeUron form plus two paraphrases used in training, held-out rephrasings
(other word order) for the robustness test, and the wordings that ask for no object (a style's background alone,
or "An image." for neither object nor style). CLIP's tokenizer lower-cases, so case is moot."""

from __future__ import annotations

# (styled, unstyled) pairs; the first is the papers' form and the one every evaluation uses
TRAIN_TEMPLATES = (
    ("An image of {object} in {style} style.", "An image of {object}."),
    ("A picture of {object} in {style} style.", "A picture of {object}."),
    ("{object} drawn in {style} style.", "{object} drawn."),
)
HELD_OUT_TEMPLATES = (
    ("A {style} style image showing {object}.", "An image showing {object}."),
    ("In {style} style: {object}.", "Just {object}."),
)

# no object: one wording per training template (same order), and the prompt for neither object nor style
ABSENT_TEMPLATES = ("An image in {style} style.", "A picture in {style} style.", "Drawn in {style} style.")
NOTHING_PROMPT = "An image."


def make_prompt(obj: str | None, style: str | None, template=TRAIN_TEMPLATES[0]) -> str:
    """The prompt for an object (None: no object) in a style (None: unstyled), in one of the templates above."""
    if obj is None:
        absent = ABSENT_TEMPLATES[TRAIN_TEMPLATES.index(template)] if template in TRAIN_TEMPLATES else ABSENT_TEMPLATES[0]
        return NOTHING_PROMPT if style is None else absent.format(style=style)
    styled, unstyled = template
    return unstyled.format(object=obj) if style is None else styled.format(object=obj, style=style)
