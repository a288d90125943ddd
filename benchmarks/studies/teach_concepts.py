"""Teaching concepts in ComfyUI, measured on the toy world (issue: "Teach a concept in ComfyUI"). The shipped
unsupervised (SAeUron) object and style SAEs with every label stripped are taught 4 objects and 2 styles by Find
Concept Latents nodes in a real ComfyUI server, queued through /prompt (8 prompts that show each concept; the
negatives are the same prompts with the concept's words taken out; the shipped recipe's steps, cfg and percentile),
and kept by Save SAE. Then each concept is erased in exact mode at γ = −1 with the taught file and, at the same
setting, with the shipped SAeUron file: UA, IRA and CRA on the quick test grid (72 images, one seed per prompt,
judged), held against the targets; and with both files at Erase Concepts' defaults (DEFAULT_EDIT: shift mode, whose
direction Find Concept Latents measures too), with RM, the share of the target's images with it removed (no object
left, or unstyled); and the latents found against those the build selected. Last, the time and peak memory of teaching
one concept, in a fresh process.

    python benchmarks/studies/teach_concepts.py      # about 17 minutes on 2 CPU cores

Writes benchmarks/studies/results/teach_concepts.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_comfy.erase import erase_concepts
from saemnesia_comfy.sae_library import load_sae_path
from saemnesia_comfy.toy_model import load_toy_model
from saemnesia_core.concepts import DEFAULT_EDIT
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_core.sae_file import load_sae_file, save_sae_file
from saemnesia_tools.comfyui.server import ComfyServer
from saemnesia_tools.comfyui.toy.sampling import PromptEncoder, generate
from saemnesia_tools.toy import assets
from saemnesia_tools.toy.evaluation.metrics import erasure_metrics
from saemnesia_tools.toy.evaluation.protocol import (
    OBJECT,
    QUICK,
    STYLE,
    Judged,
    grid_items,
)
from saemnesia_tools.toy.evaluation.quality import ABSENT
from saemnesia_tools.toy.judges import Judges
from saemnesia_tools.toy.prompts import make_prompt
from saemnesia_tools.toy.render import OBJECTS, STYLES

TARGETS = {OBJECT: QUICK.object_targets, STYLE: QUICK.style_targets[:2]}  # 4 objects, 2 styles
RESULTS = Path(__file__).resolve().parent / "results"
UNLABELLED = {OBJECT: "unlabelled_objects.safetensors", STYLE: "unlabelled_styles.safetensors"}
TAUGHT = {OBJECT: "taught_objects", STYLE: "taught_styles"}
TARGET_UA, TARGET_ACCURACY = 10.0, 5.0  # points within the shipped SAeUron file's
FILES = ("shipped SAeUron", "taught")
AT_THE_DEFAULT = " at the node's default"
METHODS = ("no erasure", *FILES, *(f + AT_THE_DEFAULT for f in FILES))


def recipe() -> dict:
    return load_sae_file(assets.path(assets.SITES[OBJECT].saeuron)).provenance["recipe"]


def positives(group: str, concept: str) -> list[str]:
    """Eight prompts that show the concept: an object in every style, a style on every object."""
    return [make_prompt(concept, s) for s in STYLES] if group == OBJECT else [make_prompt(o, concept) for o in OBJECTS]


def teaching_prompt(group: str) -> dict:
    """Load the group's unlabelled SAE, teach it each target in turn (chained Find Concept Latents), save it."""
    r = recipe()
    prompt = {
        "1": {"class_type": "SAEmnesiaToyModelLoader", "inputs": {"model_name": Path(assets.MODEL).name}},
        "4": {"class_type": "SAEmnesiaToyEmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "7": {"class_type": "SAEmnesiaLoadSAE", "inputs": {"sae_name": UNLABELLED[group]}},
    }
    sae = ["7", 0]
    for i, concept in enumerate(TARGETS[group]):
        node = str(20 + i)
        prompt[node] = {"class_type": "SAEmnesiaFindConceptLatents", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "sae": sae, "latent": ["4", 0], "label": concept,
            "positive_prompts": "\n".join(positives(group, concept)), "negative_prompts": "", "seeds": 1,
            "steps": r["sample_steps"], "sampler_name": "euler", "scheduler": "normal", "cfg": r["cfg"],
            "selection": "percentile", "top_n": 2, "percentile": r["percentile"], "group": group,
            "replace_existing": False, "vae": ["1", 2]}}
        sae = [node, 0]
    prompt["30"] = {"class_type": "SAEmnesiaSaveSAE", "inputs": {"sae": sae, "filename": TAUGHT[group],
                                                                 "overwrite": True}}
    return prompt


