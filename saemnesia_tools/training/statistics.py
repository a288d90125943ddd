# SPDX-License-Identifier: GPL-3.0-or-later
"""Concept statistics (DESIGN §5): run an SAE over labelled records and write μ_c / θ per timestep bucket.

For every record the SAE's per-token TopK code is averaged over the record's tokens (SAeUron's "spatially
averaged z"); sums are kept per concept and bucket. μ(i, t, c) is their mean: every sample contributes the
same steps, so the mean over records equals SAeUron's mean over prompts. Scores compare a concept with the
other concepts *of its group* (styles against styles, objects against objects), as SAeUron's separate object
and style dictionaries do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia_core.concepts import Concept, assigned_selection, build_tables, saeuron_scores, select_saeuron
from saemnesia_core.concept_statistics import DEFAULT_PERCENTILE
from saemnesia_core.sae import TopKSAE
from saemnesia_core.sae_file import SAEFile, load_sae_file, save_sae_file
from saemnesia_core.timesteps import bucket_index
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import RecordBatch, as_dataset

DEFAULT_BUCKETS = 50


@torch.no_grad()
def spatial_mean_codes(sae: TopKSAE, acts: Tensor) -> Tensor:
    """Records [R, H*W, d] -> [R, n]: each record's per-token TopK code averaged over its tokens."""
    R, tokens, _ = acts.shape
    top_acts, top_indices = sae.encode(acts.to(sae.device))
    rows = torch.arange(R, device=sae.device).repeat_interleave(tokens * sae.cfg.k)
    flat = rows * sae.cfg.num_latents + top_indices.reshape(-1)
    out = torch.zeros(R * sae.cfg.num_latents, device=sae.device)
    out.index_add_(0, flat, top_acts.reshape(-1).float())
    return out.view(R, -1) / tokens


def auroc(on: Tensor, off: Tensor) -> float:
    """P(a random on-record's value > a random off-record's), ties counting half (Mann-Whitney U)."""
    if not len(on) or not len(off):
        return float("nan")
    values = torch.cat([on, off]).double()
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1
    average_rank = (first_rank + (counts - 1) / 2.0)[inverse]
    u = average_rank[: len(on)].sum() - len(on) * (len(on) + 1) / 2.0
    return float(u / (len(on) * len(off)))


