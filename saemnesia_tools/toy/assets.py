"""The toy world's shipped files and SAE sites, named once (DESIGN §8).

The build writes these files, the demo, the evaluation, the benchmarks and the tests read them. Paths are
relative to a models folder (the repository's `models/` unless a caller builds elsewhere); SAE entries are also
the names under which ComfyUI's Load SAE lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"

MODEL = "toy/toy_world.safetensors"
JUDGES = "toy/toy_judges.safetensors"
BUILD_REPORT = "toy/build_report.json"
SAE_FOLDER = "saemnesia"


@dataclass(frozen=True)
class SAESite:
    """One block the toy world's SAEs read, the concept groups its SAEmnesia file is calibrated to erase there, and
    the two SAE files trained on it (both know all 16 concepts)."""

    groups: tuple[str, ...]
    hookpoint: str
    saemnesia: str
    """The supervised SAE's file name (one latent per concept)."""
    saeuron: str
    """The unsupervised SAE's file name (latents selected by score)."""

    def sae(self, method: str) -> str:
        """The file name of `method` ("saemnesia" or "saeuron") at this site."""
        return {"saemnesia": self.saemnesia, "saeuron": self.saeuron}[method]


# Objects: SAeUron's and SAEmnesia's block (8x8 tokens). Styles: the toy model reads its styles from the prompt
# again at the 16x16 decoder level (benchmarks/studies/prompt_swap.py), so the style SAEs sit at that level's
# last block, the last cross-attention before the image is drawn.
SITES = {
    "object": SAESite(("object",), "unet.up_blocks.1.attentions.1", "toy_saemnesia.safetensors",
                      "toy_saeuron.safetensors"),
    "style": SAESite(("style",), "unet.up_blocks.2.attentions.2", "toy_saemnesia_styles.safetensors",
                     "toy_saeuron_styles.safetensors"),
}

# Multi-site erasure (DESIGN §6.6). Both groups are also read at the 16x16 encoder level: the prompt swapped there and
# at a group's own site together leaves far fewer objects and styles than at either alone (prompt_swap.py), so one
# more SAE pair sits at that level's last block, calibrated for both groups. A group's multi-site edit chains it with
# the group's own site (Load SAE's `also`), in the order the UNet runs them.
ENCODER_SITE = SAESite(("object", "style"), "unet.down_blocks.1.attentions.1", "toy_saemnesia_encoder.safetensors",
                       "toy_saeuron_encoder.safetensors")
ALL_SITES = (*SITES.values(), ENCODER_SITE)
MULTI_SITE = {group: (ENCODER_SITE, site) for group, site in SITES.items()}

# The object site's SAeUron file with every label stripped: an SAE as public SAEs come, which the "Teach a concept,
# then erase it" example teaches in ComfyUI (Find Concept Latents, DESIGN §5.4).
UNLABELLED_SAE = "toy_saeuron_unlabelled.safetensors"

# The text-encoder SAE (DESIGN §6.8): the middle layer of the toy's 3-layer CLIP, one file for both groups.
TEXT_SAE = "toy_saemnesia_text.safetensors"
TEXT_HOOKPOINT = "clip_l.text_model.encoder.layers.1"


def path(name: str, models: Path = MODELS) -> Path:
    """A shipped file: MODEL, JUDGES, BUILD_REPORT, or an SAE file name (found in the SAE folder)."""
    return models / name if "/" in name else models / SAE_FOLDER / name
