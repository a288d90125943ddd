"""Factories for core tests (and any test that needs an SAE file): small random SAEs with real statistics.

`make_random_sae_file` is a stable public helper: other test modules build on its signature.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from saemnesia_core.concepts import (
    Concept,
    assigned_selection,
    build_tables,
    saeuron_scores,
    select_saeuron,
)
from saemnesia_core.sae import SAEConfig, TopKSAE, scatter_dense
from saemnesia_core.sae_file import SAEFile, save_sae_file

HOOKPOINT = "unet.up_blocks.1.attentions.1"


def random_sae(d: int = 16, n: int = 64, k: int = 4, seed: int = 0, input_unit_norm: bool = False,
               dtype=torch.float32) -> TopKSAE:
    """A TopKSAE with random (seeded) weights, a non-zero encoder bias and b_dec, unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k, input_unit_norm))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(n, d, generator=g) / math.sqrt(d))
        sae.encoder.bias.copy_(0.1 * torch.randn(n, generator=g))
        sae.W_dec.copy_(torch.randn(n, d, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    sae.set_decoder_norm_to_unit_norm()
    return sae.to(dtype)


def concept_tokens(sae: TopKSAE, latent: int, shape: Sequence[int], strength: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Random tokens [*shape, d] pushed along latent's encoder direction, so that latent fires on them."""
    g = torch.Generator().manual_seed(seed)
    direction = sae.encoder.weight[latent].detach().float()
    direction = direction / direction.norm()
    return torch.randn(*shape, sae.cfg.d_in, generator=g) + strength * math.sqrt(sae.cfg.d_in) * direction * \
        torch.rand(*shape, 1, generator=g)


def make_random_sae_file(d: int = 16, n: int = 64, k: int = 4,
                         concepts: Sequence[str | Concept] = ("Cats", "Dogs", "Van_Gogh"),
                         supervised: bool = True, num_buckets: int = 4, seed: int = 0, *,
                         input_unit_norm: bool = False, dtype=torch.float32, percentile: float | None = None,
                         prompts: int = 3, tokens: int = 8, hookpoint: str = HOOKPOINT, model_family: str = "toy",
                         path=None) -> SAEFile:
    """A valid SAE file whose statistics come from encoding synthetic concept tokens, as the real pipeline does.

    Each concept gets a hidden latent (distinct, seeded) and tokens along its direction per bucket. supervised:
    SAEmnesia selection (the latent is assigned, L = 1); otherwise SAeUron selection by score at `percentile`
    (default: about two latents per bucket). String concepts get group "object". If `path` is given, the file
    is also saved there.
    """
    g = torch.Generator().manual_seed(seed + 1)
    sae = random_sae(d, n, k, seed, input_unit_norm)
    concepts = [c if isinstance(c, Concept) else Concept(c, "object", None) for c in concepts]
    hidden = torch.randperm(n, generator=g)[: len(concepts)].tolist()
    sums = torch.zeros(len(concepts), num_buckets, n)
    with torch.no_grad():
        for c, latent in enumerate(hidden):
            for t in range(num_buckets):
                x = concept_tokens(sae, latent, (prompts, tokens), seed=seed * 1000 + c * 100 + t)
                code = sae.encode(x)
                sums[c, t] = scatter_dense(*code, n).mean(1).sum(0)
    counts = torch.full((len(concepts),), prompts)
    if supervised:
        selection = assigned_selection(hidden, num_buckets)
    else:
        p = percentile if percentile is not None else 100 * (1 - 1.5 / n)
        selection = select_saeuron(saeuron_scores(sums, counts), p)
    out_concepts = [Concept(c.label, c.group, latent if supervised else c.latent, c.default_strength)
                    for c, latent in zip(concepts, hidden)]
    sae_file = SAEFile(
        config=sae.cfg, weights={k_: v.detach().to(dtype) for k_, v in sae.state_dict().items()},
        concepts=out_concepts, tables=build_tables(selection, sums / prompts) if concepts else None,
        hookpoint=hookpoint, model_family=model_family, num_buckets=num_buckets, supervised=supervised,
        provenance={"made_by": "tests/helpers_core.make_random_sae_file", "seed": seed},
        selection_mode="saemnesia" if supervised else "saeuron",
    )
    if path is not None:
        save_sae_file(sae_file, path)
    return sae_file


def released_saeuron_score(latents_by_concept: dict, target: str, step: int) -> torch.Tensor:
    """Reference: SAeUron's per-step score as its code computes it (other concepts' prompts concatenated)."""
    mean_x = latents_by_concept[target][:, step].float().mean(0)
    others = torch.cat([v[:, step].float() for k, v in latents_by_concept.items() if k != target]).mean(0)
    return mean_x / (mean_x.sum() + 1e-8) - others / (others.sum() + 1e-8)


# ---------------------------------------------------------------------------------------------- other layouts


def write_sparsify_folder(folder, sae, dtype=torch.float32, **cfg_overrides):
    """cfg.json + sae.safetensors as sparsify's / SAeUron's save_to_disk writes them."""
    folder.mkdir(parents=True)
    cfg = {"expansion_factor": sae.cfg.num_latents // sae.cfg.d_in, "normalize_decoder": True,
           "num_latents": sae.cfg.num_latents, "k": sae.cfg.k, "batch_topk": True, "sample_topk": False,
           "input_unit_norm": sae.cfg.input_unit_norm, "multi_topk": False, "d_in": sae.cfg.d_in, **cfg_overrides}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sae.state_dict().items()}, str(folder / "sae.safetensors"))
    return folder


def write_openai_folder(folder, sae, nested=False):
    """config.json + state_dict.pth with OpenAI / sdxl-unbox key names, as SAEmnesia's loader reads them."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"n_dirs_local": sae.cfg.num_latents, "d_model": sae.cfg.d_in, "k": sae.cfg.k, "auxk": 8,
         "dead_steps_threshold": 100}))
    sd = {"pre_bias": sae.b_dec.detach(), "latent_bias": sae.encoder.bias.detach(),
          "encoder.weight": sae.encoder.weight.detach(), "decoder.weight": sae.W_dec.detach().T.contiguous(),
          "stats_last_nonzero": torch.zeros(sae.cfg.num_latents, dtype=torch.int64)}
    torch.save({"state_dict": sd} if nested else sd, folder / "state_dict.pth")
    return folder


def synthetic_statistics(n=64, steps=100, prompts=(3, 2, 4), seed=0):
    """{concept: fp16 tensor[n_prompts, steps, n]} of sparse non-negative 'spatially averaged' latents."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c, (name, p) in enumerate(zip(("Cats", "Dogs", "Birds"), prompts)):
        acts = torch.rand(p, steps, n, generator=g) * (torch.rand(p, steps, n, generator=g) < 0.2)
        acts[:, :, 5 + c] += 2.0 + torch.arange(steps) / steps  # a concept latent, stronger at later steps
        out[name] = acts.half()
    return out


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)  # as SAeUron's gather script writes cls_latents_dict_*.pkl
    return path
