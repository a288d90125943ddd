"""Factories for core tests: the papers' score as their code computes it, checkpoint folders and statistics
pickles in other projects' layouts. Random SAEs and SAE files shared with the benchmarks are in
saemnesia_tools.testing."""

from __future__ import annotations

import json
import pickle

import torch
from safetensors.torch import save_file


HOOKPOINT = "unet.up_blocks.1.attentions.1"


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
