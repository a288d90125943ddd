# SPDX-License-Identifier: GPL-3.0-or-later
"""`saemnesia eval`: the UnlearnCanvas protocol in miniature on the toy world (DESIGN §9).

Each object and each style is erased in turn; the test set is the full grid (every object in every style and
unstyled, the papers' prompt form) with fixed seeds, judged by the toy judges. Methods, side by side:

- none: no erasure (the ceiling for IRA and CRA; computed once, cached);
- SAEmnesia: the supervised SAE's assigned latent, γ per concept from {−1, −5, …, −30} chosen by
  (UA + IRA)/2 on a selection set (other seeds), and the single γ = −1 for every concept;
- SAeUron mode: the unsupervised SAE, latents by score at the percentiles that keep 1, 2 and 3 latents per
  bucket (as 99.999 / 99.995 / 99.99 do of 20480) × the same γ grid, chosen the same way;
- negative prompt: the concept's word as ComfyUI's negative conditioning, no patch.

Both SAE methods erase objects with the SAEs at up_blocks.1.attentions.1 and styles with those at
up_blocks.2.attentions.2, where the toy model still reads its styles (README, "The toy world").

Plus sequential erasure of the objects and the erased concept's images under rephrased prompts. Everything
runs in-process through `erase_concepts`, the Erase Concepts node's own patch path.

The metrics (DEFINITIONS below) are UnlearnCanvas/SAeUron's, adapted to the toy world.

    saemnesia eval                  # quick (QUICK below; about 40 minutes on 2 idle cores)
    saemnesia eval --full           # every concept, 5 test seeds per prompt (hours; resumable)

Generated images are cached by content (model, SAE files, setting, prompts, seeds, steps) under --cache, so a
rerun only judges, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saemnesia_core.concepts import build_tables, select_saeuron
from saemnesia_core.toy.judges import Judges
from saemnesia_core.toy.prompts import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, make_prompt
from saemnesia_core.toy.render import OBJECTS, SIZE, STYLES
from saemnesia_core.training import concept_activations, saeuron_grid

from .capture import collect_from_comfy
from .erase import erase_concepts
from .runtime import REPO_ROOT
from .sae_library import LoadedSAE, load_sae_path
from .toy_model import load_toy_model
from .toy_sampling import PromptEncoder, generate

OBJECT, STYLE = "object", "style"
LOOKS = (*STYLES, None)  # a grid row: the object in every style, then unstyled
GAMMAS = (-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0)
PAPER_PERCENTILES = {1: 99.999, 2: 99.995, 3: 99.99}  # latents per bucket each keeps of 20480 (notes §3.5)
# Seed bases, disjoint from the toy build's (SAE training 0…, held-out statistics 1e6…, quality check 1e4…)
TEST_SEED, SELECT_SEED, REPHRASE_SEED = 2_000_000, 3_000_000, 4_000_000

DEFINITIONS = """\
object target c:  UA  = share of c's images (every style and unstyled) not judged c
                  IRA = object accuracy on the other objects' images
                  CRA = style accuracy on every styled image (c's included)
style target s:   UA  = share of s's images not judged s
                  IRA = style accuracy on the other styles' images (unstyled images excluded)
                  CRA = object accuracy on every image (SAeUron counts only the unstyled ones)
several erased concepts (sequential): UA pools the erased concepts' images, IRA the rest of the group's"""

MODELS = REPO_ROOT / "models"
DEFAULT_ASSETS = {"model": MODELS / "toy" / "toy_world.safetensors",
                  "judges": MODELS / "toy" / "toy_judges.safetensors",
                  "saemnesia": MODELS / "saemnesia" / "toy_saemnesia.safetensors",
                  "saeuron": MODELS / "saemnesia" / "toy_saeuron.safetensors",
                  "saemnesia_styles": MODELS / "saemnesia" / "toy_saemnesia_styles.safetensors",
                  "saeuron_styles": MODELS / "saemnesia" / "toy_saeuron_styles.safetensors"}
SAE_METHODS = ("saemnesia", "saeuron")
METHODS = {  # name -> (label in reports, configurations searched per concept)
    "none": ("no erasure", None),
    "saemnesia": ("SAEmnesia (γ tuned)", "gammas"),
    "saemnesia_gamma1": ("SAEmnesia (γ = −1)", 1),
    "saeuron": ("SAeUron mode (tuned)", "kept×gammas"),
    "negative": ("negative prompt", 1),
}


# ------------------------------------------------------------------------------------------ what is generated


@dataclass(frozen=True)
class Item:
    """One image: an object in a style (None = unstyled), its seed, and the wording (None = the papers' form)."""

    obj: str
    style: str | None
    seed: int
    template: int | None = None  # index into HELD_OUT_TEMPLATES

    @property
    def prompt(self) -> str:
        template = TRAIN_TEMPLATES[0] if self.template is None else HELD_OUT_TEMPLATES[self.template]
        return make_prompt(self.obj, self.style, template)

    def concept(self, group: str) -> str | None:
        return self.obj if group == OBJECT else self.style


@dataclass(frozen=True)
class Judged:
    """An item and what the judges saw in its image (style "Unstyled" for none)."""

    item: Item
    obj: str
    style: str

    def predicted(self, group: str) -> str:
        return self.obj if group == OBJECT else self.style


@dataclass(frozen=True)
class Protocol:
    """Everything one run generates; QUICK and FULL differ only here. Defaults are the full protocol."""

    object_targets: tuple[str, ...] = OBJECTS
    style_targets: tuple[str, ...] = STYLES
    test_seeds: int = 5            # images per grid prompt in the test set (UnlearnCanvas: 5 seeds)
    select_seeds: int = 1          # images per prompt in the selection set
    select_others: int = 9         # images per other concept of the group in the selection set (the target: all)
    rephrase_seeds: int = 2        # images per rephrased prompt of the target
    steps: int = 25
    cfg: float = 5.0
    gammas: tuple[float, ...] = GAMMAS
    kept: tuple[int, ...] = (1, 2, 3)  # SAeUron latents per bucket


FULL = Protocol()
# Quick: 2 of 8 targets per group, one seed per prompt, γ ∈ {−1, −5, −15, −30}, 1 or 2 SAeUron latents per
# bucket: about 2,600 images, 40 minutes on 2 idle cores at ~1.1 images/s.
QUICK = Protocol(object_targets=OBJECTS[::4], style_targets=STYLES[::4], test_seeds=1, select_seeds=1,
                 select_others=1, rephrase_seeds=1, steps=25, gammas=(-1.0, -5.0, -15.0, -30.0), kept=(1, 2))


def _grid_index(obj: str, style: str | None) -> int:
    return OBJECTS.index(obj) * len(LOOKS) + LOOKS.index(style)


def _item(obj: str, style: str | None, rep: int, base: int, template: int | None = None) -> Item:
    """Seeds depend only on (prompt, repetition, set): the same image recurs wherever that prompt does."""
    return Item(obj, style, base + 100 * rep + _grid_index(obj, style), template)


def test_items(seeds: int) -> list[Item]:
    """The full grid, `seeds` images per prompt."""
    return [_item(o, s, r, TEST_SEED) for r in range(seeds) for o in OBJECTS for s in LOOKS]


def _target_cells(group: str, concept: str) -> list[tuple[str, str | None]]:
    """Every grid cell showing the concept: an object in all looks, or a style on all objects."""
    return [(concept, s) for s in LOOKS] if group == OBJECT else [(o, concept) for o in OBJECTS]


def selection_items(group: str, concept: str, protocol: Protocol) -> list[Item]:
    """What γ (and the SAeUron percentile) are chosen on: every cell of the target, plus `select_others` cells
    of each other concept of its group (rotating through the looks / objects), with seeds of their own."""
    cells = _target_cells(group, concept)
    others = [c for c in (OBJECTS if group == OBJECT else STYLES) if c != concept]
    for i, other in enumerate(others):
        own = _target_cells(group, other)
        if group == STYLE:
            own = [c for c in own if c[1] is not None]
        cells += [own[(i + j) % len(own)] for j in range(min(protocol.select_others, len(own)))]
    return [_item(o, s, r, SELECT_SEED) for r in range(protocol.select_seeds) for o, s in cells]


def rephrase_items(group: str, concept: str, seeds: int) -> list[Item]:
    """The target's cells worded with every held-out template (never seen in training)."""
    return [_item(o, s, r, REPHRASE_SEED, t) for r in range(seeds) for t in range(len(HELD_OUT_TEMPLATES))
            for o, s in _target_cells(group, concept)]


# ---------------------------------------------------------------------------------------------------- metrics


def _mean(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def erasure_metrics(judged: list[Judged], group: str, erased) -> dict[str, float | None]:
    """UA, IRA, CRA (DEFINITIONS) after erasing the concepts `erased` of `group`; None when no
    image qualifies (e.g. IRA once every concept of the group is erased)."""
    erased = set(erased)
    ua = _mean(j.predicted(group) != j.item.concept(group) for j in judged if j.item.concept(group) in erased)
    ira = _mean(j.predicted(group) == j.item.concept(group) for j in judged
                if j.item.concept(group) is not None and j.item.concept(group) not in erased)
    if group == OBJECT:
        cra = _mean(j.style == j.item.style for j in judged if j.item.style is not None)
    else:
        cra = _mean(j.obj == j.item.obj for j in judged)
    return {"UA": ua, "IRA": ira, "CRA": cra}


def selection_score(metrics: dict) -> float:
    """SAeUron's sweep criterion: (UA + IRA)/2."""
    return (metrics["UA"] + metrics["IRA"]) / 2


def best_candidate(candidates: list[dict]) -> dict:
    """The candidate with the highest selection score; ties go to the earliest (max keeps the first; the grids
    list the gentlest setting first)."""
    return max(candidates, key=lambda c: c["score"])


def scaled_percentile(num_latents: int, kept: int) -> float:
    """The percentile whose strictly-greater quantile selection keeps `kept` of `num_latents` latents, as
    99.999 / 99.995 / 99.99 keep 1 / 2 / 3 of 20480: the quantile lands halfway between the kept-th and
    (kept+1)-th largest score."""
    return 100.0 * (num_latents - kept - 0.5) / (num_latents - 1)


def _average(rows: list[dict]) -> dict[str, float | None]:
    return {m: _mean(r[m] for r in rows if r[m] is not None) for m in ("UA", "IRA", "CRA")}


# ------------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Setting:
    """What changes the images: which SAE erases what, or a negative prompt. `erase` holds
    (label, γ, latents kept per bucket — SAeUron only, 0 for SAEmnesia)."""

    sae: str | None = None  # an SAE asset name (sae_asset) or None
    erase: tuple[tuple[str, float, int], ...] = ()
    negative: str = ""


def sae_asset(method: str, group: str) -> str:
    """The SAE file a method erases a group's concepts with: objects and styles are read at different blocks."""
    return method if group == OBJECT else f"{method}_styles"


def shown_path(path: Path) -> str:
    """Repository-relative when inside the repository (reports are committed), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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

    def __init__(self, assets: dict[str, Path], protocol: Protocol, cache: Path, progress: bool = True):
        self.protocol, self.cache, self.progress = protocol, Path(cache), progress
        missing = [f"{k}: {p}" for k, p in assets.items() if not Path(p).exists()]
        if missing:
            raise FileNotFoundError("missing evaluation assets (build them with python -m saemnesia_comfy.toy_build):"
                                    "\n  " + "\n  ".join(missing))
        self.assets = {k: Path(p) for k, p in assets.items()}
        self.digests = {k: _file_digest(p) for k, p in self.assets.items()}
        self.model, clip, self.vae = load_toy_model(self.assets["model"])
        self.encoder = PromptEncoder(clip)
        self.judges = Judges.load(self.assets["judges"])
        self.saes = {name: load_sae_path(path, path.stem) for name, path in self.assets.items()
                     if name.startswith(SAE_METHODS)}
        self.scores, self.means = {}, {}
        self._saeuron_variants: dict[tuple, LoadedSAE] = {}
        self.generated = self.cached = 0
        self.bar = None

    # SAeUron mode: latents re-selected by score at other percentiles from held-out activations
    def prepare_saeuron(self, name: str) -> dict:
        """Collect held-out activations at the SAE's block (the build's own prompts, seeds and settings when its
        recipe is in the file), compute μ and scores once; per setting only the selection changes."""
        f = self.saes[name].file
        recipe = f.provenance.get("recipe", {})
        repeats, seed = recipe.get("heldout_repeats", 2), recipe.get("seed", 0) + 1_000_000
        steps, cfg = recipe.get("sample_steps", 25), recipe.get("cfg", 5.0)
        where = self.cache / f"heldout_acts_{_digest([self.digests['model'], f.hookpoint, repeats, seed, steps, cfg])}"
        data = collect_from_comfy(self.model, lambda p: [[self.encoder(p), {}]],
                                  saeuron_grid(list(OBJECTS), list(STYLES), repeats=repeats), where,
                                  hookpoint=f.hookpoint, steps=steps, cfg=cfg, sampler="euler", scheduler="normal",
                                  width=SIZE, height=SIZE, seed=seed, batch_size=72, model_id="saemnesia-toy-world",
                                  model_family="toy", progress=self.progress)
        sae = self.saes[name].sae.float()  # in place: the statistics need fp32, the edit casts anyway
        acts = concept_activations(sae, data, num_buckets=f.num_buckets, progress=False)
        if acts.concepts != [(c.group, c.label) for c in f.concepts]:
            raise ValueError(f"{self.assets[name]}: its concepts differ from the held-out labels {acts.concepts}")
        self.scores[name], self.means[name] = acts.scores(), acts.means()
        n, scores = f.config.num_latents, self.scores[name]
        return {"hookpoint": f.hookpoint, "num_latents": n, "heldout_samples": len(OBJECTS) * len(LOOKS) * repeats,
                "heldout_seed": seed, "heldout_steps": steps, "kept": {
                    m: {"percentile": scaled_percentile(n, m), "paper_percentile_at_20480": PAPER_PERCENTILES.get(m),
                        "mean_latents_per_bucket": float((select_saeuron(scores, scaled_percentile(n, m)) >= 0)
                                                         .sum(-1).float().mean())}
                    for m in self.protocol.kept}}

    def _saeuron_for(self, name: str, kept: dict[str, int]) -> LoadedSAE:
        key = (name, *sorted(kept.items()))
        if key not in self._saeuron_variants:
            loaded = self.saes[name]
            n = loaded.file.config.num_latents
            percentiles = [scaled_percentile(n, kept.get(c.label, 1)) for c in loaded.file.concepts]
            tables = build_tables(select_saeuron(self.scores[name], percentiles), self.means[name])
            self._saeuron_variants[key] = replace(loaded, file=replace(loaded.file, tables=tables))
        return self._saeuron_variants[key]

    def model_for(self, setting: Setting):
        if setting.sae is None:
            return self.model
        strengths = {label: gamma for label, gamma, _ in setting.erase}
        loaded = self.saes[setting.sae] if setting.sae.startswith("saemnesia") else \
            self._saeuron_for(setting.sae, {label: kept for label, _, kept in setting.erase})
        return erase_concepts(self.model, loaded, strengths, -1.0)

    def images(self, setting: Setting, items: list[Item]) -> np.ndarray:
        """uint8 [N, 32, 32, 3]: every prompt of the setting in one sampling call, cached on disk."""
        key = _digest({"model": self.digests["model"], "sae": self.digests[setting.sae] if setting.sae else None, "setting": asdict(setting),
                       "steps": self.protocol.steps, "cfg": self.protocol.cfg,
                       "items": [(i.prompt, i.seed) for i in items]})
        path = self.cache / "images" / f"{key}.npy"
        if path.exists():
            images = np.load(path, allow_pickle=False)
            self.cached += len(items)
        else:
            out = generate(self.model_for(setting), self.vae, self.encoder, [i.prompt for i in items],
                           [i.seed for i in items], negative=setting.negative, steps=self.protocol.steps,
                           cfg=self.protocol.cfg)
            images = (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, images)
            tmp.replace(path)
            self.generated += len(items)
        if self.bar is not None:
            self.bar.update(len(items))
        return images

    def judge(self, setting: Setting, items: list[Item]) -> tuple[list[Judged], np.ndarray]:
        images = self.images(setting, items)
        objects, styles = self.judges.predict(torch.from_numpy(images).float() / 255)
        return [Judged(i, o, s) for i, o, s in zip(items, objects, styles)], images


# ------------------------------------------------------------------------------------------------- evaluation


@dataclass
class Results:
    """Everything a run measured (`data`, written as JSON) and the example images for the figure."""

    data: dict
    examples: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)


def _searched(method: str, protocol: Protocol) -> int:
    spec = METHODS[method][1]
    return {None: 0, "gammas": len(protocol.gammas), "kept×gammas": len(protocol.kept) * len(protocol.gammas)}.get(
        spec, spec)


def _example_cells(group: str, concept: str) -> list[tuple[str, str | None]]:
    """An image of the target and one of neither the target nor its grid neighbour."""
    i = (OBJECTS if group == OBJECT else STYLES).index(concept)
    if group == OBJECT:
        return [(concept, STYLES[i % len(STYLES)]), (OBJECTS[(i + 1) % len(OBJECTS)], STYLES[(i + 2) % len(STYLES)])]
    return [(OBJECTS[i % len(OBJECTS)], concept), (OBJECTS[(i + 3) % len(OBJECTS)], STYLES[(i + 1) % len(STYLES)])]


def planned_images(protocol: Protocol) -> int:
    """Images the run generates at most (cache hits and shared settings make it fewer)."""
    per_target = lambda g, c: (len(selection_items(g, c, protocol)) * len(protocol.gammas) * (1 + len(protocol.kept))
                               + 4 * len(test_items(protocol.test_seeds))
                               + len(METHODS) * len(rephrase_items(g, c, protocol.rephrase_seeds)))
    total = len(test_items(protocol.test_seeds)) * (1 + 2 * len(protocol.object_targets))  # none + sequential
    total += sum(per_target(OBJECT, c) for c in protocol.object_targets)
    return total + sum(per_target(STYLE, c) for c in protocol.style_targets)


def evaluate(runner: Runner, mode: str = "custom") -> Results:
    P = runner.protocol
    start = time.time()
    results = Results({"mode": mode, "protocol": asdict(P), "assets": {
        k: {"path": shown_path(p), "sha256": runner.digests[k]} for k, p in runner.assets.items()}})
    groups = [g for g, targets in ((OBJECT, P.object_targets), (STYLE, P.style_targets)) if targets]
    results.data["saeuron_selection"] = {g: runner.prepare_saeuron(sae_asset("saeuron", g)) for g in groups}
    runner.bar = tqdm(total=planned_images(P), desc="eval images", unit="img", disable=not runner.progress,
                      smoothing=0.05)
    tests = test_items(P.test_seeds)
    example_items = {}
    targets, chosen = {OBJECT: {}, STYLE: {}}, {}

    def record_examples(method, judged, images, group, concept):
        for cell in _example_cells(group, concept):
            pos = next(k for k, j in enumerate(judged) if (j.item.obj, j.item.style) == cell)
            example_items.setdefault(method, []).append((f"{concept}: {cell[0]}/{cell[1] or 'unstyled'}", images[pos]))

    none_judged, none_images = runner.judge(Setting(), tests)
    for group, concepts in ((OBJECT, P.object_targets), (STYLE, P.style_targets)):
        for concept in concepts:
            select = selection_items(group, concept, P)
            candidates = {"saemnesia": [], "saeuron": []}
            sae = {method: sae_asset(method, group) for method in SAE_METHODS}
            for gamma in P.gammas:
                m = erasure_metrics(runner.judge(Setting(sae["saemnesia"], ((concept, gamma, 0),)), select)[0], group,
                                    {concept})
                candidates["saemnesia"].append({"gamma": gamma, **m, "score": selection_score(m)})
            for kept in P.kept:
                for gamma in P.gammas:
                    m = erasure_metrics(runner.judge(Setting(sae["saeuron"], ((concept, gamma, kept),)), select)[0],
                                        group, {concept})
                    candidates["saeuron"].append({"kept": kept, "gamma": gamma, **m, "score": selection_score(m)})
            sm, su = best_candidate(candidates["saemnesia"]), best_candidate(candidates["saeuron"])
            chosen[concept] = {"saemnesia": (concept, sm["gamma"], 0), "saeuron": (concept, su["gamma"], su["kept"])}
            settings = {"none": Setting(), "saemnesia": Setting(sae["saemnesia"], (chosen[concept]["saemnesia"],)),
                        "saemnesia_gamma1": Setting(sae["saemnesia"], ((concept, -1.0, 0),)),
                        "saeuron": Setting(sae["saeuron"], (chosen[concept]["saeuron"],)),
                        "negative": Setting(negative=concept)}
            test, rephrased = {}, {}
            for method, setting in settings.items():
                judged, images = (none_judged, none_images) if method == "none" else runner.judge(setting, tests)
                test[method] = erasure_metrics(judged, group, {concept})
                record_examples(method, judged, images, group, concept)
                rephrased[method] = erasure_metrics(
                    runner.judge(setting, rephrase_items(group, concept, P.rephrase_seeds))[0], group, {concept})["UA"]
            targets[group][concept] = {"chosen": {"saemnesia": {"gamma": sm["gamma"]},
                                                  "saeuron": {"kept": su["kept"], "gamma": su["gamma"]}},
                                       "selection": candidates, "test": test, "rephrased_UA": rephrased}
    results.data["targets"] = targets
    results.data["sequential"] = sequential(runner, chosen, tests)
    runner.bar.close()
    results.data["summary"] = summarize(targets, P)
    results.data["cost"] = {"images_generated": runner.generated, "images_from_cache": runner.cached,
                            "minutes": round((time.time() - start) / 60, 1), "torch_threads": torch.get_num_threads(),
                            "cpus": os.cpu_count()}
    results.examples = example_items
    return results


def sequential(runner: Runner, chosen: dict, tests: list[Item]) -> dict:
    """Objects erased one after another (1…N, in the order of the targets) with each concept's chosen setting."""
    order = list(runner.protocol.object_targets)
    rows = {}
    for method in SAE_METHODS:
        rows[method] = []
        for j in range(1, len(order) + 1):
            setting = Setting(sae_asset(method, OBJECT), tuple(chosen[c][method] for c in order[:j]))
            judged, _ = runner.judge(setting, tests)
            rows[method].append({"erased": order[:j], **erasure_metrics(judged, OBJECT, order[:j])})
    return {"order": order, "rows": rows}


def summarize(targets: dict, protocol: Protocol) -> dict:
    """Per method: UA/IRA/CRA averaged over each group's targets, the mean of all six, configurations searched."""
    summary = {}
    for method in METHODS:
        entry = {"configurations_searched": _searched(method, protocol)}
        for group, per_concept in targets.items():
            if per_concept:
                entry[group] = _average([t["test"][method] for t in per_concept.values()])
        values = [v for g in (OBJECT, STYLE) if g in entry for v in entry[g].values() if v is not None]
        entry["average"] = _mean(values)
        entry["rephrased_UA"] = _mean(t["rephrased_UA"][method] for pc in targets.values() for t in pc.values()
                                      if t["rephrased_UA"][method] is not None)
        summary[method] = entry
    return summary


# ---------------------------------------------------------------------------------------------------- reports


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def summary_table(data: dict) -> str:
    groups = [g for g in (OBJECT, STYLE) if data["targets"].get(g)]
    head = "| method | configs searched / concept | " + " | ".join(
        f"{g.capitalize()} {m}" for g in groups for m in ("UA", "IRA", "CRA")) + " | Avg | UA, rephrased |"
    lines = [head, "|" + "---|" * (4 + 3 * len(groups))]
    for method, (label, _) in METHODS.items():
        s = data["summary"][method]
        cells = [_pct(s[g][m]) for g in groups for m in ("UA", "IRA", "CRA")]
        searched = s["configurations_searched"] or "—"
        lines.append(f"| {label} | {searched} | " + " | ".join(cells) + f" | {_pct(s['average'])} | "
                     f"{_pct(s['rephrased_UA'])} |")
    return "\n".join(lines)


def protocol_text(data: dict) -> str:
    P = data["protocol"]
    sites = [f"{group} targets at `{sel['hookpoint']}` ({sel['num_latents']} latents; statistics from "
             f"{sel['heldout_samples']} held-out samples; kept " + ", ".join(
                 f"{m} at p = {v['percentile']:.4f}: measured {v['mean_latents_per_bucket']:.2f} latents/bucket"
                 for m, v in sel["kept"].items()) + ")" for group, sel in data["saeuron_selection"].items()]
    return "\n".join([
        f"- mode **{data['mode']}**; targets: objects {', '.join(P['object_targets']) or 'none'}; "
        f"styles {', '.join(P['style_targets']) or 'none'}",
        f"- test set: the full grid ({len(OBJECTS)} objects × ({len(STYLES)} styles + unstyled)) × {P['test_seeds']} "
        f"seed(s) per prompt = {len(OBJECTS) * len(LOOKS) * P['test_seeds']} images per configuration; Euler, "
        f"{P['steps']} steps, CFG {P['cfg']}",
        f"- selection set (other seeds): every image of the target + {P['select_others']} image(s) of each other "
        f"concept of its group, × {P['select_seeds']} seed(s); score (UA + IRA)/2",
        f"- γ grid {', '.join(f'{g:g}' for g in P['gammas'])}; SAEs and SAeUron selection: " + "; ".join(sites),
        f"- rephrased prompts: the target's images in each of {len(HELD_OUT_TEMPLATES)} held-out wordings × "
        f"{P['rephrase_seeds']} seed(s)",
        f"- cost: {data['cost']['images_generated']} images generated, {data['cost']['images_from_cache']} from cache, "
        f"{data['cost']['minutes']} min ({data['cost']['torch_threads']} torch threads, {data['cost']['cpus']} CPUs)",
    ])


def markdown_report(data: dict) -> str:
    lines = ["# Miniature UnlearnCanvas on the toy world", "", summary_table(data), "", "## Protocol", "",
             protocol_text(data), "", "## Definitions", "", "```", DEFINITIONS, "```", "", "## Per concept (test set, %)", "",
             "| target | method | UA | IRA | CRA | UA rephrased | chosen |", "|---|---|---:|---:|---:|---:|---|"]
    for group, per_concept in data["targets"].items():
        for concept, t in per_concept.items():
            for method, (label, _) in METHODS.items():
                m = t["test"][method]
                chosen = ""
                if method == "saemnesia":
                    chosen = f"γ = {t['chosen']['saemnesia']['gamma']:g}"
                elif method == "saeuron":
                    chosen = f"{t['chosen']['saeuron']['kept']} latent(s), γ = {t['chosen']['saeuron']['gamma']:g}"
                lines.append(f"| {concept} ({group}) | {label} | {_pct(m['UA'])} | {_pct(m['IRA'])} | "
                             f"{_pct(m['CRA'])} | {_pct(t['rephrased_UA'][method])} | {chosen} |")
    seq = data["sequential"]
    if seq["order"]:
        lines += ["", "## Sequential erasure of objects (%)", "", f"Order: {', '.join(seq['order'])}.", "",
                  "| erased | " + " | ".join(f"{METHODS[m][0]} {k}" for m in seq["rows"] for k in ("UA", "IRA", "CRA"))
                  + " |", "|---|" + "---:|" * (3 * len(seq["rows"]))]
        for j in range(len(seq["order"])):
            cells = [_pct(seq["rows"][m][j][k]) for m in seq["rows"] for k in ("UA", "IRA", "CRA")]
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
    lines += ["", "![per concept](per_concept.png)", "", "![sequential](sequential.png)", "",
              "![examples](examples.png)", ""]
    return "\n".join(lines)


def readme_snippet(data: dict, out: Path) -> str:
    rel = shown_path(out)
    return "\n".join([
        f"### Erasure quality (miniature UnlearnCanvas, {data['mode']} mode)", "", summary_table(data), "",
        protocol_text(data), "",
        f"![per-concept UA/IRA/CRA]({rel}/per_concept.png)", f"![sequential erasure]({rel}/sequential.png)",
        f"![examples, same seeds]({rel}/examples.png)", "",
        f"Reproduce: `saemnesia eval{' --full' if data['mode'] == 'full' else ''}`.", ""])


def plot(results: Results, out: Path) -> None:
    """per_concept.png (grouped bars), sequential.png (curves), examples.png (same seeds, upscaled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = results.data
    colors = dict(zip(METHODS, ("0.6", "tab:blue", "tab:cyan", "tab:orange", "tab:green")))
    groups = [g for g in (OBJECT, STYLE) if data["targets"].get(g)]
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.6 * len(groups)), squeeze=False)
    for row, group in zip(axes, groups):
        concepts = list(data["targets"][group])
        for ax, metric in zip(row, ("UA", "IRA", "CRA")):
            width = 0.8 / len(METHODS)
            for k, method in enumerate(METHODS):
                values = [100 * (data["targets"][group][c]["test"][method][metric] or 0) for c in concepts]
                ax.bar(np.arange(len(concepts)) + (k - (len(METHODS) - 1) / 2) * width, values, width,
                       color=colors[method], label=METHODS[method][0])
            ax.set_xticks(range(len(concepts)), concepts, rotation=30, fontsize=8)
            ax.set_ylim(0, 105)
            ax.set_title(f"{group} targets: {metric} (%)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "per_concept.png", dpi=110)
    plt.close(fig)

    seq = data["sequential"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(1, len(seq["order"]) + 1)
    for ax, metric in zip(axes, ("UA", "IRA", "CRA")):
        for method, rows in seq["rows"].items():
            ax.plot(x, [np.nan if r[metric] is None else 100 * r[metric] for r in rows], "o-", color=colors[method],
                    label=METHODS[method][0])
        ax.set_xticks(x)
        ax.set_xlabel("objects erased")
        ax.set_ylim(0, 105)
        ax.set_title({"UA": "UA over the erased objects (%)", "IRA": "retained object accuracy (%)",
                      "CRA": "style accuracy (%)"}[metric])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sequential.png", dpi=110)
    plt.close(fig)

    methods = [m for m in METHODS if m in results.examples]
    if not methods:
        return
    columns = len(results.examples[methods[0]])
    fig, axes = plt.subplots(len(methods), columns, figsize=(1.3 * columns + 1.5, 1.45 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, (title, image) in enumerate(results.examples[method]):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title.replace(": ", ":\n"), fontsize=6)
        axes[r][0].set_ylabel(METHODS[method][0].replace(" (", "\n("), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=110)
    plt.close(fig)


def write_reports(results: Results, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.data, indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(results.data))
    (out / "README_snippet.md").write_text(readme_snippet(results.data, out))
    plot(results, out)


# -------------------------------------------------------------------------------------------------------- CLI


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saemnesia eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="quick mode: objects " + ", ".join(QUICK.object_targets) + "; styles "
                                       + ", ".join(QUICK.style_targets) + f"; {QUICK.test_seeds} test seed per "
                                       f"prompt; selection on every image of the target + {QUICK.select_others} of "
                                       f"each other concept; {QUICK.steps} steps; γ in {QUICK.gammas}; SAeUron latents per "
                                       f"bucket {QUICK.kept}.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="the default")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    p.set_defaults(mode="quick")
    p.add_argument("--out", type=Path, help="report folder (default benchmarks/results/eval_<mode>)")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "runs" / "eval_cache", help="generated images")
    for name, path in DEFAULT_ASSETS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=Path, default=path, help=f"default {shown_path(path)}")
    g = p.add_argument_group("overrides of the mode's protocol")
    g.add_argument("--objects", type=_csv(str), help="object targets, comma-separated ('' = none)")
    g.add_argument("--styles", type=_csv(str), help="style targets, comma-separated ('' = none)")
    g.add_argument("--test-seeds", type=int)
    g.add_argument("--select-seeds", type=int)
    g.add_argument("--select-others", type=int)
    g.add_argument("--rephrase-seeds", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--gammas", type=_csv(float), help="comma-separated; write --gammas=-1,-5 (a value starting with - needs the =)")
    g.add_argument("--kept", type=_csv(int), help="SAeUron latents per bucket, e.g. 1,2,3")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def protocol_from_args(args) -> Protocol:
    overrides = {"object_targets": args.objects, "style_targets": args.styles, "test_seeds": args.test_seeds,
                 "select_seeds": args.select_seeds, "select_others": args.select_others,
                 "rephrase_seeds": args.rephrase_seeds, "steps": args.steps, "gammas": args.gammas, "kept": args.kept}
    protocol = replace(QUICK if args.mode == "quick" else FULL, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [c for c in protocol.object_targets if c not in OBJECTS] + \
              [c for c in protocol.style_targets if c not in STYLES]
    if unknown:
        raise SystemExit(f"saemnesia eval: unknown targets {unknown}; objects {OBJECTS}, styles {STYLES}")
    return protocol


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = protocol_from_args(args)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"eval_{args.mode}"
    assets = {name: getattr(args, name) for name in DEFAULT_ASSETS}
    print(f"saemnesia eval ({args.mode}): at most {planned_images(protocol)} images at {protocol.steps} steps; "
          f"cache {args.cache}", flush=True)
    runner = Runner(assets, protocol, args.cache, progress=not args.no_progress)
    results = evaluate(runner, args.mode)
    write_reports(results, out)
    print(summary_table(results.data))
    print(f"wrote {out}/results.json, report.md, README_snippet.md and plots ({results.data['cost']['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
