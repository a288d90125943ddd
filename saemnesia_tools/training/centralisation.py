# SPDX-License-Identifier: GPL-3.0-or-later
"""How much of each concept its assigned latent carries (DESIGN §4.4): a latent can detect a concept perfectly and
still carry little of it, with other latents holding the rest; an edit of that one latent then steers the image
rather than removing the concept.

Per concept c with assigned latent a, over labelled records (each record's tokens averaged, as in §5), with the
records of the other concepts of c's group as the contrast:
- auroc: how well a's spatially averaged code separates c's records from the contrast (1 = perfectly);
- mean_difference_share: Δx = mean x of c's records − mean x of the contrast (in the SAE's input space), and
  Δz̄_a the same difference of a's averaged code; share = (Δz̄_a·W_dec[a]) · Δx / ‖Δx‖², the part of the
  concept's mean difference that a's decoder row, moved by a, reproduces (1 = all of it);
- other_latents_above: how many other latents separate c's records with AUROC > `threshold` (0 = a alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saemnesia_core.concepts import Concept
from saemnesia_core.sae import TopKSAE
from saemnesia_tools.training.shards import as_dataset
from saemnesia_tools.training.statistics import spatial_mean_codes

AUROC_THRESHOLD = 0.8


def average_ranks(values: Tensor) -> Tensor:
    """[R, n] -> [R, n] float64 1-based ranks of each column's values, ties sharing their average rank."""
    columns = values.T.contiguous().double()
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, right=False)
    up_to = torch.searchsorted(ordered, columns, right=True)
    return ((below + up_to + 1) / 2).T


def column_aurocs(values: Tensor, on: Tensor) -> Tensor:
    """AUROC of every column of [R, n] for the rows `on` [R] against the other rows (Mann-Whitney U, ties half)."""
    ranks = average_ranks(values)
    n_on, n_off = int(on.sum()), int((~on).sum())
    if not n_on or not n_off:
        return torch.full((values.shape[1],), float("nan"), dtype=torch.float64)
    return (ranks[on].sum(0) - n_on * (n_on + 1) / 2) / (n_on * n_off)


@torch.no_grad()
def record_means(sae: TopKSAE, data, *, where=None, batch_records: int = 64,
                 max_records: int = 20_000) -> tuple[Tensor, Tensor, Tensor]:
    """(per-record mean input x̄ [R, d] in the SAE's input space, spatially averaged code z̄ [R, n], labels [R, G])
    of at most `max_records` records (every j-th, for the smallest j that fits)."""
    ds = as_dataset(data)
    xs, zs, labels = [], [], []
    for batch in ds.iter_records(batch_records, shuffle=False, where=where):
        acts = batch.acts.float().to(sae.device)
        xs.append(sae.preprocess(acts).x.mean(1).cpu())
        zs.append(spatial_mean_codes(sae, acts).cpu())
        labels.append(batch.labels)
    if not xs:
        raise ValueError("no records to measure centralisation on")
    x, z, lab = torch.cat(xs), torch.cat(zs), torch.cat(labels)
    stride = -(-len(x) // max_records)
    return x[::stride], z[::stride], lab[::stride]


def centralisation(sae: TopKSAE, concepts: list[Concept], data, *, where=None, threshold: float = AUROC_THRESHOLD,
                   max_records: int = 20_000) -> list[dict]:
    """Per concept of `concepts` (assigned latents), in their order: label, group, latent, auroc,
    mean_difference_share, other_latents_above (see the module docstring)."""
    ds = as_dataset(data)
    x, z, labels = record_means(sae, ds, where=where, max_records=max_records)
    W_dec = sae.W_dec.detach().float().cpu()
    report = []
    for c in concepts:
        g = ds.label_groups.index(c.group)
        in_group = labels[:, g] >= 0
        on = labels[in_group, g] == ds.label_vocab[c.group].index(c.label)
        aurocs = column_aurocs(z[in_group], on)
        others = torch.ones_like(aurocs, dtype=torch.bool)
        others[c.latent] = False
        dx = x[in_group][on].mean(0) - x[in_group][~on].mean(0)
        dz = z[in_group][on, c.latent].mean() - z[in_group][~on, c.latent].mean()
        share = float((dz * W_dec[c.latent]) @ dx / dx.pow(2).sum().clamp(min=1e-12))
        report.append({"label": c.label, "group": c.group, "latent": c.latent, "auroc": round(float(aurocs[c.latent]), 4),
                       "mean_difference_share": round(share, 4),
                       "other_latents_above": int((aurocs[others] > threshold).sum())})
    return report
