# SPDX-License-Identifier: GPL-3.0-or-later
"""Collection from a ComfyUI CLIP text encoder: the token activations after one layer, per labelled prompt, in the
same shards as the UNet's (DESIGN §4.1, §6.8), so the trainer and the statistics read them unchanged.

A record is one prompt's first CLIP window, 1 × 77 tokens (padding included, as the encoder computes it), at
step 0 and t = 0: encoding has no time, and a text SAE's statistics have one bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saemnesia_tools.training.collect import Capture, collect
from saemnesia_tools.training.specs import PromptSpec

from saemnesia_comfy.text_erase import layer_path, patch_layer_output


class ClipCaptureSource:
    """Encodes prompts with a ComfyUI CLIP and records its hooked layer's output (an ActivationSource)."""

    def __init__(self, clip, *, hookpoint: str, model_id: str = "comfyui-clip"):
        self.clip, self.hookpoint, self.model_id = clip, hookpoint, model_id
        self.layer = layer_path(clip, hookpoint)
        self.settings = {"source": "comfyui-clip", "layer": self.layer}

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Capture]:
        seen: list[torch.Tensor] = []

        def record(out):
            seen.append(out[:1].detach().to("cpu", torch.float16))  # the first window of a long prompt
            return out

        recorder = self.clip.clone()
        patch_layer_output(recorder, self.layer, record)
        for prompt in prompts:
            recorder.encode_from_tokens(recorder.tokenize(prompt))
        tokens = torch.cat(seen)
        return [Capture(tokens, 1, tokens.shape[1], step=0, t=0.0, timestep=0.0, branch=0)]


def collect_from_clip(clip, specs: Sequence[PromptSpec], out_dir: str | Path, *, hookpoint: str,
                      model_id: str = "comfyui-clip", **collect_kwargs: Any) -> Path:
    """Collect a labelled activation dataset from a ComfyUI CLIP (see `collect` for resuming and ranks)."""
    return collect(ClipCaptureSource(clip, hookpoint=hookpoint, model_id=model_id), specs, out_dir, **collect_kwargs)
