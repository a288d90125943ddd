"""SAEmnesia nodes for ComfyUI (V3 schema). Importing this module registers nothing: ComfyUI calls
`comfy_entrypoint` when it loads the pack, and that adds the model folders and the HTTP route."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from saemnesia_comfy import sae_library

from . import routes
from .sae_nodes import (ConceptProbe, EraseConcepts, EraseConceptsText, FindConceptLatents, LoadSAE, ProbeReport,
                        SaveSAE)
from .toy_nodes import ToyEmptyImage, ToyModelLoader


class SAEmnesiaExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadSAE, EraseConcepts, EraseConceptsText, ConceptProbe, ProbeReport, FindConceptLatents, SaveSAE,
                ToyModelLoader, ToyEmptyImage]


async def comfy_entrypoint() -> SAEmnesiaExtension:
    """Called by ComfyUI when it loads the pack: our model folders (before any node lists them) and our route."""
    sae_library.register_folders()
    routes.register()
    return SAEmnesiaExtension()
