"""SAEmnesia nodes for ComfyUI (V3 schema)."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from saemnesia_comfy import sae_library

from . import routes
from .sae_nodes import ConceptProbe, EraseConcepts, EraseConceptsText, LoadSAE, ProbeReport
from .toy_nodes import ToyEmptyImage, ToyModelLoader

sae_library.register_folders()
routes.register()


class SAEmnesiaExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadSAE, EraseConcepts, EraseConceptsText, ConceptProbe, ProbeReport, ToyModelLoader, ToyEmptyImage]


async def comfy_entrypoint() -> SAEmnesiaExtension:
    return SAEmnesiaExtension()
