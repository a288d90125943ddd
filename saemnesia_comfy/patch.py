"""Patching one block of a ComfyUI MODEL so that a function sees, and may replace, its output: a UNet's transformer
block ([B, C, H, W]) or a DiT's double-stream / joint block (its image tokens [B, N, d], `dit`), and, for an SAE
that reads the block's update (output − input), the block's input beside it.

The patch is an object patch on the block's `forward` (DESIGN §6.3): ComfyUI still sees the real block (its
isinstance dispatch and argument list are kept, and DiT block-replace patches still call it), the patch wraps
whatever was there before (so erasure nodes compose), it lives only in the clone it was added to, and ComfyUI
undoes it when the model is unpatched. Per batch item, the step comes from the sigma ComfyUI passes in
`transformer_options` and the CFG branch from `cond_or_uncond` — never from a call counter.
"""

from __future__ import annotations

import copy
import types
from typing import Callable

import torch

import comfy.utils
from comfy.patcher_extension import CallbacksMP

from .dit import JOINED, block_kind, dit_blocks, dit_family

COND, UNCOND = 0, 1
BRANCHES = {"both": (COND, UNCOND), "cond": (COND,), "uncond": (UNCOND,)}


class HookpointError(ValueError):
    """The SAE's hookpoint does not exist in this model, or its width differs from the SAE's."""


def comfy_block_name(model, hookpoint: str) -> str:
    """`unet.up_blocks.1.attentions.1` → `output_blocks.4.1` (a UNet), `transformer.transformer_blocks.3` →
    `double_blocks.3` (Flux) or `joint_blocks.3` (SD3): from ComfyUI's own key map for this model's config."""
    family = dit_family(model)
    if family is not None:
        blocks = dit_blocks(model, family)
        if hookpoint not in blocks:
            raise HookpointError(f"hookpoint {hookpoint!r} is not a block this {family.name} model's SAEs can read; "
                                 f"its blocks are: {', '.join(blocks) or 'none'}")
        return blocks[hookpoint]
    config = model.model.model_config.unet_config
    if "num_res_blocks" not in config:
        raise HookpointError(f"this model ({type(getattr(model.model, 'diffusion_model', None)).__name__}) is "
                             "neither a UNet nor a DiT family with hookpoints (SD1.x, SDXL, Flux, SD3)")
    key_map = comfy.utils.unet_to_diffusers(config)
    diffusers_key = f"{hookpoint.removeprefix('unet.')}.proj_out.weight"
    if diffusers_key not in key_map:
        known = sorted("unet." + k.removesuffix(".proj_out.weight") for k in key_map if k.endswith(".proj_out.weight"))
        raise HookpointError(f"hookpoint {hookpoint!r} is not a transformer block of this model; "
                             f"its transformer blocks are: {', '.join(known) or 'none'}")
    return key_map[diffusers_key].removesuffix(".proj_out.weight")


def check_block_width(model, block: str, d_in: int, hookpoint: str) -> None:
    """The block's channel count (a DiT's token width) must equal the SAE's input width."""
    module = model.get_model_object(f"diffusion_model.{block}")
    kind = block_kind(module)
    channels = kind.width(module) if kind is not None else module.in_channels
    if channels != d_in:
        raise HookpointError(f"the SAE reads {d_in}-dimensional activations at {hookpoint}, but this model's "
                             f"{block} has {channels} channels: the SAE was trained for another model")


def block_for(model, hookpoint: str, d_in: int, tokens: str = "") -> str:
    """The ComfyUI block an SAE of this hookpoint, width and token layout reads in `model`, checked (HookpointError
    otherwise): a UNet block's tokens are its whole map; a DiT block's edit reaches its image tokens, so an SAE of its
    text tokens cannot serve."""
    block = comfy_block_name(model, hookpoint)
    check_block_width(model, block, d_in, hookpoint)
    dit = block_kind(model.get_model_object(f"diffusion_model.{block}")) is not None
    usable = ("image", "joined") if dit else ("block",)
    if tokens and tokens not in usable:
        raise HookpointError(f"the SAE reads the {tokens} tokens of {hookpoint}, but Erase Concepts reads and edits "
                             f"{'the image tokens of a DiT block' if dit else 'the whole map of a UNet block'}")
    return block


ADDITIONAL_MODELS_KEY = "saemnesia_sae"


def attach_weights(patcher, sae_patcher) -> None:
    """Hand an SAE's ModelPatcher to ComfyUI's memory manager with the patched model's (or CLIP's) patcher: once,
    however many edits use it."""
    attached = patcher.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    if not any(p.model is sae_patcher.model for p in attached):
        patcher.set_additional_models(ADDITIONAL_MODELS_KEY, attached + [sae_patcher])