@dataclass
class ConceptActivations:
    """Sums of spatially averaged codes per concept and bucket (a reduced SAeUron concept dictionary)."""

    concepts: list[tuple[str, str]]  # (group, label), groups in dataset order, labels in vocabulary order
    sums: Tensor                     # [C, T, n] float32
    records: Tensor                  # [C, T] records per concept and bucket
    all_sums: Tensor                 # [T, n] over every record (labelled or not)
    all_records: Tensor              # [T]
    tracked_latents: Tensor | None = None  # [A] latents whose per-record values were kept
    tracked_values: Tensor | None = None   # [R', A] spatially averaged z of a strided subset of records
    tracked_labels: Tensor | None = None   # [R', G] their label ids

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for g, _ in self.concepts))

    def index(self, group: str, label: str) -> int:
        return self.concepts.index((group, label))

    def missing(self) -> list[str]:
        """Concepts ("group:label") without a single record."""
        return [f"{g}:{label}" for (g, label), r in zip(self.concepts, self.records.sum(1)) if r == 0]

    def means(self) -> Tensor:
        """μ [C, T, n]; a bucket without records takes the nearest bucket that has some."""
        if self.missing():
            raise ValueError(f"no records for concepts {self.missing()}")
        mu = self.sums / self.records.clamp(min=1)[..., None]
        buckets = torch.arange(self.records.shape[1])
        for c in range(len(self.concepts)):
            have = (self.records[c] > 0).nonzero().squeeze(1)
            nearest = have[(buckets[:, None] - have[None, :]).abs().argmin(1)]
            mu[c] = mu[c, nearest]
        return mu

    def scores(self) -> Tensor:
        """SAeUron scores [C, T, n], ¬c = the other concepts of c's group, prompts weighted by record counts."""
        mu, counts = self.means(), self.records.sum(1).double()
        scores = torch.empty_like(mu)
        for group in self.groups:
            ids = torch.tensor([i for i, (g, _) in enumerate(self.concepts) if g == group])
            if len(ids) == 1:  # nothing to contrast with: the concept's own activation profile
                scores[ids] = mu[ids] / (mu[ids].sum(-1, keepdim=True) + 1e-8)
            else:
                scores[ids] = saeuron_scores(mu[ids].double() * counts[ids, None, None], counts[ids])
        return scores

    def selectivity(self, group: str, label: str, latent: int) -> dict:
        """How much more ``latent`` fires on the concept's records than on all other records (pooled over t).

        selectivity = on / (on + off) of the mean spatially averaged activation: 0.5 = indifferent,
        1 = fires only on the concept, 0 = never on it. auroc (when the latent was tracked): how well its
        per-record value separates the concept's records from the others (1 = perfectly, 0.5 = chance).
        """
        c = self.index(group, label)
        on_sum, on_n = float(self.sums[c, :, latent].sum()), float(self.records[c].sum())
        off_sum = float(self.all_sums[:, latent].sum()) - on_sum
        off_n = float(self.all_records.sum()) - on_n
        on, off = on_sum / max(on_n, 1), off_sum / max(off_n, 1)
        report = {"label": label, "group": group, "latent": latent, "mean_on": on, "mean_off": off,
                  "selectivity": on / (on + off) if on + off > 0 else 0.0}
        if self.tracked_latents is not None and latent in self.tracked_latents.tolist():
            values = self.tracked_values[:, self.tracked_latents.tolist().index(latent)]
            groups = self.groups
            label_id = [lab for g, lab in self.concepts if g == group].index(label)
            is_on = self.tracked_labels[:, groups.index(group)] == label_id
            report["auroc"] = auroc(values[is_on], values[~is_on])
        return report


@torch.no_grad()
def concept_activations(sae: TopKSAE, data, *, num_buckets: int = DEFAULT_BUCKETS, where=None,
                        batch_records: int = 64, track_latents=None, max_tracked: int = 100_000,
                        ctx: DistContext | None = None, progress: bool = True) -> ConceptActivations:
    """One pass over the (``where``-filtered) records of ``data``; ranks split every batch and sum results.

    ``track_latents``: also keep those latents' per-record values (for AUROC) for at most ``max_tracked``
    records per rank, thinned by halving (every 2^j-th record) so memory stays bounded.
    """
    ds = as_dataset(data)
    ctx = ctx or DistContext(device=sae.device)
    concepts = [(g, label) for g in ds.label_groups for label in ds.label_vocab[g]]
    offsets, start = {}, 0
    for g in ds.label_groups:
        offsets[g], start = start, start + len(ds.label_vocab[g])
    C, T, n = len(concepts), num_buckets, sae.cfg.num_latents
    sums = torch.zeros(C * T, n, device=sae.device)
    records = torch.zeros(C * T, device=sae.device)
    all_sums = torch.zeros(T, n, device=sae.device)
    all_records = torch.zeros(T, device=sae.device)
    tracked = torch.as_tensor(track_latents, dtype=torch.int64) if track_latents is not None else None
    kept_values, kept_labels, stride, seen = [], [], 1, 0
    stream = ds.iter_records(batch_records, shuffle=False, where=where)
    for batch in tqdm(stream, desc="statistics", unit="batch", disable=not progress or not ctx.is_main):
        batch: RecordBatch = batch.select(slice(ctx.rank, None, ctx.world_size))
        if not len(batch):
            continue
        zbar = spatial_mean_codes(sae, batch.acts.float())
        if tracked is not None:
            keep = (torch.arange(seen, seen + len(batch)) % stride) == 0
            seen += len(batch)
            kept_values.append(zbar[:, tracked.to(sae.device)][keep.to(sae.device)].cpu())
            kept_labels.append(batch.labels[keep])
            if sum(len(v) for v in kept_values) > max_tracked:
                kept_values, kept_labels = [torch.cat(kept_values)[::2]], [torch.cat(kept_labels)[::2]]
                stride *= 2
        bucket = bucket_index(batch.t, T).to(sae.device)
        all_sums.index_add_(0, bucket, zbar)
        all_records.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float32))
        for g_pos, g in enumerate(ds.label_groups):
            labels = batch.labels[:, g_pos].to(sae.device).long()
            has = labels >= 0
            rows = (offsets[g] + labels[has]) * T + bucket[has]
            sums.index_add_(0, rows, zbar[has])
            records.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
    for t in (sums, records, all_sums, all_records):
        ctx.all_reduce(t)
    result = ConceptActivations(concepts, sums.view(C, T, n).cpu(), records.view(C, T).cpu(), all_sums.cpu(),
                                all_records.cpu())
    if tracked is not None:
        parts = ctx.gather_objects((torch.cat(kept_values) if kept_values else torch.zeros(0, len(tracked)),
                                    torch.cat(kept_labels) if kept_labels else torch.zeros(0, len(ds.label_groups))))
        result.tracked_latents = tracked
        result.tracked_values = torch.cat([v for v, _ in parts])
        result.tracked_labels = torch.cat([lab for _, lab in parts])
    return result


