"""Helpers that tests and benchmarks share: seeded random SAEs and SAE files, the papers' dense hook as a
reference implementation, and a free port. Nothing here is used on the product's own paths.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Sequence

import torch

from saemnesia_core.concepts import (Concept, ConceptTables, assigned_selection, build_tables, saeuron_scores,
                                     select_saeuron)
from saemnesia_core.sae import SAEConfig, TopKSAE, scatter_dense
from saemnesia_core.sae_file import SAEFile, save_sae_file
from saemnesia_core.timesteps import bucket_index

HOOKPOINT = "unet.up_blocks.1.attentions.1"


# ---------------------------------------------------------------------------------------------- random SAEs


def random_sae(d: int = 16, n: int = 64, k: int = 4, seed: int = 0, input_unit_norm: bool = False,
               dtype=torch.float32) -> TopKSAE:
    """A TopKSAE with seeded random weights, a non-zero encoder bias and b_dec, unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k, input_unit_norm))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(n, d, generator=g) / math.sqrt(d))
        sae.encoder.bias.copy_(0.1 * torch.randn(n, generator=g))
        sae.W_dec.copy_(torch.randn(n, d, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    sae.set_decoder_norm_to_unit_norm()
    return sae.to(dtype)


def sae_file_with_assigned_latents(sae: TopKSAE, latents: Sequence[int], labels: Sequence[str] | None = None,
                                   groups: Sequence[str] | None = None, num_buckets: int = 50,
                                   mean_acts: float = 1.0, thresholds: float | Sequence[float] = 0.0,
                                   hookpoint: str = HOOKPOINT, model_family: str = "toy",
                                   made_by: str = "saemnesia_tools.testing") -> SAEFile:
    """An SAEmnesia-style file over `sae`: concept c owns `latents[c]` in every bucket, with μ = `mean_acts` and
    θ = `thresholds` (one value, or one per concept; θ = 0 edits the latent wherever it is in the top k).
    Labels default to concept_0, concept_1, …, groups to "object"."""
    C = len(latents)
    labels = list(labels) if labels is not None else [f"concept_{c}" for c in range(C)]
    groups = list(groups) if groups is not None else ["object"] * C
    theta = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1, 1, 1).expand(C, num_buckets, 1)
    tables = ConceptTables(torch.as_tensor(list(latents)).reshape(C, 1, 1).expand(C, num_buckets, 1).clone(),
                           torch.full((C, num_buckets, 1), float(mean_acts)), theta.clone())
    return SAEFile(config=sae.cfg, weights={key: v.detach() for key, v in sae.state_dict().items()},
                   concepts=[Concept(label, group, int(i)) for label, group, i in zip(labels, groups, latents)],
                   tables=tables, hookpoint=hookpoint, model_family=model_family, num_buckets=num_buckets,
                   supervised=True, provenance={"made_by": made_by})


def concept_tokens(sae: TopKSAE, latent: int, shape: Sequence[int], strength: float = 4.0,
                   seed: int = 0) -> torch.Tensor:
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
                sums[c, t] = scatter_dense(*sae.encode(x), n).mean(1).sum(0)
    counts = torch.full((len(concepts),), prompts)
    if supervised:
        selection = assigned_selection(hidden, num_buckets)
    else:
        p = percentile if percentile is not None else 100 * (1 - 1.5 / n)
        selection = select_saeuron(saeuron_scores(sums, counts), p)
    out_concepts = [Concept(c.label, c.group, latent if supervised else c.latent, c.default_strength,
                            calibration=c.calibration) for c, latent in zip(concepts, hidden)]
    sae_file = SAEFile(
        config=sae.cfg, weights={k_: v.detach().to(dtype) for k_, v in sae.state_dict().items()},
        concepts=out_concepts, tables=build_tables(selection, sums / prompts) if concepts else None,
        hookpoint=hookpoint, model_family=model_family, num_buckets=num_buckets, supervised=supervised,
        provenance={"made_by": "saemnesia_tools.testing.make_random_sae_file", "seed": seed},
        selection_mode="saemnesia" if supervised else "saeuron",
    )
    if path is not None:
        save_sae_file(sae_file, path)
    return sae_file


# ---------------------------------------------------------------------------------------------- the papers' hook


def sae_input(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """x as the released hook encodes it: standardised per token under input_unit_norm."""
    if not sae.cfg.input_unit_norm:
        return x
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / ((x - mean).std(-1, keepdim=True) + 1e-5)


def dense_codes(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Dense z [..., N, n] as the released hook computes it (standardised input under input_unit_norm)."""
    pre = torch.relu((sae_input(sae, x) - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    acts, idx = pre.topk(sae.cfg.k, dim=-1)
    return scatter_dense(acts, idx, sae.cfg.num_latents)


def ablated_codes(z: torch.Tensor, concepts: Sequence[Concept], tables: ConceptTables, buckets: torch.Tensor,
                  strengths: dict[str, float], norms: torch.Tensor | None = None) -> torch.Tensor:
    """z′ of the released SAEMaskedUnlearningHook for z [B, N, n]: per item, the chosen concepts' latents of its
    bucket in file order; each selected z_i > θ is scaled by γ·μ; a latent listed twice takes the later entry.
    A calibrated concept (ours, DESIGN §6.7) sets it to γ·κ·‖x − b_dec‖ instead (`norms` [B, N])."""
    z_new = z.clone()
    for b, t in enumerate(buckets.tolist()):
        for c, concept in enumerate(concepts):
            if concept.label not in strengths:
                continue
            for latent, mu, theta in zip(tables.latents[c, t], tables.mean_acts[c, t], tables.thresholds[c, t]):
                if latent < 0:
                    continue
                original = z[b, :, latent]
                gamma = strengths[concept.label]
                target = original * gamma * mu if concept.calibration is None else gamma * concept.calibration * norms[b]
                z_new[b, :, latent] = torch.where(original > theta, target, original)
    return z_new


def released_hook(sae: TopKSAE, concepts: Sequence[Concept], tables: ConceptTables, x: torch.Tensor, t,
                  strengths: dict[str, float], exact: bool = False) -> torch.Tensor:
    """The papers' formulation on tokens x [B, N, d] at t (scalar or [B]): dense codes, decoded twice, plus the
    error x̂ − x (paper mode, which ignores calibrations). exact=True gives x + (z′ − z)·W_dec computed densely (our
    exact mode's meaning; the change is scaled back by the token's std under input_unit_norm)."""
    if not exact:
        concepts = [dataclasses.replace(c, calibration=None) for c in concepts]
    buckets = bucket_index(torch.as_tensor(t, dtype=torch.float32), tables.num_buckets).expand(x.shape[0])
    z = dense_codes(sae, x)
    z_new = ablated_codes(z, concepts, tables, buckets, strengths, (sae_input(sae, x) - sae.b_dec).norm(dim=-1))
    if exact:
        delta = (z_new - z) @ sae.W_dec
        if sae.cfg.input_unit_norm:
            delta = delta * x.std(-1, keepdim=True)
        return x + delta
    return (z_new @ sae.W_dec + sae.b_dec) + ((z @ sae.W_dec + sae.b_dec) - x)


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def released_hook_call(sae: TopKSAE, latents: torch.Tensor, thresholds: torch.Tensor, scale: torch.Tensor,
                       x: torch.Tensor) -> torch.Tensor:
    """One call of the released SAEMaskedUnlearningHook on a CFG batch x [2B, C, H, W], step for step as their hook
    runs it: its two halves permuted to tokens and joined, encoded (ReLU, top-k), scattered into a dense code,
    decoded, the selected latents above θ scaled, decoded again, the error x̂ − x added, and the halves put back.
    `latents` [S], `thresholds` [S] and `scale` [S] (γ·μ) are the step's, which the hook looks up by a call counter.
    The reference of the kernel counts (benchmarks/bench_edit.py, tests/test_eraser_cost.py)."""
    halves = [h.permute(0, 2, 3, 1).reshape(len(h), -1, h.shape[1]) for h in x.chunk(2)]
    tokens = torch.cat(halves)
    pre = torch.relu(torch.nn.functional.linear(tokens - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    acts, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    code = acts.new_zeros(*acts.shape[:-1], sae.cfg.num_latents).scatter_(-1, idx, acts)
    error = (code @ sae.W_dec + sae.b_dec - tokens).float()
    selected = code[:, :, latents]
    code[:, :, latents] = torch.where(selected > thresholds, selected * scale, selected)
    out = (code @ sae.W_dec + sae.b_dec + error).to(x.dtype)
    H, W = x.shape[2:]
    return torch.cat([h.reshape(len(h), H, W, -1).permute(0, 3, 1, 2) for h in out.chunk(2)])
