"""Makes the example workflows ComfyUI lists as templates, with the real frontend: each graph is built in the
ComfyUI page (nodes created by the app, widgets set, links connected) and exported as the app's Export writes it,
so the files are exactly what this frontend version writes. The workflows use the shipped toy world
(`saemnesia_tools.toy.assets`) at Erase Concepts' defaults (`DEFAULT_EDIT`, DESIGN §6.10), enlarge their 32×32 images ×8
(nearest neighbour) for display, and open with every node in view. Each is then run once, and its images make
the template's thumbnail (example_workflows/<name>.jpg). Last, screenshots of the templates dialog and of an
Erase Concepts node go to docs/images/. Regenerate after a node's inputs change:

    .venv/bin/python scripts/build_example_workflows.py

(it starts a headless ComfyUI server with the pack and a headless Chromium; about two minutes)."""

from __future__ import annotations

import io
import json
import tempfile
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from saemnesia_tools.comfyui.browser import comfy_page, load_workflow, queue_from_page, wait_for_checklists
from saemnesia_core.concepts import DEFAULT_EDIT
from saemnesia_core.sae_file import load_sae_file
from saemnesia_tools.comfyui.server import ComfyServer
from saemnesia_tools.toy import assets

TOY_MODEL = Path(assets.MODEL).name
SAE = assets.SITES["object"].saemnesia
STYLE_SAE = assets.SITES["style"].saemnesia  # the toy's styles are erased at its 16x16 decoder level (README)
TEXT_SAE = assets.TEXT_SAE  # read at a layer of the toy's CLIP text encoder (DESIGN §6.8)
OUT_DIR = assets.REPO_ROOT / "example_workflows"
SCREENSHOTS = assets.REPO_ROOT / "docs" / "images"
NEGATIVE = ""
ENLARGE = 8  # the toy's 32×32 images, shown at 256×256
VIEW = (1280, 720)  # the canvas size every example must fit at first sight (a laptop's browser window)
# The template browser shows a custom pack's template by its file name (title and description alike)
ERASE_ONE, ERASE_BOTH, PROBE, REGION = ("Erase an object with the same seed", "Erase an object and a style at once",
                                        "Probe where each concept fires", "Erase only inside a mask")
TEXT = "Erase a concept in the text encoder"
TEACH = "Teach a concept, then erase it"


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


def _enlarge(node_id: int, pos) -> dict:
    return {"id": node_id, "type": "ImageScaleBy", "pos": pos, "title": f"Enlarge ×{ENLARGE} (for display)",
            "widgets": {"upscale_method": "nearest-exact", "scale_by": float(ENLARGE)}}


def _note(node_id: int, pos, text: str) -> dict:
    return {"id": node_id, "type": "Note", "pos": pos, "size": [330, 150], "widgets": {"text": text}}


def _base_links() -> list[tuple]:
    return [(1, 1, 3, "clip"), (1, 1, 4, "clip")]


def _erase(concepts, prompt: str, note: str, erased_title: str, strength: float = DEFAULT_EDIT.strength,
           styles=None, style_strength: float = DEFAULT_EDIT.strength) -> dict:
    """Original and erased side by side; with `styles`, a second Erase Concepts with the style SAE follows the first."""
    nodes = _toy_inputs(prompt) + [
        {"id": 6, "type": "SAEmnesiaEraseConcepts", "pos": [720, 220], "size": [330, 560],
         "widgets": {"concepts": json.dumps(concepts), "strength": strength}},
        _sampler(7, [1100, 0], "KSampler (original)"),
        _sampler(8, [1100, 320], erased_title),
        {"id": 9, "type": "VAEDecode", "pos": [1450, 0]},
        {"id": 10, "type": "VAEDecode", "pos": [1450, 360]},
        _enlarge(16, [1450, 110]),
        _enlarge(17, [1450, 470]),
        {"id": 11, "type": "PreviewImage", "pos": [1750, 0], "size": [290, 330], "title": "Original"},
        {"id": 12, "type": "SaveImage", "pos": [1750, 360], "size": [290, 360], "title": "Erased",
         "widgets": {"filename_prefix": "saemnesia/erased"}},
        _note(13, [0, 360], note),
    ]
    links = _base_links() + [
        (1, 0, 7, "model"), (3, 0, 7, "positive"), (4, 0, 7, "negative"), (5, 0, 7, "latent_image"),
        (1, 0, 6, "model"), (2, 0, 6, "sae"),
        (15 if styles else 6, 0, 8, "model"), (3, 0, 8, "positive"), (4, 0, 8, "negative"), (5, 0, 8, "latent_image"),
        (7, 0, 9, "samples"), (1, 2, 9, "vae"), (8, 0, 10, "samples"), (1, 2, 10, "vae"),
        (9, 0, 16, "image"), (10, 0, 17, "image"), (16, 0, 11, "images"), (17, 0, 12, "images"),
    ]
    if not styles:
        return {"nodes": nodes, "links": links}
    for node in nodes[6:14]:  # samplers, decoders and images move right to make room for the second eraser
        node["pos"] = [node["pos"][0] + 360, node["pos"][1]]
    nodes += [{"id": 14, "type": "SAEmnesiaLoadSAE", "pos": [0, 540], "title": "Load SAE (styles)",
               "widgets": {"sae_name": STYLE_SAE}},
              {"id": 15, "type": "SAEmnesiaEraseConcepts", "pos": [1080, 220], "size": [330, 560],
               "title": "Erase Concepts (styles)",
               "widgets": {"concepts": json.dumps(styles), "strength": style_strength}}]
    return {"nodes": nodes, "links": links + [(6, 0, 15, "model"), (14, 0, 15, "sae")]}