def weights_of(model, sae_patcher):
    """The copy of an SAE's weights that `model` carries: its own, or on a MultiGPU copy of the model the one ComfyUI
    made with it for that device (a copy of the same patcher shares its clone_base_uuid)."""
    for patcher in model.get_additional_models_with_key(ADDITIONAL_MODELS_KEY):
        if patcher.clone_base_uuid == sae_patcher.clone_base_uuid:
            return patcher.model.sae
    raise RuntimeError("this model carries no copy of the SAE's weights")


_REBIND_KEY = "saemnesia_block_patches"
# ComfyUI's callbacks when it makes or matches a MultiGPU copy of a model (none before 0.23)
MULTIGPU_CALLBACKS = [getattr(CallbacksMP, name) for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES")
                      if hasattr(CallbacksMP, name)]


class BlockOutputPatch:
    """The object patch on a block's `forward`: runs what was there before (the block's own forward, or an
    earlier patch), then `edit(output, transformer_options)` on its output, or on its image tokens for a DiT block
    (its text tokens pass unchanged).

    It remembers how it was made so that a MultiGPU clone (ComfyUI 0.23+: a fresh copy of the model per device)
    can rebuild it on that copy's own block with that copy's own weights (`rebind`): ComfyUI copies object
    patches to such clones as they are, still bound to the original device's module.
    """

    def __init__(self, module, previous: Callable, edit: Callable, make_edit: Callable, with_input: bool = False):
        self.module, self.previous, self.edit, self.make_edit = module, previous, edit, make_edit
        self.with_input = with_input
        kind = block_kind(module)
        self.image = None if kind is None else kind.image
        self.image_input = (0, "x") if kind is None else kind.image_input

    def __call__(self, *args, **kwargs):
        inp = self._input(args, kwargs) if self.with_input else None  # before the block: some add to it in place
        out = self.previous(*args, **kwargs)
        if self.image is None:  # a UNet block, called as block(x, context, transformer_options)
            options = kwargs.get("transformer_options", args[2] if len(args) > 2 else None) or {}
            return self._edit(out, options, inp)
        options = kwargs.get("transformer_options") or {}  # DiT blocks get it by keyword
        if self.image == JOINED:  # text tokens, then image tokens (dit_blocks offers these only where marked)
            start, end = options["img_slice"]
            image_in = None if inp is None else inp[:, start:end]
            return torch.cat([out[:, :start], self._edit(out[:, start:end], options, image_in), out[:, end:]], 1)
        pair = list(out)
        pair[self.image] = self._edit(pair[self.image], options, inp)
        return tuple(pair)

    def _edit(self, out, options, inp):
        return self.edit(out, options, inp) if self.with_input else self.edit(out, options)

    def _input(self, args, kwargs):
        """The block's input (its image tokens' argument): what an SAE of the block's update subtracts."""
        position, name = self.image_input
        inp = kwargs.get(name, args[position] if len(args) > position else None)
        if not isinstance(inp, torch.Tensor):
            raise HookpointError(f"the SAE reads the update (output − input) of {type(self.module).__name__}, but the "
                                 f"block was called without its input ({name!r}): it cannot be read here")
        return inp.clone()

    def rebind(self, model, module) -> BlockOutputPatch:
        """This patch on `model`, whose block is `module`."""
        previous = self.previous
        if isinstance(previous, BlockOutputPatch):
            previous = previous.rebind(model, module)
        elif getattr(previous, "__self__", None) is self.module:  # the block's own (or another pack's) method
            previous = types.MethodType(previous.__func__, module)
        return BlockOutputPatch(module, previous, self.make_edit(model), self.make_edit, self.with_input)


def patch_block_output(model, block: str, edit: Callable[..., torch.Tensor],
                       make_edit: Callable[[object], Callable] | None = None, with_input: bool = False) -> None:
    """Make `edit(output, transformer_options)` see and replace the output of `diffusion_model.<block>` in `model`;
    with `with_input`, `edit(output, transformer_options, input)` also gets the block's input (a DiT block's image
    tokens, as its output). An edit that holds weights of its own gives `make_edit(model_copy)`, which makes the edit
    for a MultiGPU copy of the model (with that copy's weights); without it, copies share `edit`."""
    key = f"diffusion_model.{block}.forward"
    module = model.get_model_object(f"diffusion_model.{block}")
    previous = model.get_model_object(key)  # the block's own forward, or an earlier patch in this clone chain
    model.add_object_patch(key, BlockOutputPatch(module, previous, edit, make_edit or (lambda _copy: edit), with_input))
    for hook in MULTIGPU_CALLBACKS:  # one registration however many patches (rebinding covers the whole chain)
        model.remove_callbacks_with_key(hook, _REBIND_KEY)
        model.add_callback_with_key(hook, _REBIND_KEY, _rebind_block_patches)


