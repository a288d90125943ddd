"""Checkpoints of every public diffusion-SAE family, written here at a small size with random weights in the exact
layout their authors' code writes (file names, key names, shapes, dtypes, config fields): no weights can be
downloaded here. Each writer returns the folder the README's `saemnesia convert` command (or Load SAE) is given,
and the raw parameters in the authors' own names, for the tests' independent statement of each family's hook.

- SAeUron (cywinski/SAeUron): `<hookpoint>/cfg.json` (SaeConfig fields + d_in) + `sae.safetensors` (save_model of
  the Sae: encoder.weight, encoder.bias, W_dec, b_dec), concept statistics `cls_latents_dict_<hookpoint>.pkl`
  (pickle.dump of {concept: tensor[prompts, steps, n]}).
- SAEmnesia (EIDOSLAB/SAEmnesia): the same files at the repository's root, cfg.json with `d_model`, plus
  `class_params.pth` (torch.save of {concept: {percentile, multiplier}}).
- SAEParate (khyeonjin/SAEParate): cfg.json with `use_pre_encoder_gelu`, sae.safetensors with pre_encoder.0.*.
- sdxl-unbox (surkovv/sdxl-unbox): `<hookpoint>_k10_hidden5120_auxk256_bs4096_lr0.0001/final/` with config.json
  (n_dirs_local, d_model, k, auxk, dead_steps_threshold), state_dict.pth ({"state_dict": {encoder.weight [n, d],
  decoder.weight [d, n], pre_bias, latent_bias, stats_last_nonzero}}), mean.pt and std.pt ([n]).
- The Flux SAE of antoniomari/SAE_flux_18: config.json, state_dict.pth and mean.pt at the root.
- TopK SAEs saved with PyTorchModelHubMixin (Krea / finebooru): `cc3m-transformer_blocks.18-1/` with config.json
  (the constructor's features, pages, k) and model.safetensors (encoder.weight, encoder.bias, decoder.weight, bias).
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class Raw:
    """A family's SAE in neutral names: W_enc [n, d], b_enc [n], W_dec [n, d] (rows = latents), b_dec [d], and the
    family's extras (a pre-encoder's weight and bias, each latent's mean activation)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    k: int
    pre: tuple[torch.Tensor, torch.Tensor] | None = None
    means: torch.Tensor | None = None


def random_raw(d: int, n: int, k: int, seed: int, pre_encoder: bool = False, means: bool = False,
               bias: float = 0.1) -> Raw:
    """Random weights at a small size; `bias` scales b_enc and b_dec."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(n, d, generator=g) / math.sqrt(d)
    W_dec = torch.randn(n, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    pre = (torch.randn(d, d, generator=g) / math.sqrt(d), torch.randn(d, generator=g) * 0.1) if pre_encoder else None
    return Raw(W_enc, torch.randn(n, generator=g) * bias, W_dec, torch.randn(d, generator=g) * bias, k, pre,
               torch.rand(n, generator=g) * 3 + 0.5 if means else None)


def write_concept_stats(path: Path, concepts: list[str], n: int, steps: int, seed: int,
                        strong: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A SAeUron statistics pickle {concept: tensor[prompts, steps, n]} (plain pickle.dump, as their gathering script
    writes it), the same in every step; each concept's `strong` latents stand out, so a percentile selects them. Small
    values, so that the thresholds they give (the mean over concepts) are passed where a latent is active."""
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for concept in concepts:
        acts = torch.rand(4, 1, n, generator=g) * 0.002
        acts[:, :, strong[concept]] += 0.05
        stats[concept] = acts.expand(4, steps, n).contiguous()
    with open(path, "wb") as f:
        pickle.dump(stats, f)
    return stats


def sparsify_weights(raw: Raw) -> dict[str, torch.Tensor]:
    weights = {"encoder.weight": raw.W_enc, "encoder.bias": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec}
    if raw.pre is not None:
        weights.update({"pre_encoder.0.weight": raw.pre[0], "pre_encoder.0.bias": raw.pre[1]})
    return weights


