"""Makes example_workflows/*.json with the real frontend: each graph is built in the ComfyUI page (nodes created
by the app, widgets set, links connected) and exported as the app's Export writes it, so the files are exactly
what this frontend version writes. The workflows use the shipped toy world (`saemnesia_core.toy.assets`) at the
demo's strengths (`saemnesia_core.toy.demo`). Regenerate after a node's inputs change:

    .venv/bin/python scripts/build_example_workflows.py

(it starts a headless ComfyUI server with the pack and a headless Chromium)."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

from saemnesia_comfy.browser import comfy_page
from saemnesia_comfy.server import ComfyServer
from saemnesia_core.toy import assets, demo

TOY_MODEL = Path(assets.MODEL).name
SAE = assets.SITES["object"].saemnesia
STYLE_SAE = assets.SITES["style"].saemnesia  # the toy's styles are erased at its 16x16 decoder level (README)
OUT_DIR = assets.REPO_ROOT / "example_workflows"
NEGATIVE = ""


def _num(value: float) -> str:
    """A number as the notes print it (a typographic minus)."""
    return f"{value:g}".replace("-", "−")


def _toy_inputs(prompt: str, x: int = 0) -> list[dict]:
    return [
        {"id": 1, "type": "SAEmnesiaToyModelLoader", "pos": [x, 0], "widgets": {"model_name": TOY_MODEL}},
        {"id": 2, "type": "SAEmnesiaLoadSAE", "pos": [x, 200], "widgets": {"sae_name": SAE}},
        {"id": 3, "type": "CLIPTextEncode", "pos": [x + 360, 0], "size": [300, 110], "title": "Prompt",
         "widgets": {"text": prompt}},
        {"id": 4, "type": "CLIPTextEncode", "pos": [x + 360, 150], "size": [300, 90], "title": "Negative prompt",
         "widgets": {"text": NEGATIVE}},
        {"id": 5, "type": "SAEmnesiaToyEmptyLatent", "pos": [x + 360, 280]},
    ]


def _sampler(node_id: int, pos, title: str, seed: int = 42) -> dict:
    return {"id": node_id, "type": "KSampler", "pos": pos, "title": title,
            "widgets": {"seed": seed, "control_after_generate": "fixed", "steps": 20, "cfg": 5.0,
                        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def _note(node_id: int, pos, text: str) -> dict:
    return {"id": node_id, "type": "Note", "pos": pos, "size": [330, 150], "widgets": {"text": text}}


def _base_links() -> list[tuple]:
    return [(1, 1, 3, "clip"), (1, 1, 4, "clip")]


def _erase(concepts, prompt: str, note: str, erased_title: str, strength: float = -1.0, styles=None,
           style_strength: float = -1.0) -> dict:
    """Original and erased side by side; with `styles`, a second Erase Concepts with the style SAE follows the first."""
    nodes = _toy_inputs(prompt) + [
        {"id": 6, "type": "SAEmnesiaEraseConcepts", "pos": [720, 220], "size": [330, 560],
         "widgets": {"concepts": json.dumps(concepts), "strength": strength}},
        _sampler(7, [1100, 0], "KSampler (original)"),
        _sampler(8, [1100, 320], erased_title),
        {"id": 9, "type": "VAEDecode", "pos": [1450, 0]},
        {"id": 10, "type": "VAEDecode", "pos": [1450, 320]},
        {"id": 11, "type": "PreviewImage", "pos": [1700, 0], "size": [260, 280], "title": "Original"},
        {"id": 12, "type": "SaveImage", "pos": [1700, 320], "size": [260, 320], "title": "Erased",
         "widgets": {"filename_prefix": "saemnesia/erased"}},
        _note(13, [0, 360], note),
    ]
    links = _base_links() + [
        (1, 0, 7, "model"), (3, 0, 7, "positive"), (4, 0, 7, "negative"), (5, 0, 7, "latent_image"),
        (1, 0, 6, "model"), (2, 0, 6, "sae"),
        (15 if styles else 6, 0, 8, "model"), (3, 0, 8, "positive"), (4, 0, 8, "negative"), (5, 0, 8, "latent_image"),
        (7, 0, 9, "samples"), (1, 2, 9, "vae"), (8, 0, 10, "samples"), (1, 2, 10, "vae"),
        (9, 0, 11, "images"), (10, 0, 12, "images"),
    ]
    if not styles:
        return {"nodes": nodes, "links": links}
    for node in nodes[6:12]:  # samplers, decoders and images move right to make room for the second eraser
        node["pos"] = [node["pos"][0] + 360, node["pos"][1]]
    nodes += [{"id": 14, "type": "SAEmnesiaLoadSAE", "pos": [0, 540], "title": "Load SAE (styles)",
               "widgets": {"sae_name": STYLE_SAE}},
              {"id": 15, "type": "SAEmnesiaEraseConcepts", "pos": [1080, 220], "size": [330, 560],
               "title": "Erase Concepts (styles)",
               "widgets": {"concepts": json.dumps(styles), "strength": style_strength}}]
    return {"nodes": nodes, "links": links + [(6, 0, 15, "model"), (14, 0, 15, "sae")]}


EXAMPLES = {
    "erase_one_concept": _erase(
        ["Hearts"], "An image of Hearts in Neon style.",
        "Same seed twice: the top sampler sees the plain toy model, the bottom one the model with the ticked "
        "concept erased by the SAE (Erase Concepts). Tick other concepts in the checklist; an empty "
        f"strength box uses the node's strength ({_num(demo.GAMMAS['object'])} here: on the toy model SAEmnesia's −1 "
        "is too gentle).",
        "KSampler (Hearts erased)", strength=demo.GAMMAS["object"]),
    "erase_several_concepts": _erase(
        ["Hearts"], "An image of Hearts in Stripes style.",
        "An object and a style erased at once by two chained Erase Concepts nodes (their edits compose): the "
        f"toy model decides objects at up_blocks.1 ({Path(SAE).stem}, strength {_num(demo.GAMMAS['object'])}) and styles at "
        f"up_blocks.2 ({Path(STYLE_SAE).stem}, strength {_num(demo.GAMMAS['style'])}: stronger wipes the image there). "
        "Each ticked concept may also "
        "have its own strength (the box beside its tick).",
        "KSampler (Hearts and Stripes erased)", strength=demo.GAMMAS["object"], styles=["Stripes"],
        style_strength=demo.GAMMAS["style"]),
    "probe_concepts": {
        "nodes": _toy_inputs("An image of Hearts in Neon style.") + [
            {"id": 6, "type": "SAEmnesiaConceptProbe", "pos": [720, 220], "size": [330, 480],
             "widgets": {"concepts": json.dumps(["Hearts", "Neon", "Stars"])}},
            _sampler(7, [1100, 0], "KSampler"),
            {"id": 8, "type": "VAEDecode", "pos": [1450, 0]},
            {"id": 9, "type": "SAEmnesiaProbeReport", "pos": [1450, 120]},
            {"id": 10, "type": "PreviewImage", "pos": [1750, 0], "size": [260, 280], "title": "Image"},
            {"id": 11, "type": "SaveImage", "pos": [1750, 320], "size": [300, 320], "title": "Where each concept fired",
             "widgets": {"filename_prefix": "saemnesia/probe"}},
            {"id": 12, "type": "PreviewAny", "pos": [1450, 320], "size": [280, 300], "title": "Presence scores"},
            _note(13, [0, 360], "Concept Probe edits nothing: it records where each ticked concept's latent "
                                "fires while the model samples. Probe Report overlays those maps on the image "
                                "(one image per concept) and scores each concept's presence."),
        ],
        "links": _base_links() + [
            (1, 0, 6, "model"), (2, 0, 6, "sae"),
            (6, 0, 7, "model"), (3, 0, 7, "positive"), (4, 0, 7, "negative"), (5, 0, 7, "latent_image"),
            (7, 0, 8, "samples"), (1, 2, 8, "vae"),
            (6, 1, 9, "probe"), (8, 0, 9, "images"),
            (8, 0, 10, "images"), (9, 0, 11, "images"), (9, 1, 12, "source"),
        ],
    },
}

BUILD_JS = """async (spec) => {
    const { app } = window.comfyAPI.app;
    app.graph.clear();
    const byId = {};
    for (const n of spec.nodes) {
        const node = window.LiteGraph.createNode(n.type);
        if (!node) throw new Error(`no node type ${n.type}`);
        node.id = n.id;
        app.graph.add(node);
        node.pos = n.pos;
        if (n.title) node.title = n.title;
        for (const [name, value] of Object.entries(n.widgets ?? {})) {
            const w = node.widgets.find((w) => w.name === name);
            if (!w) throw new Error(`${n.type} has no widget ${name}`);
            w.value = value;
        }
        if (n.type.startsWith("SAEmnesia")) node.properties.cnr_id = "saemnesia";
        node.saemnesiaChecklist?.readString();
        if (n.size) node.setSize(n.size);
        byId[n.id] = node;
    }
    for (const [from, slot, to, input] of spec.links) {
        const target = byId[to], index = target.findInputSlot(input);
        if (index < 0) throw new Error(`${target.type} has no input ${input}`);
        if (!byId[from].connect(slot, target, index)) throw new Error(`cannot link ${from}:${slot} -> ${to}.${input}`);
    }
    return JSON.stringify((await app.graphToPrompt()).workflow);  // what the app's Export writes
}"""


def build(page, name: str) -> dict:
    workflow = json.loads(page.evaluate(BUILD_JS, EXAMPLES[name]))
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"saemnesia/example_workflows/{name}"))
    workflow["extra"]["ds"] = {"scale": 0.75, "offset": [60, 80]}  # opens with every node in view
    return workflow


def main() -> None:
    server = ComfyServer(Path(tempfile.mkdtemp(prefix="saemnesia_examples_"))).start()
    try:
        with comfy_page(server) as page:
            OUT_DIR.mkdir(exist_ok=True)
            for name in EXAMPLES:
                workflow = build(page, name)
                (OUT_DIR / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                print("wrote", OUT_DIR / f"{name}.json")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