def _rebind_block_patches(_original, copy) -> None:
    """Rebuild our block patches of a MultiGPU copy on the copy's own modules (ComfyUI copied them unchanged)."""
    for key, value in list(copy.object_patches.items()):
        if isinstance(value, BlockOutputPatch):
            module = copy.get_model_object(key.removesuffix(".forward"))
            if value.module is not module:
                copy.object_patches[key] = value.rebind(copy, module)


class StepGate:
    """Which batch items of a block call an edit applies to, and their t ∈ [0, 1] of the training schedule.

    start/end percent follow ComfyUI's convention (0 = the start of sampling), converted to sigmas with the
    model's own `percent_to_sigma`, so the range means the same for every sampler and step count.
    """

    def __init__(self, model, start_percent: float, end_percent: float, branches: str):
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {', '.join(BRANCHES)}, got {branches!r}")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
        self.model_sampling, self._host = model.get_model_object("model_sampling"), None
        # as float32, the sigmas' own dtype, so that comparing them on the host decides as on the device
        self.sigma_start, self.sigma_end = (
            torch.tensor(float(self.model_sampling.percent_to_sigma(p)), dtype=torch.float32).item()
            for p in (start_percent, end_percent))
        self.branches = BRANCHES[branches]

    def edits(self, options: dict, batch: int) -> tuple[list[bool], list[float]]:
        """Per item of a block call on `batch` items, whether the edit applies and its t ∈ [0, 1], worked out on the
        host (one copy of the call's sigmas; a copy of the model's schedule there), so the edit launches no kernels
        for its bookkeeping."""
        sigmas = options.get("sigmas")
        if sigmas is None:  # not inside a sampler (e.g. a direct apply_model call): nothing to edit
            return [False] * batch, [0.0] * batch
        sigmas = item_sigmas(sigmas.detach().to("cpu", torch.float32), batch)
        branch = item_branches(options, batch).tolist()
        edit = [self.sigma_end <= s <= self.sigma_start and b in self.branches for s, b in zip(sigmas.tolist(), branch)]
        return edit, schedule_position(self._host_sampling(), sigmas).tolist()

    def items(self, options: dict, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`edits` as tensors on `device`: (mask bool [B], t float [B])."""
        edit, t = self.edits(options, batch)
        return torch.tensor(edit, device=device), torch.tensor(t, device=device)

    def _host_sampling(self):
        """The model's sampling schedule on the CPU (a copy, made once: it is small)."""
        if self._host is None:
            self._host = copy.deepcopy(self.model_sampling).to("cpu")
        return self._host


def schedule_position(model_sampling, sigmas: torch.Tensor) -> torch.Tensor:
    """t ∈ [0, 1] of the model's training schedule for each sigma (DESIGN §10): its timestep as the model's own
    `model_sampling` computes it, relative to those of the schedule's smallest and largest sigma. Discrete ε/v
    schedules: timestep / 999; flow matching (SD3, Flux): about sigma, whatever the model's timestep scale."""
    first, last = (model_sampling.timestep(s.reshape(1).to(sigmas.device)).float()
                   for s in (model_sampling.sigma_min, model_sampling.sigma_max))
    return ((model_sampling.timestep(sigmas).float() - first) / (last - first)).clamp(0.0, 1.0)


def item_sigmas(sigmas: torch.Tensor, batch: int) -> torch.Tensor:
    """One sigma per batch item: ComfyUI passes the latent batch's sigmas once, and a call holds one copy of
    the latent batch per cond/uncond chunk (chunk-major)."""
    sigmas = sigmas.reshape(-1)
    if batch % sigmas.numel():
        raise ValueError(f"batch of {batch} does not hold whole copies of {sigmas.numel()} sigmas")
    return sigmas.repeat(batch // sigmas.numel())


def _chunks(options: dict, batch: int) -> list[int]:
    """`cond_or_uncond`: one entry (0 cond, 1 uncond) per equal chunk of the batch, chunk-major."""
    chunks = options.get("cond_or_uncond") or [COND]
    if batch % len(chunks):
        raise ValueError(f"batch of {batch} does not split into {len(chunks)} cond/uncond chunks")
    return chunks


def item_latent_index(options: dict, batch: int) -> torch.Tensor:
    """Each batch item's index in the latent batch: the call holds one copy of it per cond/uncond chunk."""
    chunks = _chunks(options, batch)
    return torch.arange(batch // len(chunks)).repeat(len(chunks))


def item_branches(options: dict, batch: int) -> torch.Tensor:
    """0 (cond) or 1 (uncond) per batch item."""
    chunks = _chunks(options, batch)
    return torch.tensor(chunks).repeat_interleave(batch // len(chunks))