def teach_in_server(base: Path) -> dict[str, Path]:
    folder = base / "models" / "saemnesia"
    folder.mkdir(parents=True)
    for group, name in UNLABELLED.items():
        shipped = load_sae_file(assets.path(assets.SITES[group].saeuron))
        save_sae_file(dataclasses.replace(shipped, concepts=[], tables=None), folder / name)
    server = ComfyServer(base).start(timeout=600)
    try:
        for group in TARGETS:
            server.run(teaching_prompt(group), timeout=3600)
    finally:
        server.stop()
    return {group: folder / f"{name}.safetensors" for group, name in TAUGHT.items()}


def selected(sae_file, label: str) -> list[set[int]]:
    """Per bucket, the latents a file selects for a concept."""
    row = sae_file.tables.latents[[c.label for c in sae_file.concepts].index(label)]
    return [set(b[b >= 0].tolist()) for b in row]


def overlap(taught, shipped, label: str) -> dict:
    found, built = selected(taught, label), selected(shipped, label)
    union_found, union_built = set().union(*found), set().union(*built)
    per_bucket = [len(a & b) / len(a | b) for a, b in zip(found, built) if a | b]
    return {"found": sorted(union_found), "shipped": sorted(union_built),
            "shared": sorted(union_found & union_built),
            "share_of_shipped": round(len(union_found & union_built) / max(1, len(union_built)), 3),
            "jaccard_per_bucket": round(sum(per_bucket) / len(per_bucket), 3)}


def judged_images(model, vae, encoder, judges, items) -> list[Judged]:
    r = recipe()
    images = generate(model, vae, encoder, [i.prompt for i in items], [i.seed for i in items],
                      steps=r["sample_steps"], cfg=r["cfg"])
    objects, styles = judges.predict(images)
    return [Judged(i, o, s) for i, o, s in zip(items, objects, styles)]


def erasure(taught_files: dict[str, Path]) -> dict:
    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    encoder, judges, items = PromptEncoder(clip), Judges.load(assets.path(assets.JUDGES)), grid_items(QUICK.test_seeds)
    plain = judged_images(model, vae, encoder, judges, items)
    rows = {}
    for group, concepts in TARGETS.items():
        saes = {"shipped SAeUron": load_sae_path(assets.path(assets.SITES[group].saeuron)),
                "taught": load_sae_path(taught_files[group])}
        for concept in concepts:
            row = {"no erasure": scored(plain, group, concept)}
            for name, loaded in saes.items():
                erased = erase_concepts(model, loaded, {concept: None}, -1.0, mode="exact")
                row[name] = scored(judged_images(erased, vae, encoder, judges, items), group, concept)
                erased = erase_concepts(model, loaded, {concept: None}, DEFAULT_EDIT.strength,
                                        branches=DEFAULT_EDIT.branches, mode=DEFAULT_EDIT.mode)
                row[name + AT_THE_DEFAULT] = scored(judged_images(erased, vae, encoder, judges, items), group, concept)
            row["overlap"] = overlap(load_sae_file(taught_files[group]),
                                     load_sae_file(assets.path(assets.SITES[group].saeuron)), concept)
            row["taught_how"] = load_sae_file(taught_files[group]).provenance["taught"][concept]
            rows[concept] = {"group": group, **row}
    return rows


