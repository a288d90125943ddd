"""Find Concept Latents and Save SAE: teaching an SAE a concept inside ComfyUI, from prompts, with the model that is
already loaded (DESIGN §5.4), and keeping the result in the saemnesia model folder.

The model samples the prompts that show the concept and those that do not with ComfyUI's own sampling, in
process; a patch on the SAE's block encodes what the SAE reads there at every step and streams it into
`saemnesia_core.concept_finder.ConceptEvidence` (per timestep bucket, a few vectors of n and d floats); then the
concept's latents are selected and their statistics stored as the importer and `saemnesia stats` do, with its
direction for shift mode. ComfyUI's progress bar moves per step, Cancel stops within a step, and nothing is changed
before the end: the caller's MODEL, SAE and files stay as they were.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import torch

import comfy.model_management
import comfy.sample
import comfy.utils
import folder_paths

from saemnesia_core.concept_finder import (PREVIEW_SAMPLES, ConceptEvidence, FoundConcept, buckets_for,
                                           check_label, check_prompts, teach, without_concept)
from saemnesia_core.sae_file import save_sae_file
from saemnesia_core.timesteps import bucket_index

from .patch import StepGate, attach_weights, block_for, patch_block_output
from .probe import overlay_maps
from .sae_library import SAE_FOLDER, LoadedSAE

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}")
BATCH = 4
"""Prompts sampled together (more would hold more images in memory at once)."""


def prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def batch_conditioning(conds: list) -> list:
    """One CONDITIONING per prompt -> one batched CONDITIONING (batch dims concatenated in prompt order)."""
    firsts = [c[0] for c in conds]
    options = {}
    for key, value in firsts[0][1].items():
        if isinstance(value, torch.Tensor) and all(isinstance(f[1].get(key), torch.Tensor) for f in firsts):
            value = torch.cat([f[1][key] for f in firsts])
        options[key] = value
    return [[torch.cat([f[0] for f in firsts]), options]]


def find_concept_latents(model, clip, loaded: LoadedSAE, label: str, positive_text: str, negative_text: str,
                         latent: dict, seeds: int = 2, steps: int = 20, sampler: str = "euler",
                         scheduler: str = "normal", cfg: float = 5.0, selection: str = "top_n", top_n: int = 2,
                         percentile: float = 99.99, group: str = "taught", replace_existing: bool = False,
                         vae=None) -> tuple[LoadedSAE, torch.Tensor, dict]:
    """(the SAE with the concept added, the preview IMAGE [2, H, W, 3], the report). Negatives default to the
    positive prompts with the concept's words taken out."""
    label = check_label(label, [c.label for c in loaded.file.concepts], replace_existing)
    positives = prompt_lines(positive_text)
    negatives = prompt_lines(negative_text) or [without_concept(p, label) for p in positives]
    check_prompts(positives, negatives)
    f = loaded.file
    block = block_for(model, f.hookpoint, f.config.d_in, f.tokens)  # before any sampling: a clear error first
    started = time.perf_counter()
    T = buckets_for(f.num_buckets, bool(f.concepts))
    evidence = ConceptEvidence(f.config.num_latents, T, d_in=f.config.d_in)
    shape = latent["samples"].shape[1:]
    finals = {}
    pbar = comfy.utils.ProgressBar(seeds * steps * sum(-(-len(p) // BATCH) for p in (positives, negatives)))
    for seed in range(seeds):  # every prompt of a seed starts from the same noise
        for positive, prompts in ((True, positives), (False, negatives)):
            for first in range(0, len(prompts), BATCH):
                batch = prompts[first:first + BATCH]
                m = _recording_clone(model, loaded, block, evidence, positive, seed * len(prompts) + first, T)
                noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).expand(
                    len(batch), *shape).contiguous()
                out = comfy.sample.sample(
                    m, noise, steps, cfg, sampler, scheduler, batch_conditioning([_encode(clip, p) for p in batch]),
                    _encode(clip, ""), torch.zeros_like(noise), callback=_progress(pbar), disable_pbar=True,
                    seed=seed)
                if seed == 0 and first == 0:
                    finals[positive] = out[:1]
    found = FoundConcept.from_evidence(label, evidence, selection, top_n, percentile)
    how = {"positives": positives, "negatives": negatives, "seeds": seeds, "steps": steps, "sampler": sampler,
           "scheduler": scheduler, "cfg": cfg, "selection": selection, "top_n": top_n, "percentile": percentile,
           "model": type(model.model).__name__, "separation_auroc": round(found.separation, 4),
           "seconds": round(time.perf_counter() - started, 1)}
    taught = replace(loaded, file=teach(f, found, group, how))
    preview = _preview(evidence, found, finals, vae)
    report = {"label": label, "group": group, "buckets": T, "selection": selection,
              "latents": sorted({int(i) for i in found.tables.latents.flatten().tolist() if i >= 0}),
              "auroc_per_bucket": [None if a is None else round(a, 3) for a in found.auroc],
              "separation_auroc": round(found.separation, 3), "warning": found.warning,
              "positives": len(positives), "negatives": len(negatives), "seeds": seeds, "steps": steps,
              "seconds": round(time.perf_counter() - started, 1)}
    return taught, preview, report


def _encode(clip, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _progress(pbar):
    def callback(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops within a step
        pbar.update(1)
    return callback


def _recording_clone(model, loaded: LoadedSAE, block: str, evidence: ConceptEvidence, positive: bool,
                     first_sample: int, num_buckets: int):
    """A clone of `model` whose block feeds the conditional branch's codes of the SAE, and its mean tokens, into
    `evidence`."""
    m = model.clone()
    gate = StepGate(m, 0.0, 1.0, "cond")
    sae = loaded.sae

    def record(out, options, inp=None):
        edit, t = gate.edits(options, out.shape[0])
        rows = [i for i, e in enumerate(edit) if e]
        if not rows:
            return out
        signal = out[rows] if inp is None else out[rows] - inp[rows]
        tokens = signal if signal.dim() == 3 else signal.flatten(2).transpose(1, 2)
        grid = tuple(signal.shape[2:]) if signal.dim() == 4 else (1, tokens.shape[1])
        with torch.no_grad():
            code = sae.encode(tokens.to(sae.device))
        buckets = bucket_index(torch.tensor([t[i] for i in rows]), num_buckets).tolist()
        samples = [first_sample + j for j in range(len(rows))]
        evidence.add(code.top_acts, code.top_indices, grid, buckets, positive, samples, tokens.mean(1))
        return out

    patch_block_output(m, block, record, with_input=loaded.file.reads == "update")
    attach_weights(m, loaded.patcher)
    return m


def _preview(evidence: ConceptEvidence, found: FoundConcept, finals: dict, vae) -> torch.Tensor:
    """The found latents' mean activation over the first positive and the first negative sample, over their images
    (decoded with `vae`, or grey without one): IMAGE [2, H, W, 3]."""
    maps, thresholds = [], []
    for positive in (True, False):
        total, seen, grid = None, 0, (1, 1)
        for bucket, values, indices, grid in evidence.previews[positive]:
            chosen = found.tables.latents[0, bucket]
            picked = torch.isin(indices, chosen[chosen >= 0])
            step_map = (values.float() * picked).sum(-1)                           # [N]
            total = step_map if total is None else total + step_map
            seen += 1
        maps.append((total / max(seen, 1)).reshape(grid) if total is not None else torch.zeros(grid))
        thresholds.append(float(found.tables.thresholds[0].clamp_min(0).sum(-1).mean()))
    maps = torch.stack([mp[None] for mp in maps])                                  # [2, 1, h, w]
    if vae is not None:
        images = vae.decode(torch.cat([finals[True], finals[False]])).float().cpu()
        images = images.reshape(-1, *images.shape[-3:])[:PREVIEW_SAMPLES]
    else:
        images = torch.full((PREVIEW_SAMPLES, 256, 256, 3), 0.35)
    return overlay_maps(maps, torch.tensor(thresholds)[:, None], images)


def save_sae(loaded: LoadedSAE, name: str, overwrite: bool = False) -> Path:
    """Write an SAE (its weights, concepts and provenance) into the first saemnesia model folder as `name` (a file name
    of letters, digits, spaces, dots, dashes and underscores; ".safetensors" added), whole or not at all. An existing
    file is kept unless `overwrite`."""
    name = (name or "").strip()
    stem = name.removesuffix(".safetensors")
    if not FILE_NAME.fullmatch(stem) or ".." in stem:
        raise ValueError(f"invalid SAE file name {name!r}: letters, digits, spaces, dots, dashes and underscores, "
                         "starting with a letter or digit, no folders")
    folder = Path(folder_paths.get_folder_paths(SAE_FOLDER)[0])
    path = folder / f"{stem}.safetensors"
    if path.exists() and not overwrite:
        raise ValueError(f"{path.name} already exists in the saemnesia model folder: choose another name, or switch on "
                         "overwrite")
    weights = {k: v.detach().cpu() for k, v in loaded.sae.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_sae_file(replace(loaded.file, weights=weights), path)
    return path

