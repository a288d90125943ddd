"""The toy world in ComfyUI: its model as MODEL, CLIP and VAE, and an empty image of the right shape."""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from saemnesia_comfy import sae_library
from saemnesia_comfy import toy_model

CATEGORY = "SAEmnesia/toy world"


def toy_model_names() -> list[str]:
    """The files of the toy folder that are toy-world models (not the judges beside them)."""
    names = folder_paths.get_filename_list(sae_library.TOY_FOLDER)
    return [n for n in names if toy_model.is_toy_model_file(folder_paths.get_full_path(sae_library.TOY_FOLDER, n))]


class ToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaToyModelLoader", display_name="Load Toy World Model (SAEmnesia)", category=CATEGORY,
            description="The toy world's small text-to-image model (SD1.5 block layout, 32×32 pixel space), for "
                        "trying concept erasure on a CPU. Use it with CLIPTextEncode, KSampler and VAEDecode.",
            inputs=[io.Combo.Input("model_name", options=toy_model_names(),
                                   tooltip="A toy-world model file (models/saemnesia_toy or the pack's models/toy).")],
            outputs=[io.Model.Output(tooltip="The toy diffusion model (v-prediction, pixel space)."),
                     io.Clip.Output(tooltip="Its text encoder on the CLIP tokenizer."),
                     io.Vae.Output(tooltip="Pixel-space VAE: latents are the image itself.")],
        )

    @classmethod
    def execute(cls, model_name):
        path = folder_paths.get_full_path_or_raise(sae_library.TOY_FOLDER, model_name)
        return io.NodeOutput(*toy_model.load_toy_model(path))


class ToyEmptyImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaToyEmptyLatent", display_name="Empty Toy Latent (SAEmnesia)", category=CATEGORY,
            description="An empty 3-channel pixel-space latent for the toy model (it was trained at 32×32).",
            inputs=[io.Int.Input("width", default=32, min=8, max=1024, step=8, tooltip="Width in pixels."),
                    io.Int.Input("height", default=32, min=8, max=1024, step=8, tooltip="Height in pixels."),
                    io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Images per batch.")],
            outputs=[io.Latent.Output(tooltip="Zeros [batch, 3, height, width].")],
        )

    @classmethod
    def execute(cls, width, height, batch_size):
        latent = torch.zeros((batch_size, 3, height, width), device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": latent})
