"""The evaluation's images: generated in-process through the Erase Concepts node's own patch path, cached on disk
by content, and judged (DESIGN §9). What is generated is `saemnesia_tools.toy.evaluation.protocol`'s business."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from saemnesia_core.concepts import build_tables, select_saeuron
from saemnesia_core.files import atomic_path
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.evaluation.protocol import (ENCODER_BLOCK, LOOKS, MULTI_SITE, OBJECT, PAPER_PERCENTILES,
                                                    SAE_METHODS, TEXT, Item, Judged, Protocol, Setting, quality_items,
                                                    scaled_percentile)
from saemnesia_tools.toy.evaluation.quality import ArtifactJudge
from saemnesia_tools.toy.judges import Judges
from saemnesia_tools.toy.render import OBJECTS, SIZE, STYLES
from saemnesia_tools.training import concept_activations, saeuron_grid

from ..capture import collect_from_comfy
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import LoadedSAE, load_sae_path
from saemnesia_comfy.text_erase import erase_text_concepts
from .build import HELDOUT_SEED_OFFSET
from saemnesia_comfy.toy_model import load_toy_model
from .sampling import PromptEncoder, generate


def asset_name(method: str, group: str) -> str:
    """The name (and CLI flag) of the SAE file `method` erases `group`'s concepts with: saemnesia, saeuron,
    saemnesia_styles, saeuron_styles, and text (one file for both groups)."""
    return method if group == OBJECT or method == TEXT else f"{method}_{group}s"


ENCODER = "saemnesia_encoder"  # the SAEmnesia file at assets.ENCODER_SITE, one of each group's multi-site files
DEFAULT_ASSETS = {"model": assets.path(assets.MODEL), "judges": assets.path(assets.JUDGES),
                  **{asset_name(method, group): assets.path(site.sae(method))
                     for group, site in assets.SITES.items() for method in SAE_METHODS},
                  ENCODER: assets.path(assets.ENCODER_SITE.saemnesia), TEXT: assets.path(assets.TEXT_SAE)}


def multi_site_assets(group: str) -> tuple[str, ...]:
    """The names of the group's SAEmnesia files at every block that reads it (assets.MULTI_SITE), in its order."""
    names = {site.saemnesia: asset_name("saemnesia", g) for g, site in assets.SITES.items()}
    return tuple(names.get(site.saemnesia, ENCODER) for site in assets.MULTI_SITE[group])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Runner:
    """Generates (cached) and judges the images of a setting, through the same patch path as the nodes."""

    def __init__(self, paths: dict[str, Path], protocol: Protocol, cache: Path, progress: bool = True):
        self.protocol, self.cache, self.progress = protocol, Path(cache), progress
        missing = [f"{k}: {p}" for k, p in paths.items() if not Path(p).exists()]
        if missing:
            raise FileNotFoundError("missing evaluation assets (build them with python -m saemnesia_tools.comfyui.toy.build):"
                                    "\n  " + "\n  ".join(missing))
        self.assets = {k: Path(p) for k, p in paths.items()}
        self.digests = {k: _file_digest(p) for k, p in self.assets.items()}
        self.model, self.clip, self.vae = load_toy_model(self.assets["model"])
        self.encoder = PromptEncoder(self.clip)
        self.judges = Judges.load(self.assets["judges"])
        self.saes = {(method, group): load_sae_path(self.assets[asset_name(method, group)])
                     for group in assets.SITES for method in SAE_METHODS}
        self.text_sae = load_sae_path(self.assets[TEXT])
        saemnesia = {asset_name("saemnesia", group): self.saes[("saemnesia", group)] for group in assets.SITES}
        saemnesia[ENCODER] = self.encoder_block_sae = load_sae_path(self.assets[ENCODER])
        self.multi_site = {group: tuple(saemnesia[name] for name in multi_site_assets(group)) for group in assets.SITES}
        self._text_encoders: dict[Setting, PromptEncoder] = {}
        self.scores, self.means = {}, {}
        self._saeuron_variants: dict[tuple, LoadedSAE] = {}
        self._artifact_judge: ArtifactJudge | None = None
        self._kid_reference: dict = {}
        self.generated = self.cached = 0
        self.bar = None

    # SAeUron mode: latents re-selected by score at other percentiles from held-out activations
    def prepare_saeuron(self, group: str) -> dict:
        """Collect held-out activations at the group's SAeUron SAE's block (the build's own prompts, seeds and
        settings when its recipe is in the file), compute μ and scores once; per setting only the selection changes."""
        key = ("saeuron", group)
        f = self.saes[key].file
        recipe = f.provenance.get("recipe", {})
        repeats, seed = recipe.get("heldout_repeats", 2), recipe.get("seed", 0) + HELDOUT_SEED_OFFSET
        steps, cfg = recipe.get("sample_steps", 25), recipe.get("cfg", 5.0)
        where = self.cache / f"heldout_acts_{_digest([self.digests['model'], f.hookpoint, repeats, seed, steps, cfg])}"
        data = collect_from_comfy(self.model, lambda p: [[self.encoder(p), {}]],
                                  saeuron_grid(list(OBJECTS), list(STYLES), repeats=repeats), where,
                                  hookpoint=f.hookpoint, steps=steps, cfg=cfg, sampler="euler", scheduler="normal",
                                  width=SIZE, height=SIZE, seed=seed, batch_size=72, model_id="saemnesia-toy-world",
                                  model_family="toy", progress=self.progress)
        sae = self.saes[key].sae.float()  # in place: the statistics need fp32, the edit casts anyway
        acts = concept_activations(sae, data, num_buckets=f.num_buckets, progress=False)
        if acts.concepts != [(c.group, c.label) for c in f.concepts]:
            raise ValueError(f"{self.assets[asset_name(*key)]}: its concepts differ from the held-out labels "
                             f"{acts.concepts}")
        self.scores[group], self.means[group] = acts.scores(), acts.means()
        n, scores = f.config.num_latents, self.scores[group]
        return {"hookpoint": f.hookpoint, "num_latents": n, "heldout_samples": len(OBJECTS) * len(LOOKS) * repeats,
                "heldout_seed": seed, "heldout_steps": steps, "kept": {
                    m: {"percentile": scaled_percentile(n, m), "paper_percentile_at_20480": PAPER_PERCENTILES.get(m),
                        "mean_latents_per_bucket": float((select_saeuron(scores, scaled_percentile(n, m)) >= 0)
                                                         .sum(-1).float().mean())}
                    for m in self.protocol.kept}}

    def _saeuron_for(self, group: str, kept: dict[str, int]) -> LoadedSAE:
        key = (group, *sorted(kept.items()))
        if key not in self._saeuron_variants:
            loaded = self.saes[("saeuron", group)]
            n = loaded.file.config.num_latents
            percentiles = [scaled_percentile(n, kept.get(c.label, 1)) for c in loaded.file.concepts]
            tables = replace(build_tables(select_saeuron(self.scores[group], percentiles), self.means[group]),
                             directions=loaded.file.concept_tables.directions)  # the same concepts: the same Δ
            self._saeuron_variants[key] = replace(loaded, file=replace(loaded.file, tables=tables))
        return self._saeuron_variants[key]

    def model_for(self, setting: Setting):
        if setting.sae is None or setting.sae[0] == TEXT:
            return self.model
        method, group = setting.sae
        strengths = {label: gamma for label, gamma, _ in setting.erase}
        steps = dict(start_percent=0.0, end_percent=1.0, branches=setting.branches, mode=setting.mode)
        if method == MULTI_SITE and setting.site_strengths:  # one Erase Concepts node per block, each its own γ
            model = self.model
            for loaded, gamma in zip(self.multi_site[group], setting.site_strengths, strict=True):
                model = erase_concepts(model, loaded, dict.fromkeys(strengths, gamma), -1.0, **steps)
            return model
        if method == MULTI_SITE:
            return erase_concepts(self.model, self.multi_site[group], strengths, -1.0, **steps)
        if method == ENCODER_BLOCK:
            return erase_concepts(self.model, self.encoder_block_sae, strengths, -1.0, **steps)
        loaded = self.saes[setting.sae] if method == "saemnesia" else \
            self._saeuron_for(group, {label: kept for label, _, kept in setting.erase})
        if setting.uncalibrated:
            loaded = loaded.with_calibrations(dict.fromkeys(loaded.labels))
        return erase_concepts(self.model, loaded, strengths, -1.0, **steps)

    def encoder_for(self, setting: Setting) -> PromptEncoder:
        """The prompts' conditioning: the toy CLIP's, or, for the text-encoder SAE, that of the CLIP the Erase
        Concepts (text) node returns (every prompt, the empty negative too, is encoded with it, as in a workflow)."""
        if setting.text_strength:  # alongside a UNet-side SAE
            strengths, mode = {label: setting.text_strength for label, _, _ in setting.erase}, "exact"
        elif setting.sae is not None and setting.sae[0] == TEXT:
            strengths, mode = {label: gamma for label, gamma, _ in setting.erase}, setting.mode
        else:
            return self.encoder
        if setting not in self._text_encoders:
            clip = erase_text_concepts(self.clip, self.text_sae, strengths, -1.0, mode=mode)
            self._text_encoders[setting] = PromptEncoder(clip)
        return self._text_encoders[setting]

    def images(self, setting: Setting, items: list[Item]) -> np.ndarray:
        """uint8 [N, 32, 32, 3]: every prompt of the setting in one sampling call, cached on disk."""
        key = _digest({"model": self.digests["model"],
                       "sae": self._sae_digest(setting),
                       "setting": setting.key(), "steps": self.protocol.steps, "cfg": self.protocol.cfg,
                       "items": [(i.prompt, i.seed) for i in items]})
        path = self.cache / "images" / f"{key}.npy"
        if path.exists():
            images = np.load(path, allow_pickle=False)
            self.cached += len(items)
        else:
            out = generate(self.model_for(setting), self.vae, self.encoder_for(setting), [i.prompt for i in items],
                           [i.seed for i in items], negative=setting.negative, steps=self.protocol.steps,
                           cfg=self.protocol.cfg)
            images = (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                np.save(tmp, images)
            self.generated += len(items)
        if self.bar is not None:
            self.bar.update(len(items))
        return images

    def _sae_digest(self, setting: Setting) -> str | list[str] | None:
        if setting.sae is None:
            return None
        method, group = setting.sae
        if method == MULTI_SITE:
            digest = [self.digests[name] for name in multi_site_assets(group)]
        else:
            digest = self.digests[ENCODER if method == ENCODER_BLOCK else asset_name(method, group)]
        return [digest, self.digests[TEXT]] if setting.text_strength else digest  # the text SAE alongside

    def artifact_judge(self) -> ArtifactJudge:
        """Fitted once per run on renders and the model's own un-erased images of the quality set."""
        if self._artifact_judge is None:
            fit, calibration = quality_items()
            calibration_images = self.images(Setting(), calibration)
            self._kid_reference = {(i.obj, i.style): image for i, image in zip(calibration, calibration_images)}
            self._artifact_judge = ArtifactJudge.fit(self.judges, (self.images(Setting(), fit), fit),
                                                     calibration_images)
        return self._artifact_judge

    def kid_reference(self) -> dict:
        """KID's reference: {(object, look): the model's un-erased image of that prompt} at the quality set's
        calibration seed (never a test seed; one image per prompt)."""
        self.artifact_judge()
        return self._kid_reference

    def judge(self, setting: Setting, items: list[Item]) -> tuple[list[Judged], np.ndarray]:
        images = self.images(setting, items)
        objects, styles = self.judges.predict(torch.from_numpy(images).float() / 255)
        return [Judged(i, o, s) for i, o, s in zip(items, objects, styles)], images
