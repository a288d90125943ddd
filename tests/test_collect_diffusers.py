# SPDX-License-Identifier: GPL-3.0-or-later
"""Collection from a tiny random diffusers StableDiffusionPipeline, and the source-agnostic loop."""

import pytest
import torch

from helpers_training import tiny_sd_pipeline
from saemnesia_tools.training.collect import Capture, DiffusersSource, collect
from saemnesia_tools.training.shards import ActivationDataset
from saemnesia_tools.training.specs import PromptSpec

SPECS = [PromptSpec("An image of Cats in Pop Art style.", {"object": "Cats", "style": "Pop_Art"}),
         PromptSpec("An image of Dogs.", {"object": "Dogs"}),
         PromptSpec("An image of Cats.", {"object": "Cats"})]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def source(pipe, **kw):
    args = dict(steps=4, every_n_steps=2, guidance_scale=7.5, height=16, width=24)
    return DiffusersSource(pipe, "unet.up_blocks.1.attentions.1", **{**args, **kw})


def all_records(path):
    ds = ActivationDataset(path)
    return ds, ds.load_shard(0) if len(ds.shards) == 1 else None


def test_collection_writes_one_record_per_kept_step_with_labels(pipe, tmp_path):
    collect(source(pipe), SPECS, tmp_path, batch_size=2, progress=False)
    ds, rows = all_records(tmp_path)
    assert (ds.d, ds.index["height"], ds.index["width"]) == (48, 4, 6)  # up_blocks.1 of a 16x24 latent
    assert ds.label_vocab == {"object": ["Cats", "Dogs"], "style": ["Pop_Art"]}
    assert ds.hookpoint == "unet.up_blocks.1.attentions.1"
    assert rows.sample.tolist() == [0, 0, 1, 1, 2, 2]
    assert rows.step.tolist() == [0, 2] * 3 and rows.branch.tolist() == [0] * 6
    assert rows.labels.tolist() == [[0, 0], [0, 0], [1, -1], [1, -1], [0, -1], [0, -1]]
    # DDIM "leading" spacing at 4 of 1000 steps: model timesteps 751 and 251; t = timestep / 999
    assert rows.timestep.tolist() == [751.0, 251.0] * 3
    assert torch.allclose(rows.t, rows.timestep / 999)
    assert rows.acts.dtype == torch.float16 and rows.acts.abs().sum() > 0


def test_cond_branch_is_the_second_cfg_half_and_uncond_the_first(pipe):
    with_cfg = source(pipe, branch="both").run(["An image of Cats."], [3])
    cond_only = source(pipe, guidance_scale=1.0).run(["An image of Cats."], [3])
    empty_prompt = source(pipe, guidance_scale=1.0).run([""], [3])
    first = {(c.step, c.branch): c.tokens for c in with_cfg}
    def close(a, b):  # batched vs unbatched matmuls round differently
        return torch.allclose(a.float(), b.float(), atol=2e-3)

    assert close(first[(0, 0)], cond_only[0].tokens)   # same latents and timestep at step 0
    assert close(first[(0, 1)], empty_prompt[0].tokens)
    assert not close(first[(0, 0)], first[(0, 1)])


def test_batching_does_not_change_a_samples_records(pipe, tmp_path):
    collect(source(pipe), SPECS, tmp_path / "b1", batch_size=1, progress=False)
    collect(source(pipe), SPECS, tmp_path / "b3", batch_size=3, progress=False)
    one, three = all_records(tmp_path / "b1")[1], all_records(tmp_path / "b3")[1]
    assert torch.allclose(one.acts.float(), three.acts.float(), atol=2e-3)
    assert one.sample.tolist() == three.sample.tolist()


def test_hooks_are_removed_after_a_run(pipe):
    source(pipe).run(["x"], [0])
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.up_blocks[1].attentions[1]._forward_hooks


def test_unknown_hookpoint_is_refused(pipe):
    with pytest.raises(ValueError, match="up_blocks.9"):
        DiffusersSource(pipe, "unet.up_blocks.9.attentions.1")


class FlakySource:
    """A fast fake source that fails on its n-th run, like a collection killed half-way."""

    hookpoint, model_id, settings = "unet.fake", "fake", {"source": "fake"}

    def __init__(self, fail_on_run=None):
        self.runs, self.fail_on_run, self.prompts_seen = 0, fail_on_run, []

    def run(self, prompts, seeds):
        self.runs += 1
        if self.runs == self.fail_on_run:
            raise KeyboardInterrupt
        self.prompts_seen += prompts
        tokens = torch.stack([torch.full((4, 3), float(s)) for s in seeds])
        return [Capture(tokens, 2, 2, step, 1 - step / 2, 999 - 499 * step, 0) for step in range(2)]


def test_interrupted_collection_continues_without_duplicating_rows(tmp_path):
    specs = [PromptSpec(f"p{i}", {"object": "Cats"}) for i in range(7)]
    shard_mb = 2 * 2 * 4 * 3 * 2 / 2**20  # a shard every 2 samples
    with pytest.raises(KeyboardInterrupt):
        collect(FlakySource(fail_on_run=4), specs, tmp_path, shard_mb=shard_mb, progress=False)
    assert ActivationDataset(tmp_path).num_records == 4  # samples 0, 1 on disk; 2 was buffered and lost
    resumed = FlakySource()
    collect(resumed, specs, tmp_path, shard_mb=shard_mb, progress=False)
    assert resumed.prompts_seen == ["p2", "p3", "p4", "p5", "p6"]
    ds = ActivationDataset(tmp_path)
    samples = sorted(torch.cat([ds.load_shard(i).sample for i in range(len(ds.shards))]).tolist())
    assert samples == [i for i in range(7) for _ in range(2)]
    # each sample's records hold its own seed (seed = sample id)
    for i in range(len(ds.shards)):
        shard = ds.load_shard(i)
        assert torch.equal(shard.acts[:, 0, 0].float(), shard.sample.float())


def test_sdxl_pipeline_collects_with_its_own_hookpoints(tmp_path):
    from helpers_training import tiny_sdxl_pipeline

    xl = DiffusersSource(tiny_sdxl_pipeline(), "unet.up_blocks.0.attentions.1", steps=3, every_n_steps=1,
                         guidance_scale=5.0, height=16, width=16)
    collect(xl, SPECS[:2], tmp_path, batch_size=2, progress=False)
    ds, rows = all_records(tmp_path)
    assert ds.index["source"]["model_family"] == "sdxl" and ds.hookpoint == "unet.up_blocks.0.attentions.1"
    assert (ds.d, ds.index["height"], ds.index["width"]) == (64, 8, 8)  # up_blocks.0 of a 16x16 latent
    assert rows.sample.tolist() == [0, 0, 0, 1, 1, 1] and rows.step.tolist() == [0, 1, 2] * 2
    assert 1.0 >= rows.t[0] > rows.t[1] > rows.t[2] >= 0.0
