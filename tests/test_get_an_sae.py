"""The README's "Get an SAE" table: every command in it runs, on a fixture written in that family's layout and named
as the command names it, and the file it writes reads what the table's row says."""

import os
import re
import shlex
from pathlib import Path

import pytest

from helpers_families import (random_raw, write_concept_stats, write_hub_topk, write_saemnesia, write_saeparate,
                              write_saeuron, write_unbox)
from saemnesia_core.sae_file import read_header
from saemnesia_tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["Cats", "Dogs", "Birds"]


def table_rows() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Get an SAE"):text.index("## The nodes")]
    header, *rows = [r for r in section.splitlines() if r.startswith("| ") and "---" not in r]
    names = [c.strip() for c in header.strip("|").split("|")]
    return [dict(zip(names, (c.strip() for c in row.strip("|").split(" | ")))) for row in rows]


def fixture_for(family: str, source: str, where: Path) -> None:
    """Write the family's checkpoint at `where/source`, as the command names it (its hookpoint from the name)."""
    d, n = 16, 64
    raw = random_raw(d=d, n=n, k=4, seed=0, means=family in ("sdxl-unbox", "Flux block 18"))
    if family == "SAEmnesia":
        write_saemnesia(where / source, raw, {c: (98.0, -1.0) for c in CONCEPTS})
    elif family == "SAeUron":
        write_saeuron(where / Path(source).parent, Path(source).name, raw)
    elif family == "SAEParate":
        write_saeparate(where / Path(source).parent, Path(source).name, random_raw(d, n, 4, 1, pre_encoder=True))
    elif family in ("sdxl-unbox", "Flux block 18"):
        write_unbox(where / source, raw)
    elif family == "TopK hub SAEs":
        write_hub_topk(where, source, raw)
    else:
        raise AssertionError(f"no fixture for the family {family!r}")


@pytest.mark.parametrize("row", [r for r in table_rows() if "saemnesia convert" in r["to use it"]],
                         ids=lambda r: r["family"])
def test_the_readmes_command_for_each_family_runs_and_the_file_reads_what_the_row_says(row, tmp_path):
    commands = re.findall(r"`(saemnesia convert [^`]+)`", row["to use it"])
    assert commands
    for command in commands:
        argv = shlex.split(command)[1:]
        source, out = argv[1], argv[2]
        fixture_for(row["family"], source, tmp_path)
        for flag in ("--concept-stats", "--class-params"):
            if flag in argv:
                path = tmp_path / argv[argv.index(flag) + 1]
                if flag == "--concept-stats":
                    write_concept_stats(path, CONCEPTS, 64, steps=10, seed=3,
                                        strong={"Cats": [1], "Dogs": [2], "Birds": [3]})
                elif not path.exists():  # the SAEmnesia fixture writes its class_params.pth in its root
                    (tmp_path / source / "class_params.pth").rename(path)
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main(argv) == 0
        finally:
            os.chdir(cwd)
        header = read_header(tmp_path / out)
        if "--reads" not in argv:
            assert header.reads == row["reads"].split()[0].strip(","), command  # "output, standardised …"
        assert header.hookpoint.split(".", 1)[1] in command, (command, header.hookpoint)  # from --hookpoint or a name
        if "--concept-stats" in argv:
            assert [c.label for c in header.concepts] == CONCEPTS
        if "--reads" in argv:  # the row's alternative settings, applied on top
            assert header.reads == argv[argv.index("--reads") + 1]
