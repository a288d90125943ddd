"""The SAE nodes: Load SAE, Erase Concepts (on the model and on the text encoder), Concept Probe and Probe Report —
thin adapters over saemnesia_comfy."""

from __future__ import annotations

import json

from comfy_api.latest import io

from saemnesia_comfy import erase, probe as probing, sae_library, teach, text_erase
from saemnesia_comfy.patch import BRANCHES
from saemnesia_core.concepts import DEFAULT_EDIT, MAX_STRENGTH
from saemnesia_core.eraser import MODES

SAE = io.Custom("SAE")
PROBE = io.Custom("SAEMNESIA_PROBE")
CATEGORY = "SAEmnesia"
CONCEPTS_TOOLTIP = ('Concepts as JSON: a list of labels ["Hearts", "Neon"] or {"Hearts": -1.0, "Neon": null} '
                    "(null = the node's strength); \"#123\" names latent 123 of an SAE without that concept (type "
                    "#123 in the checklist's filter). The checklist writes this for you.")


class LoadSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaLoadSAE", display_name="Load SAE (SAEmnesia)", category=CATEGORY,
            description="Load a concept SAE from models/saemnesia (our .safetensors files, or checkpoint folders: "
                        "sparsify/SAeUron, SAEmnesia, SAEParate, sdxl-unbox, hub TopK). The weights are loaded once "
                        "and placed by ComfyUI's memory manager.",
            inputs=[io.Combo.Input("sae_name", options=sae_library.list_sae_entries(),
                                   tooltip="An SAE file or checkpoint folder in the saemnesia model folders. Each SAE "
                                           "reads what its authors trained it on, as its file says: the block's output "
                                           "(SAeUron, SAEmnesia, the toy world's), or the block's update, output − "
                                           "input (sdxl-unbox's SDXL SAEs, the Flux SAE, SAEmnesia's residual SAEs). "
                                           "The concept checklist and `saemnesia inspect` show which."),
                    SAE.Input("also", optional=True,
                              tooltip="SAEs of other blocks, from another Load SAE: they are passed on with this "
                                      "one, and Erase Concepts erases at every block each chosen concept is known "
                                      "at (one SAE per block).")],
            outputs=[SAE.Output(display_name="SAE", tooltip="The SAE: its weights, hookpoint and concepts (with "
                                                            "the SAEs chained into `also`).")],
        )

    @classmethod
    def fingerprint_inputs(cls, sae_name, also=None):
        return sae_library.fingerprint(sae_library.resolve_sae(sae_name))

    @classmethod
    def execute(cls, sae_name, also=None):
        loaded = sae_library.load_sae(sae_name)
        return io.NodeOutput(loaded if also is None else erase.chain_saes(also, loaded))


def _step_inputs():
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Where in sampling to start (0 = the first, noisiest step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Where in sampling to stop (1 = the last step)."),
    ]


class EraseConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaEraseConcepts", display_name="Erase Concepts (SAEmnesia)", category=CATEGORY,
            description="Suppress the chosen concepts in the SAE's block during sampling (a UNet transformer block, or "
                        "the image tokens of a Flux or SD3 transformer block). The model's weights "
                        "never change: remove the node and the model is exactly as before. A positive strength "
                        "amplifies instead (steering).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (it is cloned, never modified)."),
                SAE.Input("sae", tooltip="A concept SAE from Load SAE; its hookpoint must exist in this model. "
                                         "Several chained Load SAE nodes erase at several blocks."),
                io.String.Input("concepts", default="[]", multiline=False, tooltip=CONCEPTS_TOOLTIP),
                io.Float.Input("strength", default=DEFAULT_EDIT.strength, min=-MAX_STRENGTH, max=MAX_STRENGTH,
                               step=0.1,
                               tooltip="How strongly to erase. Negative erases: −1 is SAEmnesia's single knob, and for "
                                       "the concepts a file calibrates (the toy's SAEmnesia files: their block's "
                                       "group, where a κ erased better than the papers' formula) −1 is the "
                                       "strength measured to erase them. 0 ablates the "
                                       "concept's latent; positive amplifies the concept (steering). "
                                       "Formula (γ): a firing concept latent z becomes z·γ·μ, or, for a concept "
                                       "the file calibrates (κ), γ·κ·‖x‖ in exact mode, so that −1 is the "
                                       "strength measured to erase it; in replace mode, how far a detected token "
                                       "moves to its replacement (|γ|, at most 1); in shift mode, how many times "
                                       "the concept's mean difference from its absence is added (−1 takes it away "
                                       f"once). The defaults ({DEFAULT_EDIT.mode} mode, {DEFAULT_EDIT.branches} "
                                       f"branch, {DEFAULT_EDIT.strength:g}) removed the most on the toy world."),
                *_step_inputs(),
                io.Combo.Input("branches", options=list(BRANCHES), default=DEFAULT_EDIT.branches,
                               tooltip="Which classifier-free-guidance branch to edit: both (as the papers), "
                                       "cond only, or uncond only."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_EDIT.mode,
                               tooltip="exact: add only the change of the erased latents (identity elsewhere). "
                                       "paper: the released hooks' formula, to reproduce published numbers. "
                                       "replace: the SAE only detects the concept's tokens, which are replaced by "
                                       "the nearest tokens that do not carry it (strength: how far, |strength| "
                                       "capped at 1). shift: the SAE only detects the concept; an image where it "
                                       "fires moves by strength × the concept's mean difference from its absence "
                                       "(SAE files made from labelled images hold it, such as the toy's; best on "
                                       "the cond branch; Find Concept Latents measures it too). A file without it "
                                       "(an imported SAE) erases in exact mode instead, and the log says so."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Erase only inside this mask (white = erase); without it, everywhere. "
                                      "UNet blocks only for now."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the concepts erased during sampling.")],
        )

    @classmethod
    def execute(cls, model, sae, concepts, strength, start_percent, end_percent, branches, mode, mask=None):
        chosen = erase.parse_concepts(concepts)
        return io.NodeOutput(erase.erase_concepts(model, sae, chosen, strength, start_percent, end_percent,
                                                  branches, mode, mask))