def _erase_text(concepts, prompt: str, note: str, erased_title: str) -> dict:
    """`_erase`'s layout with Erase Concepts (text) in the eraser's place: it patches the CLIP, and the erased sampler
    gets the prompt and the negative prompt encoded again with that CLIP, and the unpatched model."""
    spec = _erase(concepts, prompt, note, erased_title)
    nodes = {n["id"]: n for n in spec["nodes"]}
    nodes[2]["widgets"]["sae_name"] = TEXT_SAE
    nodes[6].update(type="SAEmnesiaEraseConceptsText", size=[330, 500])
    del nodes[6]["widgets"]["strength"]  # the text node's default, −1
    for node in spec["nodes"][6:14]:  # samplers, decoders and images move right to make room for the encoders
        node["pos"] = [node["pos"][0] + 360, node["pos"][1]]
    spec["nodes"] += [
        {"id": 18, "type": "CLIPTextEncode", "pos": [1080, 220], "size": [300, 110], "title": "Prompt (erased CLIP)",
         "widgets": {"text": prompt}},
        {"id": 19, "type": "CLIPTextEncode", "pos": [1080, 370], "size": [300, 90],
         "title": "Negative prompt (erased CLIP)", "widgets": {"text": NEGATIVE}}]
    rewired = {(1, 0, 6, "model"): (1, 1, 6, "clip"), (6, 0, 8, "model"): (1, 0, 8, "model"),
               (3, 0, 8, "positive"): (18, 0, 8, "positive"), (4, 0, 8, "negative"): (19, 0, 8, "negative")}
    spec["links"] = [rewired.get(link, link) for link in spec["links"]] + [(6, 0, 18, "clip"), (6, 0, 19, "clip")]
    return spec


def _teach(label: str, prompt: str, note: str, erased_title: str) -> dict:
    """`_erase`'s layout with an unlabelled SAE (assets.UNLABELLED_SAE) taught `label` by Find Concept Latents
    between Load SAE and Erase Concepts; its preview (where the found latents fire) beside it."""
    from saemnesia_tools.toy.prompts import make_prompt
    from saemnesia_tools.toy.render import STYLES

    spec = _erase([label], prompt, note, erased_title)
    nodes = {n["id"]: n for n in spec["nodes"]}
    nodes[2]["widgets"]["sae_name"] = assets.UNLABELLED_SAE
    nodes[13]["pos"], nodes[13]["size"] = [0, 420], [330, 210]
    for node in spec["nodes"][5:13]:  # the eraser, samplers, decoders and images move right to make room
        node["pos"] = [node["pos"][0] + 400, node["pos"][1]]
    recipe = load_sae_file(assets.path(assets.SITES["object"].saeuron)).provenance["recipe"]
    spec["nodes"] += [
        {"id": 18, "type": "SAEmnesiaFindConceptLatents", "pos": [720, 220], "size": [360, 620],
         "widgets": {"label": label, "positive_prompts": "\n".join(make_prompt(label, s) for s in STYLES),
                     "seeds": 1, "steps": recipe["sample_steps"], "cfg": recipe["cfg"], "selection": "percentile",
                     "percentile": recipe["percentile"], "group": "object"}},
        _enlarge(20, [360, 420]),
        {"id": 19, "type": "PreviewImage", "pos": [360, 540], "size": [330, 330],
         "title": "Where the found latents fire (with, without)"}]
    rewired = {(2, 0, 6, "sae"): (18, 0, 6, "sae")}
    spec["links"] = [rewired.get(link, link) for link in spec["links"]] + [
        (1, 0, 18, "model"), (1, 1, 18, "clip"), (2, 0, 18, "sae"), (5, 0, 18, "latent"), (1, 2, 18, "vae"),
        (18, 1, 20, "image"), (20, 0, 19, "images")]
    return spec


