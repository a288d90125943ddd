# SPDX-License-Identifier: GPL-3.0-or-later
"""Shift mode's directions (DESIGN §6.9): per concept and timestep bucket, the mean token of the records showing the
concept minus the mean token of the records of its group's absence, in what the SAE reads.

A record shows no concept of a group when it has no label in that group: for styles, the unstyled prompts of
SAeUron's grid; for objects, prompts that name no object ("An image in Neon style."), which the grid lacks and which
are collected on their own (any dataset without the group counts as its absence). Only cond-branch records count:
the edit moves the cond branch, where the prompt says what the image shows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia_core.concepts import Concept
from saemnesia_core.timesteps import bucket_index
from saemnesia_tools.training.shards import BRANCHES, as_dataset

COND = BRANCHES.index("cond")


@torch.no_grad()
def concept_directions(datasets, concepts: list[Concept], num_buckets: int, *, batch_records: int = 256,
                       progress: bool = True) -> Tensor:
    """[C, T, d] float32 Δ_c(t) for `concepts` in their order, from the cond records of `datasets` (one or several
    activation datasets of one block, e.g. the labelled grid and the prompts without objects); a bucket without
    records takes the nearest that has some. Fails, naming them, when a concept or its group's absence has no
    record at all."""
    datasets = [as_dataset(d) for d in (datasets if isinstance(datasets, (list, tuple)) else [datasets])]
    groups = sorted({c.group for c in concepts})
    slots = {g: {c.label: i for i, c in enumerate(x for x in concepts if x.group == g)} for g in groups}
    sums = {g: None for g in groups}  # [labels + 1, T, d] float64; the last slot: the group's absence
    counts = {g: torch.zeros(len(slots[g]) + 1, num_buckets, dtype=torch.float64) for g in groups}
    for ds in datasets:
        for batch in tqdm(ds.iter_records(batch_records, shuffle=False), desc="concept directions",
                          disable=not progress):
            batch = batch.select(batch.branch == COND)
            if not len(batch):
                continue
            means, buckets = batch.acts.double().mean(1), bucket_index(batch.t, num_buckets)
            for g in groups:
                if sums[g] is None:
                    sums[g] = torch.zeros(len(slots[g]) + 1, num_buckets, means.shape[1], dtype=torch.float64)
                absent = len(slots[g])
                if g in ds.label_groups:
                    vocab = ds.label_vocab[g]
                    ids = batch.labels[:, ds.label_groups.index(g)].tolist()
                    slot = torch.tensor([absent if i < 0 else slots[g].get(vocab[i], -1) for i in ids])
                else:
                    slot = torch.full((len(batch),), absent)
                keep = slot >= 0  # records of labels these concepts do not name count for neither side
                sums[g].index_put_((slot[keep], buckets[keep]), means[keep], accumulate=True)
                counts[g].index_put_((slot[keep], buckets[keep]), torch.ones(int(keep.sum()), dtype=torch.float64),
                                     accumulate=True)
    directions = []
    for c in concepts:
        g, i = c.group, slots[c.group][c.label]
        missing = [who for who, row in ((c.label, i), (f"no {g}", -1)) if not bool((counts[g][row] > 0).any())]
        if missing:
            raise ValueError(f"no cond-branch records of {' and '.join(missing)}: collect prompts that show "
                             f"{c.label!r} and prompts without any {g}")
        directions.append((_filled(sums[g][i], counts[g][i]) - _filled(sums[g][-1], counts[g][-1])).float())
    return torch.stack(directions)


def _filled(sums: Tensor, counts: Tensor) -> Tensor:
    """[T, d] means; a bucket without records takes the nearest bucket that has some (as the concept statistics)."""
    have = (counts > 0).nonzero().squeeze(1)
    nearest = have[(torch.arange(len(counts))[:, None] - have[None, :]).abs().argmin(1)]
    return (sums / counts.clamp(min=1)[:, None])[nearest]
