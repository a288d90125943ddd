# SPDX-License-Identifier: GPL-3.0-or-later
"""Collection from a ComfyUI MODEL: ComfyUI samples, an object patch on the hooked block records its output (a DiT
block's image tokens).

The hookpoint is named in diffusers style and mapped with ComfyUI's own key map for the model's family
(DESIGN §6.2). Sampling is ComfyUI's `comfy.sample.sample` on a clone of the model, so the caller's MODEL
is never modified. t comes from the sigma ComfyUI passes in `transformer_options` (no call counters).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import comfy.latent_formats
import comfy.sample
import comfy.supported_models
from saemnesia_core.sae import block_to_tokens
from saemnesia_tools.training.collect import Capture, branch_ids, collect
from saemnesia_tools.training.specs import PromptSpec

from saemnesia_comfy.dit import dit_family
from saemnesia_comfy.patch import comfy_block_name, patch_block_output, schedule_position
from saemnesia_comfy.teach import batch_conditioning

Conditioning = list  # ComfyUI's CONDITIONING: [[cond tensor [1, tokens, ctx], {options}], ...]


class ComfyCaptureSource:
    """Samples a ComfyUI MODEL and records the hooked block's output at every n-th step (an ActivationSource).

    ``width``/``height`` are image pixels; the latent is that divided by ``downscale`` (default: 1 for
    pixel-space latent formats, 8 otherwise). Each sample's initial noise is drawn from its own seed, so with
    a deterministic sampler (ddim, euler, ...) a sample's records do not depend on how prompts are batched;
    ancestral samplers draw their per-step noise from the batch's first seed (use batch_size 1 there).
    """

    def __init__(self, model, encode_prompt: Callable[[str], Conditioning], *, hookpoint: str, steps: int = 50,
                 cfg: float = 9.0, sampler: str = "ddim", scheduler: str = "ddim_uniform", every_n_steps: int = 1,
                 branch: str = "cond", width: int = 512, height: int = 512, latent_channels: int | None = None,
                 downscale: int | None = None, negative_prompt: str = "", model_id: str = "comfyui",
                 model_family: str | None = None):
        self.model = model
        self.encode_prompt = encode_prompt
        self.hookpoint = hookpoint if hookpoint.startswith(("unet.", "transformer.")) else f"unet.{hookpoint}"
        self.block_name = comfy_block_name(model, self.hookpoint)
        family = dit_family(model)
        latent_format = model.get_model_object("latent_format")
        if downscale is None:
            downscale = 1 if isinstance(latent_format, comfy.latent_formats.ChromaRadiance) else 8
        self.latent_shape = (latent_channels or latent_format.latent_channels, height // downscale, width // downscale)
        patch = model.model.diffusion_model.patch_size if family else 1  # a DiT's tokens: one per latent patch
        self.token_grid = (-(-self.latent_shape[1] // patch), -(-self.latent_shape[2] // patch))
        self.steps, self.cfg, self.sampler, self.scheduler = steps, cfg, sampler, scheduler
        self.every_n_steps = every_n_steps
        self.branches = branch_ids(branch)
        self.negative_prompt = negative_prompt
        self.model_id = model_id
        if model_family is None and family is not None:
            model_family = family.name
        if model_family is None:
            config = model.model.model_config
            model_family = "sdxl" if isinstance(config, comfy.supported_models.SDXL) else \
                "sd15" if isinstance(config, comfy.supported_models.SD15) else "unknown"
        self.settings = {"source": "comfyui", "model_family": model_family, "block": self.block_name,
                         "steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler,
                         "every_n_steps": every_n_steps, "branch": branch, "latent_shape": list(self.latent_shape)}

    def _patched_clone(self, captures: list[Capture]):
        """A clone of the MODEL whose hooked block records its output (the caller's MODEL is untouched)."""
        m = self.model.clone()
        model_sampling = m.get_model_object("model_sampling")
        every_n, branches, grid = self.every_n_steps, self.branches, self.token_grid

        def record(out, options):
            sigma = options["sigmas"][:1]
            schedule = options["sample_sigmas"]
            step = int((schedule.float() - sigma.float().to(schedule.device)).abs().argmin())
            if step % every_n == 0:
                timestep = float(model_sampling.timestep(sigma)[0])
                t = float(schedule_position(model_sampling, sigma)[0])
                chunks = options["cond_or_uncond"]
                per_chunk = out.shape[0] // len(chunks)
                for i, branch in enumerate(chunks):
                    if branch in branches:
                        part = out[i * per_chunk:(i + 1) * per_chunk]
                        tokens = part if part.dim() == 3 else block_to_tokens(part)  # a DiT's are tokens already
                        h, w = grid if part.dim() == 3 else part.shape[2:]
                        captures.append(Capture(tokens.detach().to("cpu", torch.float16), h, w, step, t,
                                                timestep, branch))
            return out

        patch_block_output(m, self.block_name, record)
        return m

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Capture]:
        conds = [self.encode_prompt(p) for p in prompts]
        if len({tuple(c[0][0].shape) for c in conds}) > 1:  # prompts of different token lengths: one at a time
            per_prompt = [self.run([p], [s]) for p, s in zip(prompts, seeds)]
            return [replace(first, tokens=torch.cat([caps[i].tokens for caps in per_prompt]))
                    for i, first in enumerate(per_prompt[0])]
        captures: list[Capture] = []
        noise = torch.cat([torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds])
        latent = torch.zeros_like(noise)
        negative = self.encode_prompt(self.negative_prompt)
        comfy.sample.sample(self._patched_clone(captures), noise, self.steps, self.cfg, self.sampler,
                            self.scheduler, batch_conditioning(conds), negative, latent,
                            seed=int(seeds[0]), disable_pbar=True)
        return captures