def scored(judged: list[Judged], group: str, concept: str) -> dict:
    """UA, IRA, CRA and RM: the target's images judged with no object left (objects) or unstyled (styles)."""
    target = [j for j in judged if j.item.concept(group) == concept]
    return {**erasure_metrics(judged, group, [concept]),
            "RM": sum(j.predicted(group) == ABSENT[group] for j in target) / len(target)}


def averages(rows: dict) -> dict:
    out = {}
    for group in TARGETS:
        mine = [r for r in rows.values() if r["group"] == group]
        out[group] = {method: {m: round(100 * sum(r[method][m] for r in mine) / len(mine), 1)
                               for m in ("UA", "IRA", "CRA", "RM")}
                      for method in METHODS}
    return out


def against_targets(avg: dict) -> dict:
    """Met or missed, per group: UA within 10 points of the shipped file's, IRA and CRA within 5."""
    verdicts = {}
    for group, a in avg.items():
        verdicts[group] = {}
        for metric, allowed in (("UA", TARGET_UA), ("IRA", TARGET_ACCURACY), ("CRA", TARGET_ACCURACY)):
            gap = round(a["shipped SAeUron"][metric] - a["taught"][metric], 1)
            verdicts[group][metric] = {"gap": gap, "met": gap <= allowed}
    return verdicts


def cost_of_one_concept() -> dict:
    """Time and peak resident memory of teaching one concept (Hearts), in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def teach_one() -> dict:
    import resource

    from saemnesia_comfy.teach import find_concept_latents

    model, clip, vae = load_toy_model(assets.path(assets.MODEL))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "unlabelled.safetensors"
        shipped = load_sae_file(assets.path(assets.SITES[OBJECT].saeuron))
        save_sae_file(dataclasses.replace(shipped, concepts=[], tables=None), path)
        loaded = load_sae_path(path)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r, shown = recipe(), positives(OBJECT, "Hearts")
        start = time.perf_counter()
        find_concept_latents(model, clip, loaded, "Hearts", "\n".join(shown), "",
                             {"samples": torch.zeros(1, 3, 32, 32)}, seeds=1, steps=r["sample_steps"], cfg=r["cfg"],
                             selection="percentile", percentile=r["percentile"], vae=vae)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(after / 1024, 1),
            "peak_above_loaded_model_mb": round((after - before) / 1024, 1), "threads": torch.get_num_threads(),
            "prompts": 2 * len(shown), "steps": r["sample_steps"]}


def markdown(result: dict) -> str:
    lines = ["# Teaching concepts in ComfyUI (toy world)", "",
             f"{result['protocol']}", "",
             "| group | method | UA | IRA | CRA | RM |", "|---|---|---:|---:|---:|---:|"]
    for group, methods in result["averages"].items():
        for method, m in methods.items():
            lines.append(f"| {group}s | {method} | {m['UA']:.1f} | {m['IRA']:.1f} | {m['CRA']:.1f} | "
                         f"{m['RM']:.1f} |")
    lines += ["", ("Targets (taught against the shipped SAeUron file, points): UA within "
              f"{TARGET_UA:g}, IRA and CRA within {TARGET_ACCURACY:g}."), "",
              "| group | UA | IRA | CRA |", "|---|---|---|---|"]
    for group, v in result["targets"].items():
        cells = [f"{'met' if v[m]['met'] else 'missed'} (taught − shipped: {0.0 - v[m]['gap']:+.1f})" for m in ("UA", "IRA", "CRA")]
        lines.append(f"| {group}s | " + " | ".join(cells) + " |")
    lines += ["", ("| concept | found latents | the build's | shared | share of the build's | Jaccard per bucket "
              "| separation (AUROC) |"), "|---|---|---|---|---:|---:|---:|"]
    for concept, r in result["concepts"].items():
        o = r["overlap"]
        lines.append(f"| {concept} | {o['found']} | {o['shipped']} | {o['shared']} | {o['share_of_shipped']:.2f} | "
                     f"{o['jaccard_per_bucket']:.2f} | {r['taught_how']['separation_auroc']:.2f} |")
    c = result["cost"]
    lines += ["", (f"Teaching one concept (Hearts: {c['prompts']} prompts, {c['steps']} steps, {c['threads']} threads, "
              f"a fresh process): {c['seconds']:.1f} s; the process's peak resident memory {c['peak_rss_mb']:.0f} MiB, "
              f"{c['peak_above_loaded_model_mb']:.0f} MiB above its peak before teaching (set by loading the model).")]
    return "\n".join(lines)


def readme_sentence(result: dict) -> str:
    """The README's lines on teaching (tests/test_repository.py checks that the README quotes them)."""
    groups = {OBJECT: "objects", STYLE: "styles"}
    rows = [f"{groups[g]} {_triple(m['taught'])} against {_triple(m['shipped SAeUron'])}"
            for g, m in result["averages"].items()]
    missed = [f"{groups[g]} {metric}" for g, v in result["targets"].items() for metric, m in v.items() if not m["met"]]
    removal = [f"{groups[g]} {m['taught' + AT_THE_DEFAULT]['RM']:.1f} against "
               f"{m['shipped SAeUron' + AT_THE_DEFAULT]['RM']:.1f}" for g, m in result["averages"].items()]
    shares = [r["overlap"]["share_of_shipped"] for r in result["concepts"].values()]
    c = result["cost"]
    return (f"On the toy world, {len(result['concepts'])} concepts taught through ComfyUI from 8 prompts each and "
            f"erased in exact mode at −1 score UA / IRA / CRA {'; '.join(rows)} for the shipped SAeUron files; the "
            f"targets (UA within {TARGET_UA:g} points of those, IRA and CRA within {TARGET_ACCURACY:g}) are "
            + ("all met" if not missed else "missed for " + ", ".join(missed))
            + f". At the node's defaults ({DEFAULT_EDIT.mode} mode, with the direction Find Concept Latents measures) "
            f"they are removed (RM, %) {'; '.join(removal)}. The found latents hold {min(shares):.2f} to "
            f"{max(shares):.2f} of those the build selected. "
            f"Teaching one concept took {c['seconds']:.0f} s on 2 CPU cores and added "
            f"{c['peak_above_loaded_model_mb']:.0f} MiB to the process's peak memory ({c['peak_rss_mb']:.0f} MiB, set "
            "by loading the model).")


