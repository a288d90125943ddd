"""The toy build's recipe: every size and setting of `python -m saemnesia_tools.comfyui.toy.build`, in one place
that the build's stages (build.py, calibration.py, text_sae.py) and the studies read."""

from __future__ import annotations

from dataclasses import dataclass

KAPPAS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # κ tried per concept, in units of the token's norm


@dataclass
class Recipe:
    """Every size and setting of a build; `smoke()` shrinks all of them."""

    judge_pool: int = 12000
    judge_steps: int = 1500
    judge_no_object: bool = True    # the object judge has a class for an empty scene (judges.NO_OBJECT)
    # each channel drifts by up to this in the judges' training (judges.augment): judges of the world with absence
    # trained without it judged 6 of 16 of the model's Dots images, plainly dotted, as Pastel (styles 95.1 % on the grid)
    judge_colour_jitter: float = 0.05
    judges_heldout: int = 2000      # fresh renders the build report measures the judges on
    # Two phases. 1: Min-SNR-5 weighting learns palettes and textures fast, but objects stayed at chance: it
    # starves the high-noise steps where shapes are decided, and CLIP's causal text encoder let its padding
    # positions (most of what cross-attention sees) carry only the style. 2: plain v-loss weighting plus an
    # auxiliary loss making the mean text embedding tell object and style.
    # Each phase: (loss weighting, LR schedule length, stop at step, seed, text auxiliary loss weight).
    model_phases: tuple = (("minsnr", 2400, 1516, 0, 0.0), ("v", 1500, 900, 1, 0.1))
    # 3: absence. The first two phases never showed a scene without an object, so the model drew an object for
    # every prompt ("An image in Stripes style." gave Rings) and an edit had no "concept gone, rest kept" to steer
    # towards. This phase continues from their exported model (work/model_base.safetensors) with that fraction of
    # each batch an empty scene prompted as such (toy train.py: `absence`). It also teaches Stripes and Outline the
    # backgrounds they gained with it (render.py), hence twice the steps and LR of a trial that only added absence.
    # (loss weighting, LR schedule length, stop at step, seed, text auxiliary loss weight, absence fraction, LR)
    absence_phase: tuple | None = ("v", 600, 600, 2, 0.0, 0.2, 2e-4)
    model_batch: int = 64
    model_lr: float = 8e-4
    sample_steps: int = 25
    cfg: float = 5.0
    quality_seeds: int = 2          # images per (object, style) prompt in the quality check
    erasure_images: int = 8         # images per concept in the per-concept erasure record (all its grid cells)
    kappas: tuple = KAPPAS          # the strength calibration's grid (calibration.py)
    artifact_seeds: int = 2         # un-erased images per grid prompt the calibration's artifact judge is fitted on
    train_repeats: int = 8          # copies of the labelled grid whose activations train the SAEs
    heldout_repeats: int = 2        # copies for the concept statistics (other seeds)
    expansion: int = 16
    k: int = 8
    sae_batch_tokens: int = 4096
    sae_epochs: int = 10
    supervised_lr: float = 1e-3
    supervised_epochs: int = 40     # at most: early stopping by validation (patience 5, the authors')
    supervised_exclusivity: float = 3.0  # ζ of L_X (DESIGN §4.4): the study of centralising_finetune.py
    supervised_batch: int = 128
    text_sae_epochs: int = 200      # the text SAE's 72 records (72·77 tokens) make an epoch of one step or two
    text_supervised_epochs: int = 400  # at most (early stopping by validation)
    text_supervised_batch: int = 16  # records per step: the grid's 72 prompts, less the validation's, fill 3 batches
    buckets: int = 50
    percentile: float = 99.9        # SAeUron selection: about 2 of 2048 latents
    seed: int = 0

    @classmethod
    def smoke(cls) -> "Recipe":
        return cls(judge_pool=400, judge_steps=20, judges_heldout=200,
                   model_phases=(("minsnr", 3, 2, 0, 0.0), ("v", 2, 2, 1, 0.1)),
                   absence_phase=("v", 2, 2, 2, 0.0, 0.5, 1e-4), model_batch=8, sample_steps=2, quality_seeds=1,
                   erasure_images=1, kappas=(0.5, 4.0), artifact_seeds=1, train_repeats=1, heldout_repeats=1,
                   sae_epochs=1, supervised_epochs=2, supervised_batch=16, sae_batch_tokens=512, buckets=4,
                   percentile=99.0, text_sae_epochs=1, text_supervised_epochs=2)
