# SPDX-License-Identifier: GPL-3.0-or-later
"""Collection from a ComfyUI MODEL (a tiny random SD1.5-topology UNet) with ComfyUI's own sampler."""

import hashlib

import pytest
import torch

from saemnesia_tools.training.shards import ActivationDataset
from saemnesia_tools.training.specs import PromptSpec

pytestmark = pytest.mark.comfy

SPECS = [PromptSpec("An image of Cats in Pop Art style.", {"object": "Cats", "style": "Pop_Art"}),
         PromptSpec("An image of Dogs.", {"object": "Dogs"}),
         PromptSpec("An image of Cats.", {"object": "Cats"})]
CONTEXT_DIM = 64


def fake_text_encoder(prompt: str):
    """A deterministic CONDITIONING per prompt (the capture only needs ComfyUI's conditioning format)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return [[torch.randn(1, 77, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope="module")
def model(comfy):
    from saemnesia_tools.comfyui.testing import make_sd15_model

    return make_sd15_model(model_channels=32, context_dim=CONTEXT_DIM, full_res_attention=False)


def settings(**kw):
    return {"hookpoint": "unet.up_blocks.1.attentions.1", "steps": 4, "cfg": 5.0, "sampler": "euler",
            "scheduler": "normal", "every_n_steps": 2, "width": 128, "height": 96, **kw}


def test_hookpoints_map_to_comfy_blocks(model):
    from saemnesia_comfy.patch import comfy_block_name

    assert comfy_block_name(model, "unet.up_blocks.1.attentions.1") == "output_blocks.4.1"
    assert comfy_block_name(model, "up_blocks.1.attentions.2") == "output_blocks.5.1"
    with pytest.raises(ValueError, match="up_blocks.0.attentions.0"):
        comfy_block_name(model, "unet.up_blocks.0.attentions.0")  # SD1.5 has no attention there


def test_collection_writes_expected_rows_and_labels(model, tmp_path):
    from saemnesia_tools.comfyui.capture import collect_from_comfy

    collect_from_comfy(model, fake_text_encoder, SPECS, tmp_path, batch_size=2, progress=False, **settings())
    ds = ActivationDataset(tmp_path)
    rows = ds.load_shard(0)
    assert (ds.d, ds.index["height"], ds.index["width"]) == (128, 3, 4)  # 96x128 latent / 8 / 4
    assert ds.index["source"]["block"] == "output_blocks.4.1" and ds.index["source"]["model_family"] == "sd15"
    assert rows.sample.tolist() == [0, 0, 1, 1, 2, 2]
    assert rows.step.tolist() == [0, 2] * 3 and rows.branch.tolist() == [0] * 6
    assert rows.labels.tolist() == [[0, 0], [0, 0], [1, -1], [1, -1], [0, -1], [0, -1]]
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigma_max * torch.ones(1)
    assert rows.t[0].item() == pytest.approx(float(sampling.timestep(sigmas)) / 999)  # first step: sigma_max
    assert 1.0 >= rows.t[0] > rows.t[1] > 0.0
    assert torch.allclose(rows.t, rows.timestep / 999)
    assert rows.acts.abs().sum() > 0


def test_cond_and_uncond_branches_come_from_the_right_chunks(model):
    from saemnesia_tools.comfyui.capture import ComfyCaptureSource

    both = ComfyCaptureSource(model, fake_text_encoder, **settings(branch="both")).run(["a cat"], [7])
    both = {c.branch: c.tokens for c in both if c.step == 0}
    cond_alone = ComfyCaptureSource(model, fake_text_encoder, **settings(cfg=1.0)).run(["a cat"], [7])[0].tokens
    negative_alone = ComfyCaptureSource(model, fake_text_encoder, **settings(cfg=1.0)).run([""], [7])[0].tokens

    def close(a, b):
        return torch.allclose(a.float(), b.float(), atol=2e-3)

    assert close(both[0], cond_alone) and close(both[1], negative_alone) and not close(both[0], both[1])


def test_batching_does_not_change_records_and_the_model_is_left_unpatched(model):
    from saemnesia_tools.comfyui.capture import ComfyCaptureSource

    source = ComfyCaptureSource(model, fake_text_encoder, **settings())
    batched = source.run(["a cat", "a dog"], [1, 2])
    single = source.run(["a dog"], [2])
    assert [c.step for c in batched] == [c.step for c in single] == [0, 2]
    for b, s in zip(batched, single):
        assert torch.allclose(b.tokens[1].float(), s.tokens[0].float(), atol=2e-3)
    assert not model.object_patches


def test_collect_takes_a_single_file_checkpoint_through_comfyuis_loader(tmp_path, comfy):
    """`saemnesia collect --checkpoint` (the toy world's model file; other checkpoints go through
    comfy.sd.load_checkpoint_guess_config), then `train` and `stats` on what it collected: no diffusers folder."""
    import subprocess
    import sys

    from saemnesia_core.sae_file import read_header
    from saemnesia_tools.toy import assets
    from saemnesia_tools.training.specs import write_specs

    specs = tmp_path / "specs.jsonl"
    write_specs(SPECS[:2] + [PromptSpec("An image of Hearts in Neon style.", {"object": "Hearts", "style": "Neon"})],
                specs)
    cli = [sys.executable, "-m", "saemnesia_tools.cli"]

    def run(*argv):
        done = subprocess.run([*cli, *map(str, argv)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    run("collect", "--specs", specs, "--checkpoint", assets.path(assets.MODEL), "--out", tmp_path / "acts",
        "--steps", 3, "--model-family", "toy", "--quiet")
    ds = ActivationDataset(tmp_path / "acts")
    assert (ds.num_records, ds.tokens_per_record, ds.d) == (9, 64, 128)  # 3 prompts × 3 steps, 8×8 tokens
    assert ds.index["source"]["model_family"] == "toy" and ds.hookpoint == "unet.up_blocks.1.attentions.1"
    run("train", "--data", tmp_path / "acts", "--out", tmp_path / "sae.safetensors", "--expansion", 2, "--k", 4,
        "--max-steps", 2, "--batch-size", 64, "--quiet")
    run("stats", "--sae", tmp_path / "sae.safetensors", "--data", tmp_path / "acts", "--out", tmp_path / "ready.safetensors",
        "--quiet")
    assert {c.label for c in read_header(tmp_path / "ready.safetensors").concepts} >= {"Cats", "Dogs", "Hearts"}


def test_collect_from_a_checkpoint_without_a_comfyui_host_says_what_it_needs(tmp_path):
    import os
    import subprocess
    import sys

    from saemnesia_tools.training.specs import write_specs

    write_specs(SPECS, tmp_path / "x.jsonl")
    env = {**os.environ, "COMFYUI_PATH": str(tmp_path / "no_comfyui")}
    done = subprocess.run([sys.executable, "-m", "saemnesia_tools.cli", "collect", "--specs", "x.jsonl",
                           "--checkpoint", "model.safetensors", "--out", str(tmp_path / "acts")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "set COMFYUI_PATH to your ComfyUI folder, or run scripts/bootstrap.sh" in done.stderr
