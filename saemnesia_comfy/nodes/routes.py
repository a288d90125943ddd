"""The pack's HTTP routes: the concept list of an SAE, read from its file header only (the UI calls it on
every refresh). Names resolve only to entries of the saemnesia model folders."""

from __future__ import annotations

import sys
from dataclasses import asdict

from aiohttp import web

from saemnesia_comfy import sae_library
from saemnesia_core.sae_file import SAEFileError


async def concepts(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    try:
        header = sae_library.read_entry_header(name)
    except ValueError as e:  # includes SAEFileError
        status = 422 if isinstance(e, SAEFileError) else 400
        return web.json_response({"error": str(e)}, status=status)
    except FileNotFoundError as e:
        return web.json_response({"error": str(e)}, status=404)
    answer = {"name": name, "hookpoint": header.hookpoint, "model_family": header.model_family,
              "supervised": header.supervised, "selection_mode": header.selection_mode, "d_in": header.config.d_in,
              "num_latents": header.config.num_latents, "k": header.config.k, "reads": header.reads_text,
              "concepts": [asdict(c) for c in header.concepts]}
    if not header.concepts:
        answer["note"] = NO_CONCEPTS
    return web.json_response(answer)


NO_CONCEPTS = ("This SAE has no concepts yet: teach one with Find Concept Latents (prompts that show it and prompts "
               "that don't), or type a latent's index in the filter (#123) to erase or probe that latent.")


def register() -> bool:
    """Add the routes to the running server (no server, e.g. in-process tests: nothing to do)."""
    server = sys.modules.get("server")  # ComfyUI's main.py imports it before loading custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get("/saemnesia/concepts")(concepts)
    return True
