"""Erase concepts from a ComfyUI MODEL during sampling: the Erase Concepts node's whole behaviour."""

from __future__ import annotations

import json
import logging

from saemnesia_core.concepts import MAX_STRENGTH, check_known, latent_ref
from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.regions import item_weights, token_weights

from comfy.patcher_extension import CallbacksMP

from .dit import dit_family
from .patch import (ADDITIONAL_MODELS_KEY, UNCOND, StepGate, attach_weights, block_for, item_latent_index,
                    patch_block_output, weights_of)
from .sae_library import LoadedSAE, compute_dtype


def parse_concepts(text: str) -> dict[str, float | None]:
    """The `concepts` string: a JSON list of labels, or an object {label: strength or null}; empty = none.

    A null strength means "the node's strength"; a number must lie in the node's own range (±MAX_STRENGTH). A label
    given twice is an error (JSON objects would otherwise keep the last silently). This is what the checklist
    widget writes and what API prompts may send by hand.
    """
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"concepts must be JSON (a list of labels or an object label -> strength): {reason}") from None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(set(value)) != len(value):
            raise ValueError(f"concepts lists a label twice: {sorted({v for v in value if value.count(v) > 1})}")
        return {label: None for label in value}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out = {}
        for label, strength in value.items():
            if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                         or not abs(strength) <= MAX_STRENGTH):
                raise ValueError(f"strength of {label!r} must be null or a number from -{MAX_STRENGTH:g} to "
                                 f"{MAX_STRENGTH:g}, got {strength!r}")
            out[label] = None if strength is None else float(strength)
        return out
    raise ValueError("concepts must be a JSON list of labels or an object {label: strength}")


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"concepts gives a label twice: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def sae_sites(sae) -> list[LoadedSAE]:
    """One SAE, or the SAEs of a Load SAE chain (one per block, DESIGN §6.6), as a list; two for one block fail."""
    sites = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    blocks = [site.file.hookpoint for site in sites]
    twice = sorted({b for b in blocks if blocks.count(b) > 1})
    if twice:
        names = [site.name for site in sites if site.file.hookpoint in twice]
        raise ValueError(f"two SAEs read the same block {', '.join(twice)} ({', '.join(names)}): chain SAEs of "
                         "different blocks")
    return sites


def chain_saes(earlier, loaded: LoadedSAE) -> tuple[LoadedSAE, ...]:
    """What a Load SAE node with SAEs chained into it outputs: those SAEs and its own, one per block."""
    return tuple(sae_sites([*sae_sites(earlier), loaded]))


def single_sae(sae, node: str) -> LoadedSAE:
    """The SAE of a node that reads one (Erase Concepts (text), Concept Probe): a Load SAE chain is refused."""
    sites = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    if len(sites) > 1:
        raise ValueError(f"{node} reads one SAE, got {len(sites)} chained ({', '.join(s.name for s in sites)}): "
                         "connect a single Load SAE")
    return sites[0]


def with_latent_refs(sites: list[LoadedSAE], labels) -> list[LoadedSAE]:
    """The sites, each able to erase latents named by index ("#123", DESIGN §7) among `labels`: a reference names a
    latent of one SAE, so a chain of several refuses it."""
    refs = [label for label in labels if latent_ref(label) is not None
            and not any(label in loaded.labels for loaded in sites)]
    if refs and len(sites) > 1:
        raise ValueError(f"latent references ({', '.join(refs)}) name latents of one SAE, but {len(sites)} are "
                         "chained: "
                         "connect a single Load SAE")
    return [loaded.with_latent_refs(refs) for loaded in sites]


def resolve_strengths(concepts: dict[str, float | None], strength: float) -> dict[str, float]:
    """The `concepts` string's labels with their strengths: each its own, or the node's where it gave none."""
    return {label: strength if s is None else s for label, s in concepts.items()}


def mode_at(loaded: LoadedSAE, mode: str, strengths: dict[str, float]) -> str:
    """The mode a site erases in. Shift mode moves by the file's directions (DESIGN §6.9), which files made from
    labelled images or taught by Find Concept Latents hold; a file without them (an imported SAE, or concepts
    referenced by latent) erases the chosen concepts it knows in exact mode instead, and the log says so: the node's
    default works with every file."""
    if mode != "shift" or loaded.file.concept_tables.directions is not None:
        return mode
    if any(label in loaded.labels for label in strengths):
        logging.warning("Erase Concepts: %s holds no directions for shift mode (DESIGN §6.9); its concepts are "
                        "erased in exact mode", loaded.name)
    return "exact"