def _triple(m: dict) -> str:
    return f"{m['UA']:.1f} / {m['IRA']:.1f} / {m['CRA']:.1f}"


def write_reports(result: dict) -> None:
    result = {**result, "readme": readme_sentence(result)}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "teach_concepts.json", result, indent=2)
    write_bytes_atomic(RESULTS / "teach_concepts.md", (markdown(result) + "\n").encode())
    print(markdown(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="rewrite the reports from the results file, measuring nothing")
    args = p.parse_args()
    if args.one:
        print(json.dumps(teach_one()))
        return
    if args.report:
        write_reports(json.loads((RESULTS / "teach_concepts.json").read_text()))
        return
    started = time.time()
    with tempfile.TemporaryDirectory() as base:
        taught = teach_in_server(Path(base))
        rows = erasure(taught)
    avg = averages(rows)
    write_reports({
        "written_by": "python benchmarks/studies/teach_concepts.py",
        "protocol": (f"Taught through /prompt: 8 prompts per concept, negatives without the concept, seed 0, "
                     f"{recipe()['sample_steps']} euler steps, cfg {recipe()['cfg']:g}, SAeUron's percentile "
                     f"{recipe()['percentile']:g} (the shipped files'). Erased in exact mode at γ = −1 (the node's "
                     f"default before shift mode; the targets compare these rows) and at the node's defaults "
                     f"({DEFAULT_EDIT.mode} mode, {DEFAULT_EDIT.branches} branch, γ {DEFAULT_EDIT.strength:g}) on the "
                     f"quick test grid ({len(grid_items(QUICK.test_seeds))} images); averages in %."),
        "concepts": rows, "averages": avg, "targets": against_targets(avg), "cost": cost_of_one_concept(),
        "minutes": round((time.time() - started) / 60, 1)})


if __name__ == "__main__":
    main()