def compute_statistics(sae_file: SAEFile | str | Path, data, *, mode: str | None = None,
                       num_buckets: int = DEFAULT_BUCKETS, percentile: float = DEFAULT_PERCENTILE,
                       default_strength: float = -1.0, where=None, out: str | Path | None = None,
                       ctx: DistContext | None = None, device: str | None = None,
                       progress: bool = True) -> SAEFile:
    """A ready-to-use SAE file: the SAE of ``sae_file`` plus μ_c / θ tables from the records of ``data``.

    mode "saemnesia" (default when the file's concepts have assigned latents): S_c = {i_c} in every bucket,
    for the file's concepts. mode "saeuron": every labelled concept of the dataset, S_c(t) = latents whose
    score exceeds the ``percentile`` quantile. θ is the unweighted mean of μ over the file's concepts.
    """
    sf = sae_file if isinstance(sae_file, SAEFile) else load_sae_file(sae_file)
    if mode is None:
        mode = "saemnesia" if sf.concepts and all(c.latent is not None for c in sf.concepts) else "saeuron"
    sae = sf.build_sae(device=device or (ctx.device if ctx else None), dtype=torch.float32)
    acts = concept_activations(sae, data, num_buckets=num_buckets, where=where, ctx=ctx, progress=progress)
    means = acts.means()
    if mode == "saemnesia":
        if not sf.concepts:
            raise ValueError("mode saemnesia needs a file whose concepts have assigned latents "
                             "(train it with --supervised, or use mode saeuron)")
        missing = [c.label for c in sf.concepts if (c.group, c.label) not in acts.concepts]
        if missing:
            raise ValueError(f"the dataset has no records labelled {missing}")
        concepts = sf.concepts
        order = [acts.index(c.group, c.label) for c in concepts]
        tables = build_tables(assigned_selection([c.latent for c in concepts], num_buckets), means[order])
    elif mode == "saeuron":
        labels = [label for _, label in acts.concepts]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ValueError(f"labels {duplicated} appear in several groups; concept labels must be unique")
        concepts = [Concept(label, group, None, default_strength) for group, label in acts.concepts]
        tables = build_tables(select_saeuron(acts.scores(), percentile), means)
    else:
        raise ValueError(f"unknown mode {mode!r} (saemnesia | saeuron)")
    provenance = {**sf.provenance, "statistics": {
        "dataset": Path(getattr(data, "root", data)).name, "mode": mode, "num_buckets": num_buckets,
        **({"percentile": percentile} if mode == "saeuron" else {}),
        "records": int(acts.all_records.sum())}}
    result = dataclasses.replace(sf, concepts=list(concepts), tables=tables, num_buckets=num_buckets,
                                 provenance=provenance, selection_mode=mode)
    if out is not None and (ctx is None or ctx.is_main):
        save_sae_file(result, out)
    return result