def checkpoint_source(args) -> ComfyCaptureSource:
    """`saemnesia collect --checkpoint FILE`'s activation source: the checkpoint loaded by ComfyUI's own loader (or,
    for the toy world's model file, its loader), sampled as collect_from_comfy samples, with the command's settings
    (ComfyUI's own sampler and scheduler names: ddim and ddim_uniform by default, as SAeUron samples)."""
    import comfy.sd
    from saemnesia_comfy import toy_model

    path = Path(args.checkpoint)
    if not path.is_file():
        raise SystemExit(f"saemnesia collect: no checkpoint file {path}")
    if toy_model.is_toy_model_file(path):
        model, clip, _ = toy_model.load_toy_model(path)
        size = {"width": args.width or toy_model.IMAGE_SIZE, "height": args.height or toy_model.IMAGE_SIZE}
    else:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clipvision=False)
        if model is None or clip is None:
            raise SystemExit(f"saemnesia collect: ComfyUI found no diffusion model and text encoder in {path}")
        size = {"width": args.width or 512, "height": args.height or 512}
    sampler = {"DDIMScheduler": "ddim"}.get(args.scheduler, args.scheduler)
    return ComfyCaptureSource(model, lambda p: clip.encode_from_tokens_scheduled(clip.tokenize(p)),
                              hookpoint=args.hookpoint, steps=args.steps, cfg=args.guidance, sampler=sampler,
                              scheduler="ddim_uniform" if sampler == "ddim" else "normal",
                              every_n_steps=args.every_n_steps, branch=args.branch, model_id=path.name,
                              model_family=args.family, **size)


def collect_from_comfy(model, encode_prompt: Callable[[str], Conditioning], specs: Sequence[PromptSpec],
                       out_dir: str | Path, *, hookpoint: str, steps: int = 50, cfg: float = 9.0,
                       sampler: str = "ddim", scheduler: str = "ddim_uniform", seed: int = 0,
                       every_n_steps: int = 1, branch: str = "cond", width: int = 512, height: int = 512,
                       latent_channels: int | None = None, downscale: int | None = None, batch_size: int = 1,
                       model_id: str = "comfyui", model_family: str | None = None,
                       **collect_kwargs: Any) -> Path:
    """Collect a labelled activation dataset from a ComfyUI MODEL (see `collect` for resuming and ranks)."""
    source = ComfyCaptureSource(model, encode_prompt, hookpoint=hookpoint, steps=steps, cfg=cfg, sampler=sampler,
                                scheduler=scheduler, every_n_steps=every_n_steps, branch=branch, width=width,
                                height=height, latent_channels=latent_channels, downscale=downscale,
                                model_id=model_id, model_family=model_family)
    return collect(source, specs, out_dir, seed=seed, batch_size=batch_size, **collect_kwargs)
