# SPDX-License-Identifier: GPL-3.0-or-later
"""Collection (DESIGN §4.1): run a diffusion model on prompt specs and store the hooked block's output.

The loop is source-agnostic: a source turns a batch of prompts (one seed each) into `Capture`s, the
block outputs of the chosen steps and CFG branch. Sources here: diffusers pipelines (SD1.x, SDXL); the
ComfyUI source lives in `saemnesia_tools.comfyui.capture` (it imports comfy).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from saemnesia_core.sae import block_to_tokens
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import BRANCHES, INDEX_NAME, ShardWriter, completed_samples, merge_parts
from saemnesia_tools.training.specs import PromptSpec, label_vocabulary


@dataclass
class Capture:
    """The hooked block's output at one step, one CFG branch, for every sample of the batch."""

    tokens: torch.Tensor  # [B, H*W, d], B = prompts in the batch, in batch order
    height: int
    width: int
    step: int             # sampling step index (0 = first model call of the run)
    t: float              # position in the training schedule, 1 = pure noise (DESIGN §10)
    timestep: float       # the raw model timestep
    branch: int           # index into BRANCHES: 0 = cond, 1 = uncond


class ActivationSource(Protocol):
    """Anything that can generate a batch and report the hooked block's outputs."""

    hookpoint: str
    model_id: str
    settings: dict  # generation settings, stored in the index (a resumed collection must match them)

    def run(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Capture]: ...


def branch_ids(branch: str) -> tuple[int, ...]:
    """'cond' | 'uncond' | 'both' -> branch ids to record."""
    if branch == "both":
        return (0, 1)
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES + ('both',)}, got {branch!r}")
    return (BRANCHES.index(branch),)


