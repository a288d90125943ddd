# SPDX-License-Identifier: GPL-3.0-or-later
"""Prompt spec files and the SAeUron grid."""

import pytest

from saemnesia_tools.training.specs import (
    PromptSpec, SpecError, label_vocabulary, read_specs, saeuron_grid, write_specs,
)


def test_jsonl_missing_or_null_group_means_no_label(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "An image of Cats in Van Gogh style.", "object": "Cats", "style": "Van_Gogh"}\n'
                    '\n{"prompt": "An image of Dogs.", "object": "Dogs", "style": null}\n'
                    '{"prompt": "An image of Dogs.", "object": "Dogs"}\n')
    specs = read_specs(path)
    assert specs[0] == PromptSpec("An image of Cats in Van Gogh style.", {"object": "Cats", "style": "Van_Gogh"})
    assert specs[1].labels == {"object": "Dogs"} == specs[2].labels


def test_csv_empty_cell_means_no_label(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,object,style\n"An image of Cats, big.",Cats,\nA dog,Dogs,Pop_Art\n')
    specs = read_specs(path)
    assert specs == [PromptSpec("An image of Cats, big.", {"object": "Cats"}),
                     PromptSpec("A dog", {"object": "Dogs", "style": "Pop_Art"})]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_write_then_read_round_trips(tmp_path, suffix):
    specs = saeuron_grid(["Cats", "Sea_Turtles"], ["Van_Gogh"], repeats=2)
    write_specs(specs, tmp_path / f"s{suffix}")
    assert read_specs(tmp_path / f"s{suffix}") == specs


@pytest.mark.parametrize("text,suffix", [
    ('{"object": "Cats"}\n', ".jsonl"),
    ('{"prompt": "x", "object": 3}\n', ".jsonl"),
    ("[1, 2]\n", ".jsonl"),
    ("object,style\nCats,\n", ".csv"),
    ("", ".jsonl"),
    ("prompt\n", ".txt"),
])
def test_bad_spec_files_are_rejected_with_a_reason(tmp_path, text, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(SpecError):
        read_specs(path)


def test_saeuron_grid_has_every_object_in_every_style_plus_unstyled():
    specs = saeuron_grid(["Cats", "Dogs"], ["Van_Gogh", "Pop_Art", "Ukiyoe"])
    assert len(specs) == 2 * (3 + 1)
    assert specs[0] == PromptSpec("An image of Cats in Van Gogh style.", {"object": "Cats", "style": "Van_Gogh"})
    assert specs[3] == PromptSpec("An image of Cats.", {"object": "Cats"})
    assert label_vocabulary(specs) == {"object": ["Cats", "Dogs"], "style": ["Pop_Art", "Ukiyoe", "Van_Gogh"]}