EXAMPLES = {
    ERASE_ONE: _erase(
        ["Hearts"], "An image of Hearts in Neon style.",
        "Same seed twice: the top sampler sees the plain toy model, the bottom one the model with the ticked "
        "concept erased by the SAE (Erase Concepts). Tick other concepts in the checklist; an empty "
        f"strength box uses the node's strength ({DEFAULT_EDIT.strength:g}; with {DEFAULT_EDIT.mode} mode on the "
        f"{DEFAULT_EDIT.branches} branch, the node's defaults, it removed the most on the toy world).",
        "KSampler (Hearts erased)"),
    ERASE_BOTH: _erase(
        ["Hearts"], "An image of Hearts in Stripes style.",
        "An object and a style erased at once by two chained Erase Concepts nodes (their edits compose): the "
        f"toy model decides objects at up_blocks.1 ({Path(SAE).stem}) and styles at up_blocks.2 "
        f"({Path(STYLE_SAE).stem}), both at the node's defaults. "
        "Each ticked concept may also "
        "have its own strength (the box beside its tick).",
        "KSampler (Hearts and Stripes erased)", styles=["Stripes"]),
    TEXT: _erase_text(
        ["Hearts"], "An image of Hearts in Neon style.",
        "Erase Concepts (text) edits the text encoder, not the model: every prompt encoded with the CLIP it "
        "outputs has the ticked concepts suppressed at one layer of the encoder, before sampling starts. The same "
        "prompt, encoded twice: with the plain CLIP (top sampler) and with the erased one (bottom). One text SAE "
        "serves every model that uses this encoder.",
        "KSampler (Hearts erased in the prompt)"),
    REGION: {
        "nodes": [n for n in _erase(["Hearts"], "An image of Hearts in Neon style.", "",
                                    "KSampler (Hearts erased, left half)")["nodes"]
                  if n["id"] != 13] + [
            {"id": 18, "type": "SolidMask", "pos": [360, 420], "title": "Whole image (0 = keep)",
             "widgets": {"value": 0.0, "width": 32, "height": 32}},
            {"id": 19, "type": "SolidMask", "pos": [360, 560], "title": "Left half (1 = erase)",
             "widgets": {"value": 1.0, "width": 16, "height": 32}},
            {"id": 20, "type": "MaskComposite", "pos": [360, 700], "title": "Mask: erase the left half",
             "widgets": {"x": 0, "y": 0, "operation": "add"}},
            _note(13, [0, 360], "Erase Concepts edits only the block's tokens under the white part of its mask: "
                                "here the left half (two Solid Masks composited; any MASK works, e.g. one painted "
                                "on a Load Image in ComfyUI's mask editor). The layers after the block still mix "
                                "the image, so on this 32×32 toy the change spreads past the mask's edge."),
        ],
        "links": _erase(["Hearts"], "", "", "")["links"] + [
            (18, 0, 20, "destination"), (19, 0, 20, "source"), (20, 0, 6, "mask")],
    },
    TEACH: _teach(
        "Hearts", "An image of Hearts in Neon style.",
        "The SAE has no labels, as public SAEs come. Find Concept Latents samples the prompts that show the concept "
        "(here Hearts in every style) and the same prompts without it, scores the SAE's latents (SAeUron's score, "
        "at the toy files' percentile) and returns the SAE with the concept added, which Erase Concepts erases. Its "
        "preview shows where the found latents fire. Save SAE keeps it for the checklist.",
        "KSampler (Hearts erased)"),
    PROBE: {
        "nodes": _toy_inputs("An image of Hearts in Neon style.") + [
            {"id": 6, "type": "SAEmnesiaConceptProbe", "pos": [720, 220], "size": [330, 480],
             "widgets": {"concepts": json.dumps(["Hearts", "Neon", "Stars"])}},
            _sampler(7, [1100, 0], "KSampler"),
            {"id": 8, "type": "VAEDecode", "pos": [1450, 0]},
            {"id": 9, "type": "SAEmnesiaProbeReport", "pos": [1450, 230]},
            _enlarge(14, [1450, 110]),
            _enlarge(15, [1750, 360]),
            {"id": 10, "type": "PreviewImage", "pos": [1750, 0], "size": [290, 330], "title": "Image"},
            {"id": 11, "type": "SaveImage", "pos": [2050, 0], "size": [290, 360], "title": "Where each concept fired",
             "widgets": {"filename_prefix": "saemnesia/probe"}},
            {"id": 12, "type": "PreviewAny", "pos": [1450, 400], "size": [280, 300], "title": "Presence scores"},
            _note(13, [0, 360], "Concept Probe edits nothing: it records where each ticked concept's latent "
                                "fires while the model samples. Probe Report overlays those maps on the image "
                                "(one image per concept) and scores each concept's presence."),
        ],
        "links": _base_links() + [
            (1, 0, 6, "model"), (2, 0, 6, "sae"),
            (6, 0, 7, "model"), (3, 0, 7, "positive"), (4, 0, 7, "negative"), (5, 0, 7, "latent_image"),
            (7, 0, 8, "samples"), (1, 2, 8, "vae"),
            (6, 1, 9, "probe"), (8, 0, 9, "images"),
            (8, 0, 14, "image"), (14, 0, 10, "images"), (9, 0, 15, "image"), (15, 0, 11, "images"),
            (9, 1, 12, "source"),
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
    // open with every node in view on a VIEW-sized canvas: the bounding box of the nodes (titles included)
    const title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph._nodes;
    const [x0, y0] = [Math.min(...nodes.map((n) => n.pos[0])), Math.min(...nodes.map((n) => n.pos[1] - title))];
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const [w, h] = spec.view, margin = 30;
    const scale = Math.min(1, (w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];
    return JSON.stringify((await app.graphToPrompt()).workflow);  // what the app's Export writes
}"""


def build(page, name: str) -> dict:
    workflow = json.loads(page.evaluate(BUILD_JS, {**EXAMPLES[name], "view": VIEW}))
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"saemnesia/example_workflows/{name}"))
    ds = workflow["extra"]["ds"]
    workflow["extra"]["ds"] = {"scale": round(ds["scale"], 4), "offset": [round(v, 1) for v in ds["offset"]]}
    return workflow


THUMBNAIL_IMAGES = {ERASE_ONE: ((11, "original"), (12, "Hearts erased")),
                    ERASE_BOTH: ((11, "original"), (12, "Hearts and Stripes erased")),
                    PROBE: ((10, "image"), (11, "where Hearts fired")),
                    REGION: ((11, "original"), (12, "Hearts erased, left half")),
                    TEXT: ((11, "original"), (12, "Hearts erased in the prompt")),
                    TEACH: ((11, "original"), (12, "Hearts taught, then erased"))}


def thumbnail(server, page, workflow: dict, name: str) -> Image.Image:
    """The workflow run once in the page; its images side by side, labelled (the template's thumbnail)."""
    load_workflow(page, workflow)
    wait_for_checklists(page)
    entry = server.wait(queue_from_page(page), timeout=1800)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{name} failed: {json.dumps(entry['status'])[:2000]}")
    tiles = []
    for node_id, label in THUMBNAIL_IMAGES[name]:
        (png, *_) = server.images(entry, str(node_id))
        tile = Image.open(io.BytesIO(png)).convert("RGB")
        ImageDraw.Draw(tile).text((8, 6), label, fill="black", stroke_width=3, stroke_fill="white",
                                  font=ImageFont.load_default(size=20))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 8
    return sheet


def screenshots(page, erase_one: dict) -> None:
    """The templates dialog on this pack's page, and the Erase Concepts node with its checklist."""
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text("saemnesia", exact=True).first.click()
    page.wait_for_function("""() => [...document.querySelectorAll('[role=dialog] img')].filter(
        (i) => !i.src.includes('default-template') && i.complete && i.naturalWidth > 0).length === %d""" % len(EXAMPLES))
    page.screenshot(path=str(SCREENSHOTS / "templates_dialog.png"))
    page.reload()  # a fresh page, without the dialog
    page.wait_for_function("!!(window.app?.graph && window.LiteGraph?.registered_node_types?.SAEmnesiaEraseConcepts)")
    load_workflow(page, erase_one)
    wait_for_checklists(page)
    box = page.evaluate("""() => {
        const n = window.app.graph.getNodeById(6), title = window.LiteGraph.NODE_TITLE_HEIGHT;
        const [x, y] = window.app.canvasPosToClientPos([n.pos[0], n.pos[1] - title]);
        const s = window.app.canvas.ds.scale;
        return { x: x - 10, y: y - 10, width: n.size[0] * s + 20, height: (n.size[1] + title) * s + 20 };
    }""")
    page.screenshot(path=str(SCREENSHOTS / "erase_node.png"), clip=box)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="saemnesia_examples_") as folder:
        server = ComfyServer(Path(folder)).start()
        try:
            with comfy_page(server) as page:
                OUT_DIR.mkdir(exist_ok=True)
                built = {}
                for name in EXAMPLES:
                    built[name] = build(page, name)
                    (OUT_DIR / f"{name}.json").write_text(json.dumps(built[name], indent=2) + "\n")
                    print("wrote", OUT_DIR / f"{name}.json")
                for name, workflow in built.items():
                    thumbnail(server, page, workflow, name).save(OUT_DIR / f"{name}.jpg", quality=90)
                    print("wrote", OUT_DIR / f"{name}.jpg")
                screenshots(page, built[ERASE_ONE])
                print("wrote", SCREENSHOTS / "templates_dialog.png", SCREENSHOTS / "erase_node.png")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