def specs_digest(specs: Sequence[PromptSpec]) -> str:
    payload = json.dumps([[s.prompt, s.labels] for s in specs], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def label_ids(spec: PromptSpec, vocab: dict[str, list[str]]) -> list[int]:
    """One label id per group of ``vocab`` (-1 = the spec has no label in that group)."""
    return [vocab[g].index(spec.labels[g]) if g in spec.labels else -1 for g in vocab]


def collect(source: ActivationSource, specs: Sequence[PromptSpec], out_dir: str | Path, *, seed: int = 0,
            batch_size: int = 1, dtype: str = "float16", shard_mb: float = 128.0, ctx: DistContext | None = None,
            progress: bool = True) -> Path:
    """Generate every spec once (sample id = spec index, seed = ``seed + sample id``) and store its records.

    Rerunning on the same ``out_dir`` resumes: samples already on disk are skipped. Under ``torchrun``
    (``ctx`` with W ranks) rank r takes samples r, r+W, ... into ``out_dir/part-<r>``, and once all ranks
    are done rank 0 writes one index over the parts (resume with the same number of ranks).
    """
    ctx = ctx or DistContext()
    rank, world_size = ctx.rank, ctx.world_size
    out_dir = Path(out_dir)
    root = out_dir if world_size == 1 else out_dir / f"part-{rank:03d}"
    vocab = label_vocabulary(specs)
    settings = {**source.settings, "seed": seed, "num_specs": len(specs), "specs_sha256": specs_digest(specs)}
    done = completed_samples(root)
    todo = [i for i in range(rank, len(specs), world_size) if i not in done]
    writer = None
    bar = tqdm(total=len(todo), desc=f"collect[{rank}]", disable=not progress, unit="sample")
    for start in range(0, len(todo), batch_size):
        ids = todo[start:start + batch_size]
        captures = source.run([specs[i].prompt for i in ids], [seed + i for i in ids])
        if not captures:
            raise RuntimeError(f"{source.hookpoint}: the hooked block produced no output for the chosen steps/branch")
        if writer is None:
            first = captures[0]
            writer = ShardWriter(root, d=first.tokens.shape[-1], height=first.height, width=first.width,
                                 label_vocab=vocab, hookpoint=source.hookpoint, model_id=source.model_id,
                                 source=settings, dtype=dtype, shard_mb=shard_mb)
        for j, sample_id in enumerate(ids):
            writer.write_sample(
                sample_id, torch.stack([c.tokens[j] for c in captures]),
                t=[c.t for c in captures], timestep=[c.timestep for c in captures],
                step=[c.step for c in captures], branch=[c.branch for c in captures],
                labels=label_ids(specs[sample_id], vocab))
        bar.update(len(ids))
    bar.close()
    if writer is not None:
        writer.close()
    if world_size > 1:
        ctx.barrier()
        parts = [out_dir / f"part-{r:03d}" for r in range(world_size)]
        if ctx.is_main:  # a rank with no samples (more ranks than prompts) wrote no part
            merge_parts(out_dir, [p for p in parts if (p / INDEX_NAME).exists()])
        ctx.barrier()
    return out_dir


def diffusers_submodule(unet: torch.nn.Module, hookpoint: str) -> torch.nn.Module:
    """``unet.up_blocks.1.attentions.1`` -> that module of the pipeline's UNet (names as diffusers has them)."""
    name = hookpoint.removeprefix("unet.")
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise ValueError(f"hookpoint {hookpoint!r}: the UNet has no module {name!r}") from None


class DiffusersSource:
    """A diffusers text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...).

    Hooks live only while `run` is inside the pipeline call. The UNet is called once per step with
    ``cat([uncond, cond])`` under CFG (diffusers' order) or with the cond batch alone when CFG is off.
    """

    def __init__(self, pipe, hookpoint: str, *, steps: int = 50, guidance_scale: float = 9.0,
                 every_n_steps: int = 1, branch: str = "cond", height: int | None = None,
                 width: int | None = None, model_id: str | None = None, model_family: str | None = None,
                 pipe_kwargs: dict | None = None):
        self.pipe = pipe
        self.hookpoint = hookpoint if hookpoint.startswith("unet.") else f"unet.{hookpoint}"
        self.block = diffusers_submodule(pipe.unet, self.hookpoint)
        self.steps, self.guidance_scale, self.every_n_steps = steps, guidance_scale, every_n_steps
        self.branches = branch_ids(branch)
        self.height, self.width = height, width
        self.pipe_kwargs = pipe_kwargs or {}
        self.model_id = model_id or str(getattr(pipe.config, "_name_or_path", "") or type(pipe).__name__)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        if model_family is None:
            name = type(pipe).__name__
            model_family = "sdxl" if "XL" in name else "sd15" if name == "StableDiffusionPipeline" else "unknown"
        self.settings = {"source": "diffusers", "model_family": model_family, "pipeline": type(pipe).__name__,
                         "scheduler": type(pipe.scheduler).__name__, "steps": steps,
                         "guidance_scale": guidance_scale, "every_n_steps": every_n_steps, "branch": branch,
                         "height": height, "width": width}

    @contextmanager
    def _hooks(self, batch: int, captures: list[Capture]) -> Iterator[None]:
        call = {"step": -1, "timestep": 0.0}

        def before_unet(module, args, kwargs):
            call["step"] += 1
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            call["timestep"] = float(torch.as_tensor(timestep).flatten()[0])

        def after_block(module, args, output):
            if call["step"] % self.every_n_steps:
                return
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            halves = {0: out} if out.shape[0] == batch else dict(zip((1, 0), out.chunk(2)))
            for branch in self.branches:
                if branch in halves:
                    captures.append(Capture(
                        block_to_tokens(halves[branch]).detach().to("cpu", torch.float16),
                        out.shape[2], out.shape[3], call["step"],
                        call["timestep"] / (self.num_train_timesteps - 1), call["timestep"], branch))

        handles = [self.pipe.unet.register_forward_pre_hook(before_unet, with_kwargs=True),
                   self.block.register_forward_hook(after_block)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Capture]:
        captures: list[Capture] = []
        device = getattr(self.pipe, "device", torch.device("cpu"))
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        with self._hooks(len(prompts), captures):
            self.pipe(prompt=list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      generator=generators, height=self.height, width=self.width, output_type="latent",
                      **self.pipe_kwargs)
        return captures


def load_diffusers_pipeline(model: str, *, device: str | None = None, dtype: str = "float32",
                            scheduler: str | None = None):
    """A pipeline from a local diffusers folder (``model_index.json``); ``scheduler``: e.g. "DDIMScheduler"."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