def erase_concepts(model, sae: LoadedSAE | tuple[LoadedSAE, ...], concepts: dict[str, float | None],
                   strength: float, start_percent: float = 0.0, end_percent: float = 1.0, branches: str = "both",
                   mode: str = "exact", mask=None, detection: str = "topk"):
    """A clone of `model` whose hooked block erases `concepts` (label → strength, None = `strength`), only inside
    `mask` (a ComfyUI MASK, [B, H, W] or [H, W]) when one is given. `detection`: ConceptEraser's (top-k, or the
    chosen latents' threshold alone). `sae`: one SAE, or several for different blocks (a Load SAE chain): each
    erases, at its own block, the chosen concepts it knows; every chosen concept must be known to one of them.

    With no concept chosen, `model` itself is returned (after every input was checked), in every mode: no node, no
    change, and nothing that could make ComfyUI load or page the model again.
    """
    if mask is not None:
        token_weights(mask, (1, 1))  # shape and range, before anything is patched
        if dit_family(model) is not None:  # the mask is resampled to a UNet block's [H, W] token grid
            raise ValueError("regional erasure (a MASK) works at UNet blocks only for now; this is a DiT model")
    strengths = resolve_strengths(concepts, strength)
    sites = with_latent_refs([loaded.for_dtype(compute_dtype(model)) for loaded in sae_sites(sae)], strengths)
    check_known(strengths, [label for loaded in sites for label in loaded.labels])

    def make_eraser(loaded, sae_weights, site_mode):  # the chosen concepts this site knows; checks strengths and mode
        chosen = {label: s for label, s in strengths.items() if label in loaded.labels}
        return ConceptEraser.from_file(loaded.file, chosen, site_mode, sae=sae_weights, detection=detection)

    modes = [mode_at(loaded, mode, strengths) for loaded in sites]
    erasers = [make_eraser(loaded, loaded.sae, m) for loaded, m in zip(sites, modes)]
    gate = StepGate(model, start_percent, end_percent, branches)
    if not strengths:  # checked like any other input, then given back as it came: no node, no change, no cost
        return model
    m = model.clone()
    uncond_seen = [False]  # in the current sampling run
    regions = {}  # the mask's token weights per (grid, device)

    def region(out, options):
        if mask is None:
            return None
        key = (tuple(out.shape[2:]), out.device)
        if key not in regions:
            regions[key] = token_weights(mask, key[0]).to(out.device)
        return item_weights(regions[key], item_latent_index(options, out.shape[0]))

    def edit_with(eraser):
        def edit(out, options, inp=None):  # inp: the block's input, for an SAE that reads the update
            uncond_seen[0] |= UNCOND in (options.get("cond_or_uncond") or ())
            items, t = gate.edits(options, out.shape[0])
            return eraser(out, t, items, region(out, options), base=inp) if any(items) else out
        return edit

    for loaded, eraser, site_mode in zip(sites, erasers, modes):
        if not eraser.strengths:
            continue

        def edit_for_copy(copy, loaded=loaded, site_mode=site_mode):  # a MultiGPU copy erases with its own SAE copy
            return edit_with(make_eraser(loaded, weights_of(copy, loaded.patcher), site_mode))

        f = loaded.file
        patch_block_output(m, block_for(m, f.hookpoint, f.config.d_in, f.tokens), edit_with(eraser), edit_for_copy,
                           with_input=f.reads == "update")
        attach_weights(m, loaded.patcher)
    if branches == "uncond":  # at cfg 1 ComfyUI skips the unconditional pass: nothing would be erased, silently
        def forget(_patcher):
            uncond_seen[0] = False

        def warn_if_unseen(_patcher):
            if not uncond_seen[0]:
                logging.warning("Erase Concepts (branches = uncond) erased nothing: this sampling had no "
                                "unconditional pass (cfg 1?)")

        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, ADDITIONAL_MODELS_KEY, forget)
        m.add_callback_with_key(CallbacksMP.ON_CLEANUP, ADDITIONAL_MODELS_KEY, warn_if_unseen)
    return m