class EraseConceptsText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaEraseConceptsText", display_name="Erase Concepts (text, SAEmnesia)", category=CATEGORY,
            description="Suppress the chosen concepts in a layer of the CLIP text encoder, for every prompt encoded "
                        "with the CLIP this node outputs: before sampling, for any model that uses this encoder "
                        "(CLIP-L: SD1.x, SDXL, SD3, Flux; CLIP-G: SDXL, SD3). The encoder's weights never change, and "
                        "prompts in which no chosen concept fires encode exactly as before.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder to patch (it is cloned, never modified)."),
                SAE.Input("sae", tooltip="A text-encoder SAE from Load SAE: its hookpoint names a layer of this "
                                         "encoder, e.g. clip_l.text_model.encoder.layers.5."),
                io.String.Input("concepts", default="[]", multiline=False, tooltip=CONCEPTS_TOOLTIP),
                io.Float.Input("strength", default=-1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.1,
                               tooltip="How strongly to erase, as in Erase Concepts: a firing concept latent z "
                                       "becomes z·γ·μ (or γ·κ·‖x‖ for a concept the file calibrates). Negative "
                                       "erases, 0 ablates, positive amplifies."),
                io.Combo.Input("mode", options=list(MODES), default="exact",
                               tooltip="exact: add only the change of the erased latents (identity elsewhere). "
                                       "paper: the released hooks' formula. replace: a token carrying the concept "
                                       "becomes the nearest prompt token that does not."),
            ],
            outputs=[io.Clip.Output(tooltip="The text encoder with the concepts erased from what it encodes.")],
        )

    @classmethod
    def execute(cls, clip, sae, concepts, strength, mode):
        chosen = erase.parse_concepts(concepts)
        return io.NodeOutput(text_erase.erase_text_concepts(clip, sae, chosen, strength, mode))


class ConceptProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaConceptProbe", display_name="Concept Probe (SAEmnesia)", category=CATEGORY,
            description="Record where the chosen concepts fire during sampling (nothing is edited). Connect the "
                        "probe to Probe Report with the decoded image for heatmaps and presence scores.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to observe (cloned, never modified)."),
                SAE.Input("sae", tooltip="A concept SAE from Load SAE."),
                io.String.Input("concepts", default="[]", multiline=False, tooltip=CONCEPTS_TOOLTIP),
                *_step_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model, observed while it samples."),
                     PROBE.Output(display_name="probe", tooltip="What the probe recorded in the last sampling.")],
        )

    @classmethod
    def execute(cls, model, sae, concepts, start_percent, end_percent):
        labels = list(erase.parse_concepts(concepts))
        m, record = probing.probe_concepts(model, erase.single_sae(sae, "Concept Probe"), labels, start_percent,
                                           end_percent)
        return io.NodeOutput(m, record)


class ProbeReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaProbeReport", display_name="Probe Report (SAEmnesia)", category=CATEGORY,
            description="Heatmaps of where each probed concept fired over each image, and presence scores.",
            inputs=[
                PROBE.Input("probe", tooltip="From Concept Probe, after its model has sampled."),
                io.Image.Input("images", tooltip="The decoded images of that sampling (they also order this node "
                                                 "after the sampler)."),
                io.Float.Input("flag_threshold", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Flag a concept in an image when it fires on at least this fraction of "
                                       "the recorded (step, position) pairs."),
            ],
            outputs=[io.Image.Output(display_name="heatmaps", tooltip="Each image overlaid with each concept's "
                                                                      "activation (image-major)."),
                     io.String.Output(display_name="report", tooltip="JSON: per image and concept, the presence "
                                                                     "score, peak and flag.")],
        )

    @classmethod
    def execute(cls, probe, images, flag_threshold):
        return io.NodeOutput(probing.overlays(probe, images), json.dumps(probing.report(probe, flag_threshold)))


class FindConceptLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="SAEmnesiaFindConceptLatents", display_name="Find Concept Latents (SAEmnesia)", category=CATEGORY,
            description="Teach an SAE a concept from prompts: the model samples prompts that show it and prompts "
                        "that do not, the SAE's latents at its block are recorded at every step, and the latents that "
                        "tell the two apart (SAeUron's score) become the concept, with their statistics per timestep. "
                        "Wire the SAE it outputs into Erase Concepts or Concept Probe; Save SAE keeps it.",
            inputs=[
                io.Model.Input("model", tooltip="The model the SAE belongs to (it samples the prompts; never "
                                                "modified)."),
                io.Clip.Input("clip", tooltip="Its text encoder, for the prompts."),
                SAE.Input("sae", tooltip="The SAE to teach (one Load SAE; with or without concepts)."),
                io.Latent.Input("latent", tooltip="The size to sample at (an Empty Latent Image, or Empty Toy Latent); "
                                                  "its batch is ignored."),
                io.String.Input("label", default="my concept", tooltip="The concept's name, as the checklist will "
                                                                        "list it."),
                io.String.Input("positive_prompts", multiline=True, default="",
                                tooltip="Prompts that show the concept, one per line (8 or more work best)."),
                io.String.Input("negative_prompts", multiline=True, default="",
                                tooltip="Prompts that do not show it, one per line; empty: the positive prompts with "
                                        "the concept's words taken out."),
                io.Int.Input("seeds", default=2, min=1, max=64, tooltip="Images per prompt (seeds 0, 1, …)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler, as in KSampler."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance, as in KSampler."),
                io.Combo.Input("selection", options=["top_n", "percentile"], default="top_n",
                               tooltip="top_n: the n latents of best score per timestep bucket; percentile: every "
                                       "latent above that percentile of the scores (SAeUron's rule)."),
                io.Int.Input("top_n", default=2, min=1, max=64, tooltip="Latents per bucket (selection top_n)."),
                io.Float.Input("percentile", default=99.99, min=50.0, max=99.9999, step=0.0001,
                               tooltip="Selection percentile: 99.99 keeps about 2 of 20480 latents."),
                io.String.Input("group", default="taught", tooltip="The group the checklist lists it under."),
                io.Boolean.Input("replace_existing", default=False,
                                 tooltip="Teach a label the SAE already knows again (off: that is an error)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the preview's images (without it, grey)."),
            ],
            outputs=[SAE.Output(display_name="SAE", tooltip="The SAE with the concept added."),
                     io.Image.Output(display_name="preview", tooltip="Where the found latents fire: on the first "
                                                                    "prompt that shows the concept, then on the first "
                                                                    "that does not."),
                     io.String.Output(display_name="report", tooltip="JSON: the latents found, how well they separate "
                                                                     "the prompts per timestep (AUROC), a warning "
                                                                     "when they do not.")],
        )

    @classmethod
    def execute(cls, model, clip, sae, latent, label, positive_prompts, negative_prompts, seeds, steps, sampler_name,
                scheduler, cfg, selection, top_n, percentile, group, replace_existing, vae=None):
        taught, preview, report = teach.find_concept_latents(
            model, clip, erase.single_sae(sae, "Find Concept Latents"), label, positive_prompts, negative_prompts,
            latent, seeds, steps, sampler_name, scheduler, cfg, selection, top_n, percentile, group, replace_existing,
            vae)
        return io.NodeOutput(taught, preview, json.dumps(report))


class SaveSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SAEmnesiaSaveSAE", display_name="Save SAE (SAEmnesia)", category=CATEGORY, is_output_node=True,
            description="Write an SAE (with the concepts taught to it) into the saemnesia model folder, so that Load "
                        "SAE and the checklist list it after a refresh.",
            inputs=[SAE.Input("sae", tooltip="The SAE to save (one, not a chain)."),
                    io.String.Input("filename", default="taught_sae", tooltip="A file name (no folders); "
                                                                              "'.safetensors' is added."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of that name.")],
            outputs=[io.String.Output(display_name="name", tooltip="The name Load SAE lists it under.")],
        )

    @classmethod
    def execute(cls, sae, filename, overwrite):
        path = teach.save_sae(erase.single_sae(sae, "Save SAE"), filename, overwrite)
        return io.NodeOutput(path.name, ui={"text": [path.name]})
