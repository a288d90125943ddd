"""The toy world's prompt wording: the SAeUron form plus two paraphrases used in training, and held-out
rephrasings (other word order) for the robustness test. CLIP's tokenizer lower-cases, so case is moot."""

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


def make_prompt(obj: str, style: str | None, template=TRAIN_TEMPLATES[0]) -> str:
    styled, unstyled = template
    return unstyled.format(object=obj) if style is None else styled.format(object=obj, style=style)
