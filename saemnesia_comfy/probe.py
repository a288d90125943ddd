"""The concept detector: record where chosen concepts fire during sampling (nothing is edited), then turn
the record into heatmap overlays and per-image presence scores.

Per recorded step and conditional-branch image, a concept's map is Σ z_i over its selected latents at each
token; it "fires" at a token where that exceeds Σ θ(i, t) (its firing threshold, DESIGN §5.3). The presence
score is the fraction of (step, token) pairs where it fires; a deployment flags an image above a threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy.patcher_extension import CallbacksMP
from saemnesia_core.concepts import check_known
from saemnesia_core.activation_maps import concept_activation_maps
from saemnesia_core.timesteps import bucket_index

from .dit import dit_family
from .patch import COND, StepGate, attach_weights, block_for, item_branches, patch_block_output
from .sae_library import LoadedSAE, compute_dtype


class ProbeRecord:
    """Accumulates, per image and concept, activation maps and firing over the recorded steps (on the CPU)."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.reset()

    def reset(self) -> None:
        self.map_sum = None    # [B, C, H, W]
        self.fired = None      # [B, C] tokens that fired, summed over steps
        self.peak = None       # [B, C] max of map / threshold
        self.threshold_sum = None  # [B, C] Σθ of each concept, summed over steps
        self.tokens = 0        # tokens per image summed over steps
        self.steps = 0

    def add(self, maps: torch.Tensor, thresholds: torch.Tensor) -> None:
        """maps [B, C, H, W]; thresholds [B, C] (Σθ of each concept's latents at that item's step)."""
        maps, thresholds = maps.float().cpu(), thresholds.float().cpu()
        ratio = maps / thresholds.clamp_min(1e-6)[..., None, None]
        fired = (ratio > 1).flatten(2).sum(-1).float()
        peak = ratio.flatten(2).amax(-1)
        if self.map_sum is None or self.map_sum.shape != maps.shape:
            self.reset()
            self.map_sum, self.fired, self.peak = torch.zeros_like(maps), torch.zeros_like(fired), torch.zeros_like(peak)
            self.threshold_sum = torch.zeros_like(thresholds)
        self.map_sum += maps
        self.threshold_sum += thresholds
        self.fired += fired
        self.peak = torch.maximum(self.peak, peak)
        self.tokens += maps.shape[-1] * maps.shape[-2]
        self.steps += 1

    def scores(self) -> torch.Tensor:
        """[B, C] presence: fraction of recorded (step, token) pairs where the concept fired."""
        if self.map_sum is None:
            raise RuntimeError("nothing was recorded: connect the probed MODEL to a sampler that runs before this node")
        return self.fired / self.tokens

    def mean_maps(self) -> torch.Tensor:
        return self.map_sum / self.steps

    def mean_thresholds(self) -> torch.Tensor:
        return self.threshold_sum / self.steps


def probe_concepts(model, loaded: LoadedSAE, labels: list[str], start_percent=0.0, end_percent=1.0):
    """(clone of `model` that records, its ProbeRecord). Only conditional-branch items are recorded."""
    loaded = loaded.with_latent_refs(labels)
    check_known(labels, loaded.labels)
    if not labels:
        raise ValueError("choose at least one concept (or latent, #123) to probe")
    loaded = loaded.for_dtype(compute_dtype(model))
    tables = loaded.file.concept_tables
    index = [loaded.labels.index(label) for label in labels]
    record = ProbeRecord(labels)
    m = model.clone()
    block = block_for(m, loaded.file.hookpoint, loaded.file.config.d_in, loaded.file.tokens)
    if dit_family(m) is not None:  # its maps need the image's token grid, which a DiT block's tokens do not carry
        raise ValueError("Concept Probe reads UNet blocks only for now; this is a DiT model")
    gate = StepGate(m, start_percent, end_percent, "cond")

    def observe(out, options, inp=None):  # inp: the block's input, for an SAE that reads the update
        mask, t = gate.items(options, out.shape[0], out.device)
        branch = item_branches(options, out.shape[0]).to(out.device)
        cond = branch == COND
        if bool(mask.any()) and bool(mask[cond].all()):  # record steps in range, for all images at once
            signal = out if inp is None else out - inp
            maps = concept_activation_maps(loaded.sae, loaded.file.concepts, tables, signal[cond], t[cond], labels)
            buckets = bucket_index(t[cond], tables.num_buckets).cpu()
            theta = tables.thresholds[index].float().clamp_min(0)                       # [C, T, L]
            valid = tables.latents[index] >= 0
            per_bucket = (theta * valid).sum(-1)                                          # [C, T]
            record.add(maps, per_bucket[:, buckets].T)
        return out

    patch_block_output(m, block, observe, with_input=loaded.file.reads == "update")
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, "saemnesia_probe", lambda _patcher: record.reset())
    attach_weights(m, loaded.patcher)
    return m, record


def heat_colors(v: torch.Tensor) -> torch.Tensor:
    """[...,] in [0, 1] → [..., 3] black-red-yellow-white ("hot") colours."""
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], -1)


def overlays(record: ProbeRecord, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] → [B·C, H, W, 3]: each image with each concept's mean map over it (image-major).

    Maps are scaled by max(their peak, the firing threshold), so a concept that never fires stays dark.
    """
    maps = record.mean_maps()                                         # [B, C, h, w]
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"the probe recorded {maps.shape[0]} images but {images.shape[0]} were given")
    return overlay_maps(maps, record.mean_thresholds(), images)


def overlay_maps(maps: torch.Tensor, thresholds: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """maps [B, C, h, w] and their firing thresholds [B, C] over IMAGE [B, H, W, 3] → [B·C, H, W, 3]."""
    B, C = maps.shape[:2]
    H, W = images.shape[1:3]
    up = F.interpolate(maps.float().cpu(), size=(H, W), mode="bilinear", align_corners=False).clamp_min(0)
    scale = torch.maximum(up.flatten(2).amax(-1), thresholds.float().cpu().clamp_min(1e-6))[..., None, None]
    v = (up / scale).clamp(0, 1)[..., None]                           # [B, C, H, W, 1]
    img = images.float().cpu()[:, None]
    out = img * (1 - 0.65 * v) + heat_colors(v[..., 0]) * 0.65 * v
    return out.reshape(B * C, H, W, 3).clamp(0, 1)


def report(record: ProbeRecord, flag_threshold: float) -> dict:
    """Per image, per concept: presence score, peak activation / threshold, and whether it is flagged."""
    scores = record.scores()
    return {"threshold": flag_threshold, "steps_recorded": record.steps, "images": [
        {label: {"score": round(float(scores[b, c]), 5), "peak": round(float(record.peak[b, c]), 4),
                 "flagged": bool(scores[b, c] >= flag_threshold)} for c, label in enumerate(record.labels)}
        for b in range(scores.shape[0])]}