def write_saeuron(root: Path, hookpoint: str, raw: Raw, input_unit_norm: bool = True) -> Path:
    """SAeUron's `<hookpoint>/` folder (its load_from_hub layout)."""
    folder = root / hookpoint
    folder.mkdir(parents=True)
    d = raw.W_enc.shape[1]
    cfg = {"expansion_factor": raw.W_enc.shape[0] // d, "normalize_decoder": True, "num_latents": 0, "k": raw.k,
           "batch_topk": True, "sample_topk": False, "input_unit_norm": input_unit_norm, "multi_topk": False,
           "d_in": d}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(sparsify_weights(raw), str(folder / "sae.safetensors"))
    return folder


def write_saemnesia(root: Path, raw: Raw, concepts: dict[str, tuple[float, float]]) -> Path:
    """SAEmnesia's repository root: cfg.json (d_model) + sae.safetensors, and class_params.pth
    {concept: {percentile, multiplier}}."""
    root.mkdir(parents=True)
    d = raw.W_enc.shape[1]
    cfg = {"expansion_factor": raw.W_enc.shape[0] // d, "normalize_decoder": True, "num_latents": 0, "k": raw.k,
           "batch_topk": False, "sample_topk": False, "input_unit_norm": True, "multi_topk": False, "d_model": d}
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file(sparsify_weights(raw), str(root / "sae.safetensors"))
    torch.save({c: {"percentile": p, "multiplier": m} for c, (p, m) in concepts.items()}, root / "class_params.pth")
    return root


def write_saeparate(root: Path, hookpoint: str, raw: Raw) -> Path:
    """SAEParate's `<hookpoint>/` folder: its cfg.json carries `use_pre_encoder_gelu`."""
    folder = write_saeuron(root, hookpoint, raw, input_unit_norm=True)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(use_pre_encoder_gelu=True, num_latents=raw.W_enc.shape[0])
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def openai_state_dict(raw: Raw, dtype=torch.float32) -> dict:
    n = raw.W_enc.shape[0]
    return {"state_dict": {"encoder.weight": raw.W_enc.to(dtype), "decoder.weight": raw.W_dec.T.contiguous().to(dtype),
                           "pre_bias": raw.b_dec.to(dtype), "latent_bias": raw.b_enc.to(dtype),
                           "stats_last_nonzero": torch.zeros(n, dtype=torch.long)}}


def write_unbox(folder: Path, raw: Raw, dtype=torch.float32) -> Path:
    """sdxl-unbox's checkpoint folder (or the Flux SAE's root): config.json, state_dict.pth, mean.pt (and std.pt for
    SDXL's)."""
    folder.mkdir(parents=True)
    n, d = raw.W_enc.shape
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": n, "d_model": d, "k": raw.k, "auxk": 256,
                                                    "dead_steps_threshold": 2000}))
    torch.save(openai_state_dict(raw, dtype), folder / "state_dict.pth")
    torch.save(raw.means, folder / "mean.pt")
    return folder


def write_sdxl_unbox(root: Path, hookpoint: str, raw: Raw) -> Path:
    folder = write_unbox(root / f"{hookpoint}_k{raw.k}_hidden{raw.W_enc.shape[0]}_auxk256_bs4096_lr0.0001" / "final",
                         raw)
    torch.save(raw.means * 0.5, folder / "std.pt")
    return folder


def write_hub_topk(root: Path, name: str, raw: Raw) -> Path:
    """A PyTorchModelHubMixin folder of finebooru's TopkSparseAutoencoder(features, pages, k)."""
    folder = root / name
    folder.mkdir(parents=True)
    n, d = raw.W_enc.shape
    (folder / "config.json").write_text(json.dumps({"features": d, "pages": n, "k": raw.k}))
    save_file({"encoder.weight": raw.W_enc, "encoder.bias": raw.b_enc, "decoder.weight": raw.W_dec.T.contiguous(),
               "bias": raw.b_dec}, str(folder / "model.safetensors"))
    return folder
