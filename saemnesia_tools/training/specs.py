# SPDX-License-Identifier: GPL-3.0-or-later
"""Prompt specs: the prompts a collection runs, each with at most one concept label per concept group.

A spec file is JSONL (one object per line: ``{"prompt": ..., "<group>": "<label>" | null, ...}``) or CSV
(a ``prompt`` column plus one column per group; an empty cell is "no label"). A missing group means the
prompt carries no concept of that group (e.g. an unstyled prompt has no ``style`` label).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

PROMPT_KEY = "prompt"


class SpecError(ValueError):
    """A spec file that cannot be read as prompts with string labels."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and its labels: ``labels[group] = label``; groups without a label are absent."""

    prompt: str
    labels: dict[str, str] = field(default_factory=dict)


def _spec_from_mapping(row: dict, where: str) -> PromptSpec:
    prompt = row.get(PROMPT_KEY)
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError(f"{where}: needs a non-empty string field {PROMPT_KEY!r}")
    labels = {}
    for group, label in row.items():
        if group == PROMPT_KEY or label is None or label == "":
            continue
        if not isinstance(label, str):
            raise SpecError(f"{where}: label of group {group!r} must be a string or null, got {label!r}")
        labels[str(group)] = label
    return PromptSpec(prompt, labels)


def read_specs(path: str | Path) -> list[PromptSpec]:
    """Read a JSONL (``.jsonl``/``.json``) or CSV (``.csv``) spec file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    specs = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpecError(f"{path}:{line_no}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise SpecError(f"{path}:{line_no}: each line must be a JSON object")
                specs.append(_spec_from_mapping(row, f"{path}:{line_no}"))
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or PROMPT_KEY not in reader.fieldnames:
                raise SpecError(f"{path}: the CSV header must have a {PROMPT_KEY!r} column")
            for line_no, row in enumerate(reader, 2):
                specs.append(_spec_from_mapping(row, f"{path}:{line_no}"))
    else:
        raise SpecError(f"{path}: unknown spec format {suffix!r} (use .jsonl or .csv)")
    if not specs:
        raise SpecError(f"{path}: no prompts")
    return specs


def write_specs(specs: Sequence[PromptSpec], path: str | Path) -> None:
    """Write specs as JSONL or CSV (chosen by the suffix); groups absent from a spec are left empty."""
    path = Path(path)
    groups = label_groups(specs)
    if path.suffix.lower() == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[PROMPT_KEY, *groups])
            writer.writeheader()
            for spec in specs:
                writer.writerow({PROMPT_KEY: spec.prompt, **spec.labels})
    else:
        with path.open("w", encoding="utf-8") as f:
            for spec in specs:
                f.write(json.dumps({PROMPT_KEY: spec.prompt, **spec.labels}, ensure_ascii=False) + "\n")


def label_groups(specs: Iterable[PromptSpec]) -> list[str]:
    """The concept groups that appear in ``specs``, in order of first appearance."""
    groups: dict[str, None] = {}
    for spec in specs:
        groups.update(dict.fromkeys(spec.labels))
    return list(groups)


def label_vocabulary(specs: Iterable[PromptSpec]) -> dict[str, list[str]]:
    """``{group: sorted labels}``: label ids in activation shards index these lists."""
    vocab: dict[str, set[str]] = {}
    for spec in specs:
        for group, label in spec.labels.items():
            vocab.setdefault(group, set()).add(label)
    return {group: sorted(labels) for group, labels in vocab.items()}


def saeuron_grid(
    objects: Sequence[str],
    styles: Sequence[str],
    *,
    repeats: int = 1,
    styled_template: str = "An image of {object} in {style} style.",
    unstyled_template: str = "An image of {object}.",
    object_group: str = "object",
    style_group: str = "style",
) -> list[PromptSpec]:
    """SAeUron's prompt grid: every object in every style, plus each object unstyled, ``repeats`` times.

    Labels keep their spelling (``Van_Gogh``); the prompt text shows underscores as spaces, as SAeUron
    writes its prompts. Order: per repeat, per object, the styles then the unstyled prompt.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    specs = []
    for _ in range(repeats):
        for obj in objects:
            obj_text = obj.replace("_", " ")
            for style in styles:
                prompt = styled_template.format(object=obj_text, style=style.replace("_", " "))
                specs.append(PromptSpec(prompt, {object_group: obj, style_group: style}))
            specs.append(PromptSpec(unstyled_template.format(object=obj_text), {object_group: obj}))
    return specs
