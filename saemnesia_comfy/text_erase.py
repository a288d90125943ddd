"""Erase concepts in a ComfyUI CLIP text encoder: the Erase Concepts (text) node's whole behaviour (DESIGN §6.8).

A text SAE reads the token activations [B, 77, d] after one layer of a CLIP text encoder. Its hookpoint names the
encoder by ComfyUI's attribute for it (`clip_l`, `clip_g`) and the layer by the Hugging Face CLIPTextModel's
path, `clip_l.text_model.encoder.layers.5`: the same CLIP-L serves SD1.x, SDXL, SD3 and Flux, so one SAE file
serves all of them. The edit is the UNet edit (ConceptEraser) with one timestep bucket: encoding has no time.
It is an object patch on the layer's `forward` in a clone of the CLIP, so the original CLIP, and every prompt
encoded with it, stays as it was; tokens where no chosen concept fires keep their values bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saemnesia_core.eraser import ConceptEraser

from .erase import resolve_strengths, single_sae
from .patch import HookpointError, attach_weights
from .sae_library import LoadedSAE

ENCODERS = ("clip_l", "clip_g")
"""ComfyUI's attributes for the CLIP text encoders (SD1.x: clip_l; SDXL and SD3: clip_l and clip_g; Flux: clip_l)."""


def text_layers(clip) -> dict[str, str]:
    """Every layer a text SAE may read in this CLIP: hookpoint → module path in the CLIP's ModelPatcher."""
    layers = {}
    for name in ENCODERS:
        encoder = getattr(clip.cond_stage_model, name, None)
        text_model = getattr(getattr(encoder, "transformer", None), "text_model", None)
        if text_model is None:  # absent (SD3 without CLIP-G), or not a CLIP text model
            continue
        for i in range(len(text_model.encoder.layers)):
            layers[f"{name}.text_model.encoder.layers.{i}"] = f"{name}.transformer.text_model.encoder.layers.{i}"
    return layers


def layer_path(clip, hookpoint: str, d_in: int | None = None) -> str:
    """The module path of `hookpoint` in `clip`, checked against the width `d_in` (when given)."""
    layers = text_layers(clip)
    if hookpoint not in layers:
        raise HookpointError(f"hookpoint {hookpoint!r} is not a layer of this text encoder; its layers are: "
                             f"{', '.join(layers) or 'none (no CLIP text encoder)'}")
    width = clip.patcher.get_model_object(layers[hookpoint]).layer_norm1.normalized_shape[0]
    if d_in is not None and width != d_in:
        raise HookpointError(f"the SAE reads {d_in}-dimensional activations at {hookpoint}, but this text "
                             f"encoder's layer is {width} wide: the SAE was trained for another encoder")
    return layers[hookpoint]


def patch_layer_output(clip, path: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make `edit(output)` see and replace the output of the layer at `path` in `clip` (a clone of the caller's)."""
    key = f"{path}.forward"
    clip.patcher.add_object_patch(key, LayerOutputPatch(clip.patcher.get_model_object(key), edit))


class LayerOutputPatch:
    """The object patch on a layer's `forward`: runs what was there before (the layer's own forward, or an
    earlier patch, so that several nodes compose), then `edit(output)`."""

    def __init__(self, previous: Callable, edit: Callable[[torch.Tensor], torch.Tensor]):
        self.previous, self.edit = previous, edit

    def __call__(self, *args, **kwargs):
        return self.edit(self.previous(*args, **kwargs))


def erase_text_concepts(clip, sae: LoadedSAE, concepts: dict[str, float | None], strength: float,
                        mode: str = "exact"):
    """A clone of `clip` that erases `concepts` (label → strength, None = `strength`) at the SAE's layer for every
    prompt it encodes. With no concept chosen, `clip` itself is returned (after every input was checked)."""
    sae = single_sae(sae, "Erase Concepts (text)")
    if sae.file.reads != "output":
        raise HookpointError(f"{sae.name} reads a block's update (output − input); Erase Concepts (text) edits the "
                             "output of a text encoder layer")
    strengths = resolve_strengths(concepts, strength)
    sae = sae.with_latent_refs(strengths)
    # checks the labels (UnknownConceptError lists the known ones), the strengths and the mode
    eraser = ConceptEraser.from_file(sae.file, strengths, mode, sae=sae.sae)
    layer = layer_path(clip, sae.file.hookpoint, sae.file.config.d_in)
    if not strengths:
        return clip
    patched = clip.clone()
    patch_layer_output(patched, layer, lambda out: eraser(out, 0.0))
    attach_weights(patched.patcher, sae.patcher)
    return patched
