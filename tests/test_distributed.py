# SPDX-License-Identifier: GPL-3.0-or-later
"""Data-parallel runs (2 CPU processes, gloo) match single-process runs on the same data.

Tolerance: every weight within 1e-5 (absolute; weights are O(0.1-1)) after the whole run. Steps are
mathematically identical (global-batch denominators, global BatchTopK threshold, summed gradients); what
remains is float summation order, seen at ~1e-7.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_training import planted_dataset
from saemnesia_tools.cli import main as cli_main
from saemnesia_core.sae_file import load_sae_file
from saemnesia_tools.training.collect import Capture, collect
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import ActivationDataset
from saemnesia_tools.testing import free_port
from saemnesia_tools.training.specs import PromptSpec

TOLERANCE = 1e-5
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun_cli(args: list[str]) -> None:
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "saemnesia_tools.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_weights(path_a, path_b):
    a, b = load_sae_file(path_a), load_sae_file(path_b)
    for name in a.weights:
        assert torch.allclose(a.weights[name], b.weights[name], rtol=0, atol=TOLERANCE), name
    return a, b


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    planted_dataset(root, num_samples=48, concept_scale=1.0)
    return root


UNSUPERVISED = ["--expansion", "2", "--k", "3", "--batch-size", "64", "--lr", "2e-2", "--dead-tokens", "300",
                "--epochs", "2", "--quiet"]


def test_ddp_unsupervised_training_matches_single_process(data, tmp_path):
    args = ["train", "--data", str(data), *UNSUPERVISED]  # BatchTopK (a global threshold) with AuxK active
    assert cli_main(args + ["--out", str(tmp_path / "single.safetensors")]) == 0
    torchrun_cli(args + ["--out", str(tmp_path / "ddp.safetensors")])
    single, ddp = assert_same_weights(tmp_path / "single.safetensors", tmp_path / "ddp.safetensors")
    assert single.provenance["final"]["dead_fraction"] > 0  # AuxK took part
    assert ddp.provenance["final"]["fvu"] == pytest.approx(single.provenance["final"]["fvu"], abs=TOLERANCE)


def test_ddp_supervised_finetuning_and_statistics_match_single_process(data, tmp_path):
    init = tmp_path / "unsupervised.safetensors"
    assert cli_main(["train", "--data", str(data), *UNSUPERVISED, "--out", str(init)]) == 0
    args = ["train", "--supervised", "--init", str(init), "--data", str(data), "--lr", "1e-2", "--batch-records", "8",
            "--epochs", "3", "--buckets", "2", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "single.safetensors")]) == 0
    torchrun_cli(args + ["--out", str(tmp_path / "ddp.safetensors")])
    single, ddp = assert_same_weights(tmp_path / "single.safetensors", tmp_path / "ddp.safetensors")
    assert [c.latent for c in single.concepts] == [c.latent for c in ddp.concepts]
    assert torch.allclose(single.tables.mean_acts, ddp.tables.mean_acts, atol=TOLERANCE)
    assert torch.allclose(single.tables.thresholds, ddp.tables.thresholds, atol=TOLERANCE)


class SeedSource:
    """A fast stand-in source: each record holds its sample's seed."""

    hookpoint, model_id, settings = "unet.fake", "fake", {"source": "fake"}

    def run(self, prompts, seeds):
        tokens = torch.stack([torch.full((4, 3), float(s)) for s in seeds])
        return [Capture(tokens, 2, 2, step, 1 - step, 999 * (1 - step), 0) for step in range(2)]


def _collect_rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        specs = [PromptSpec(f"p{i}", {"object": "Cats" if i % 2 else "Dogs"}) for i in range(7)]
        collect(SeedSource(), specs, out, ctx=DistContext(rank, world), progress=False)
    finally:
        dist.destroy_process_group()


def test_ddp_collection_splits_samples_and_merges_one_index(tmp_path):
    mp.spawn(_collect_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ds = ActivationDataset(tmp_path)
    rows = [ds.load_shard(i) for i in range(len(ds.shards))]
    samples = torch.cat([r.sample for r in rows])
    assert sorted(samples.tolist()) == [i for i in range(7) for _ in range(2)]
    assert all(torch.equal(r.acts[:, 0, 0].float(), r.sample.float()) for r in rows)  # seed = sample id
    assert {Path(s["file"]).parent.name for s in ds.shards} == {"part-000", "part-001"}
