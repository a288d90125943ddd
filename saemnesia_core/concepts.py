"""Concepts and their statistics (DESIGN §5): the SAeUron score, latent selection, and the μ_c / θ tables.

Shapes: C concepts, T timestep buckets, n latents, L selected latents per (concept, bucket) at most.
A selection is an int64 [C, T, L] tensor of latent ids, −1 = padding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

MAX_STRENGTH = 100.0
"""|γ| above this is refused everywhere (the Erase Concepts node's own range): a strength that overflows the
activations' dtype would turn an image into NaNs instead of an error."""
MAX_CALIBRATION = 100.0
"""κ_c above this is refused (it multiplies the token's own norm; the toy's calibrations lie from 0.25 to 16)."""
SCORE_EPS = 1e-8
"""δ in the score's denominators (SAeUron's `compute_feature_importance`)."""


class EditSetting(NamedTuple):
    """One erasure setting for every chosen concept: the eraser's mode, the guidance branches it edits, γ."""

    mode: str
    branches: str
    strength: float


DEFAULT_EDIT = EditSetting(mode="shift", branches="cond", strength=-2.0)
"""Erase Concepts' defaults: the candidate that removed most on the toy world, over objects and styles together
(benchmarks/studies/removal_edits.py, its `default`; DESIGN §6.10). The demo and the evaluation's default row use it."""


@dataclass
class Concept:
    label: str
    """What the user ticks, e.g. "Cats"; unique within a file."""
    group: str
    """Concept group, e.g. "object" or "style" (SAEmnesia decorrelates across groups)."""
    latent: int | None
    """SAEmnesia's assigned latent i_c; None when latents are found by score (SAeUron)."""
    default_strength: float = -1.0
    """γ used when the caller gives none (−1 is SAEmnesia's single knob)."""
    erasure: dict | None = None
    """How well this SAE erases the concept, as measured when the file was made (None: not measured): on `images`
    images showing it, erased at `strength`, the judges saw it in `seen_without` of them without erasure and no
    longer saw it in `gone`; `other_kept` counts those where the other group's concept survived (MEASURED_KEYS)."""
    calibration: float | None = None
    """κ_c (DESIGN §6.7): when set, a firing latent of this concept becomes γ·κ_c·‖x − b_dec‖ (the token's own norm
    in the SAE's input space) instead of z·γ·μ_c, so the strength does not grow with μ_c², and γ = −1 is the
    strength calibrated to erase this concept. None: the papers' formula (files without it keep their meaning)."""


MEASURED_KEYS = ("strength", "images", "seen_without", "gone", "other_kept")


class UnknownConceptError(KeyError, ValueError):
    """Concept labels the file does not have; the message lists the ones it has."""

    def __init__(self, unknown: Sequence[str], known: Sequence[str]):
        self.unknown, self.known = list(unknown), list(known)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        known = ", ".join(map(repr, self.known)) or "none"
        return f"unknown concept(s) {', '.join(map(repr, self.unknown))}; this SAE knows: {known}"


LATENT_GROUP = "latent"
"""The group of a latent referenced by its index ("#123") instead of a concept label."""


def latent_ref(label: str) -> int | None:
    """The latent index that "#123" names, or None for a concept label."""
    match = re.fullmatch(r"#(\d{1,9})", label)
    return int(match.group(1)) if match else None


def with_latent_refs(concepts: list[Concept], tables: ConceptTables, labels, num_latents: int,
                     latent_means: Tensor | None = None) -> tuple[list[Concept], ConceptTables]:
    """The concepts and tables with one more concept per latent reference among `labels` ("#123" = latent 123),
    so an SAE without concepts (or a latent no concept owns) can be probed and erased: the latent in every bucket,
    μ = its mean activation where the file has one (sdxl-unbox's unit of a latent's strength) else 1, θ = 0 (it fires
    wherever it is active). Labels that are concepts of the file stay theirs; a latent out of range is refused."""
    known = {c.label for c in concepts}
    refs = [label for label in dict.fromkeys(labels) if label not in known and latent_ref(label) is not None]
    if not refs:
        return concepts, tables
    bad = [label for label in refs if latent_ref(label) >= num_latents]
    if bad:
        raise ValueError(f"latent reference(s) {', '.join(bad)} out of range: this SAE has {num_latents} latents "
                         f"(#0 to #{num_latents - 1})")
    ids = [latent_ref(label) for label in refs]
    T, L = tables.num_buckets, max(1, tables.latents.shape[2])
    means = latent_means[ids].float() if latent_means is not None else torch.ones(len(ids))

    def rows(values: Tensor, pad) -> Tensor:  # [R] -> [R, T, L]: the value in slot 0 of every bucket, then padding
        out = torch.full((len(ids), T, L), pad, dtype=values.dtype)
        out[:, :, 0] = values[:, None]
        return out

    def grown(table: Tensor, pad) -> Tensor:  # the file's [C, T, L'] padded to L slots
        return torch.nn.functional.pad(table, (0, L - table.shape[2]), value=pad)

    extra = (rows(torch.tensor(ids), -1), rows(means, 0.0), rows(torch.zeros(len(ids)), 0.0))
    tables = ConceptTables(*(torch.cat([grown(old.cpu(), pad), new]) for old, new, pad in
                             zip((tables.latents, tables.mean_acts, tables.thresholds), extra, (-1, 0.0, 0.0))))
    return [*concepts, *(Concept(label, LATENT_GROUP, i) for label, i in zip(refs, ids))], tables


def check_known(labels, known: Sequence[str]) -> None:
    """Every label in `labels` must be one of `known`; UnknownConceptError lists the others and what is known."""
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise UnknownConceptError(unknown, list(dict.fromkeys(known)))


def concept_indices(concepts: Sequence[Concept], labels) -> list[int]:
    """The positions of `labels` among the concepts, in the order given (unknown labels: UnknownConceptError)."""
    index = {c.label: i for i, c in enumerate(concepts)}
    check_known(labels, list(index))
    return [index[label] for label in labels]


def with_calibrations(concepts: Sequence[Concept], kappas: dict[str, float | None]) -> list[Concept]:
    """The concepts with κ set (None: removed) for the labels in `kappas`; the others as they are. A concept whose κ
    changes loses its erasure record: it was measured with the old κ."""
    return [c if c.label not in kappas or kappas[c.label] == c.calibration
            else replace(c, calibration=kappas[c.label], erasure=None) for c in concepts]


@dataclass
class ConceptTables:
    latents: Tensor
    """[C, T, L] int64 selected latents S_c(t), −1 = padding."""
    mean_acts: Tensor
    """[C, T, L] float32 μ_c(i, t): the concept's mean activation of each selected latent."""
    thresholds: Tensor
    """[C, T, L] float32 θ(i, t): the unweighted mean over all concepts of μ(i, t, c')."""
    directions: Tensor | None = None
    """[C, T, d] float32 Δ_c(t): each concept's mean difference from its absence, in what the SAE reads (shift mode,
    DESIGN §6.9), or None. Tables rebuilt for other concepts keep them only when every concept has one."""

    @property
    def num_buckets(self) -> int:
        return self.latents.shape[1]

    @classmethod
    def empty(cls, num_buckets: int) -> ConceptTables:
        """No concepts: [0, T, 1] tables."""
        shape = (0, num_buckets, 1)
        return cls(torch.full(shape, -1), torch.zeros(shape), torch.zeros(shape))

    def to(self, device) -> ConceptTables:
        return ConceptTables(self.latents.to(device), self.mean_acts.to(device), self.thresholds.to(device),
                             None if self.directions is None else self.directions.to(device))


def saeuron_scores(concept_sums: Tensor, concept_counts: Tensor) -> Tensor:
    """[C, T, n] sums over each concept's prompts of the spatially averaged z, [C] prompt counts -> [C, T, n].

    score(i,t,c) = μ(i,t,c)/(Σ_j μ(j,t,c) + δ) − μ(i,t,¬c)/(Σ_j μ(j,t,¬c) + δ); ¬c pools the prompts of all
    other concepts. Accumulated in float64 (the pooled mean is a difference of sums), returned as float32.
    """
    counts = torch.as_tensor(concept_counts, dtype=torch.float64)
    total_sum = concept_sums.sum(0, dtype=torch.float64)
    total_count = counts.sum()
    scores = torch.empty(concept_sums.shape, dtype=torch.float32)
    for c in range(concept_sums.shape[0]):
        mu_c = concept_sums[c].double() / counts[c]
        mu_rest = (total_sum - concept_sums[c].double()) / (total_count - counts[c]).clamp(min=1)
        scores[c] = _proportions(mu_c) - _proportions(mu_rest)
    return scores


def _proportions(mu: Tensor) -> Tensor:
    """[T, n] mean activations -> each latent's share of the total at each t."""
    return mu / (mu.sum(-1, keepdim=True) + SCORE_EPS)


def select_saeuron(scores: Tensor, percentile: float | Sequence[float] | Tensor) -> Tensor:
    """[C, T, n] scores -> [C, T, L] selection S_c(t) = {i : score > quantile(score(·,t,c), p/100)}.

    Strictly greater than torch.quantile's linear interpolation, as the released code: p = 99.999 keeps about
    one latent of 20480. `percentile` is one p for all concepts or one per concept. Sets may differ per t.
    """
    num_concepts, _, n = scores.shape
    p = torch.as_tensor(percentile, dtype=torch.float64).expand(num_concepts)
    masks = [scores[c] > torch.quantile(scores[c].float(), float(p[c]) / 100, dim=-1, keepdim=True)
             for c in range(num_concepts)]
    width = max(1, max(int(m.sum(-1).max()) for m in masks))
    ids = torch.arange(n)
    selection = []
    for mask in masks:  # one concept at a time: [T, n] index tensors, not [C, T, n]
        # Selected ids come first (ascending); the others are pushed past n, then cut off or marked as padding.
        ranked = torch.where(mask, ids, ids + n).topk(width, dim=-1, largest=False, sorted=True).values
        selection.append(torch.where(ranked < n, ranked, -1))
    return torch.stack(selection)


def assigned_selection(latents: Sequence[int], num_buckets: int) -> Tensor:
    """SAEmnesia: S_c = {i_c} for every bucket -> [C, T, 1]."""
    return torch.as_tensor(list(latents), dtype=torch.int64).reshape(-1, 1, 1).expand(-1, num_buckets, 1).clone()


def build_tables(selection: Tensor, concept_means: Tensor) -> ConceptTables:
    """[C, T, L] selection and [C, T, n] μ(i, t, c) -> the stored statistics of the selected latents (DESIGN §5.3).

    θ(i, t) is the unweighted mean over concepts of μ(i, t, c'), not a pooled sample mean.
    """
    means = concept_means.float()
    valid = selection >= 0
    ids = selection.clamp(min=0)
    mean_acts = means.gather(-1, ids)
    thresholds = means.mean(0).expand_as(means).gather(-1, ids)
    zero = torch.zeros((), dtype=torch.float32)
    return ConceptTables(
        selection.long().clone(), torch.where(valid, mean_acts, zero), torch.where(valid, thresholds, zero)
    )
