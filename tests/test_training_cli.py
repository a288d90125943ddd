# SPDX-License-Identifier: GPL-3.0-or-later
"""End to end from the shell: saemnesia specs -> collect -> train -> train --supervised -> stats -> inspect."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers_training import tiny_sd_pipeline
from saemnesia_tools.cli import main
from saemnesia_core.sae_file import read_header
from saemnesia_tools.training.shards import ActivationDataset

SAEMNESIA = Path(sys.executable).with_name("saemnesia")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def run(*args: str) -> None:
    assert main([*map(str, args)]) == 0


def test_collect_train_supervise_stats_then_inspect_lists_the_concepts(pipeline_dir, tmp_path, capsys):
    grid = ["--objects", "Cats,Dogs", "--styles", "Pop_Art,Ukiyoe"]
    run("specs", tmp_path / "train.jsonl", *grid, "--repeats", "2")
    run("specs", tmp_path / "heldout.csv", *grid)
    collect = ["--model", pipeline_dir, "--steps", "4", "--height", "16", "--width", "16", "--guidance", "7.5",
               "--batch-size", "6", "--quiet"]
    run("collect", "--specs", tmp_path / "train.jsonl", "--out", tmp_path / "train_acts", *collect)
    run("collect", "--specs", tmp_path / "heldout.csv", "--out", tmp_path / "heldout_acts", "--seed", "1000", *collect)
    data = ActivationDataset(tmp_path / "train_acts")
    assert data.num_records == 12 * 4 and data.tokens_per_record == 16 and data.d == 48
    assert data.label_vocab == {"object": ["Cats", "Dogs"], "style": ["Pop_Art", "Ukiyoe"]}

    run("train", "--data", tmp_path / "train_acts", "--out", tmp_path / "unsupervised.safetensors",
        "--expansion", "4", "--k", "4", "--batch-size", "128", "--epochs", "2", "--dead-tokens", "500", "--quiet")
    run("train", "--supervised", "--init", tmp_path / "unsupervised.safetensors", "--data", tmp_path / "train_acts",
        "--out", tmp_path / "supervised.safetensors", "--epochs", "2", "--batch-records", "8", "--lr", "1e-3",
        "--buckets", "4", "--quiet")
    assert "selectivity" in capsys.readouterr().out  # the assignment and selectivity table
    run("stats", "--sae", tmp_path / "supervised.safetensors", "--data", tmp_path / "heldout_acts",
        "--out", tmp_path / "saemnesia.safetensors", "--buckets", "4", "--quiet")
    run("stats", "--sae", tmp_path / "unsupervised.safetensors", "--data", tmp_path / "heldout_acts",
        "--out", tmp_path / "saeuron.safetensors", "--buckets", "4", "--quiet")

    header = read_header(tmp_path / "saemnesia.safetensors")
    assert header.supervised and header.selection_mode == "saemnesia" and header.model_family == "sd15"
    assert header.hookpoint == "unet.up_blocks.1.attentions.1" and header.num_buckets == 4
    assert {(c.label, c.group) for c in header.concepts} == \
        {("Cats", "object"), ("Dogs", "object"), ("Pop_Art", "style"), ("Ukiyoe", "style")}
    assert len({c.latent for c in header.concepts}) == 4
    assert read_header(tmp_path / "saeuron.safetensors").selection_mode == "saeuron"

    shown = subprocess.run([str(SAEMNESIA), "inspect", str(tmp_path / "saemnesia.safetensors")],
                           capture_output=True, text=True, check=True).stdout
    for concept in header.concepts:
        assert concept.label in shown and f"latent {concept.latent}" in shown


def test_input_problems_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--supervised", "--data", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "--init" in err and "index.json" in err and "Traceback" not in err
