"""Teaching an SAE a concept from prompts (Find Concept Latents): SAeUron's selection, run on the codes the model
itself produces while it samples prompts that show the concept and prompts that do not (DESIGN §5.4).

While sampling, `ConceptEvidence` streams per timestep bucket the sums of each sample's spatially averaged code
and of its mean token (a few vectors of n and d floats per bucket, whatever the number of steps, tokens or prompts),
and keeps, per sample and step, only the largest entries of that average (for the separation score) and the sparse
codes of two preview samples (for the heatmaps). `FoundConcept.from_evidence` then scores every latent per bucket as SAeUron does (the
concept's share of activation against the negatives'), selects by percentile or the n best, and stores μ (the
concept's mean activation) and θ (the mean over the concept and its negatives, as §5.3 takes it over concepts) —
exactly what the statistics and the importers compute, and shift mode's direction (DESIGN §6.9): the mean token
of the concept's samples minus the negatives'. Buckets no step fell in take the nearest visited bucket's, so
any sampler and step count works with the result. `with_concept` adds it to an SAE file's concepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .concepts import Concept, ConceptTables, build_tables, saeuron_scores, select_saeuron

SELECTIONS = ("top_n", "percentile")
PREVIEW_SAMPLES = 2
"""The first positive and the first negative sample keep their sparse codes, for the preview's heatmaps."""
KEPT_PER_SAMPLE = 64
"""Per sample and step, the largest entries of its spatially averaged code kept for the separation score."""
SEPARABLE_AUROC = 0.8
"""Below this mean AUROC of the found latents between positive and negative samples, the result warns."""
MAX_LABEL = 80
CONNECTORS = r"(?:of|in|with|a|an|the|and)"


def without_concept(prompt: str, label: str) -> str:
    """The prompt with the concept's words taken out, and the words that only served them: "An image of Hearts in
    Neon style." without "Hearts" is "An image in Neon style.", without "Neon" "An image of Hearts."."""
    words = r"\s+".join(map(re.escape, label.replace("_", " ").split()))
    text = re.sub(rf"(?i)\s*\b(?:{CONNECTORS}\s+)?{words}(?:\s+style)?\b", "", prompt)
    text = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()
    return text


def check_label(label: str, known: list[str], replace_existing: bool) -> str:
    label = label.strip() if isinstance(label, str) else label
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL or any(
            not ch.isprintable() for ch in label):
        raise ValueError(f"the concept's label must be 1 to {MAX_LABEL} printable characters, got {label!r}")
    if re.fullmatch(r"#\d+", label):
        raise ValueError(f"{label!r} names a latent (#N), not a concept: choose a word")
    if label in known and not replace_existing:
        raise ValueError(f"this SAE already knows {label!r}: switch on replace_existing to teach it again")
    return label


def check_prompts(positives: list[str], negatives: list[str]) -> None:
    if not positives:
        raise ValueError("give at least one prompt that shows the concept")
    if not negatives:
        raise ValueError("give at least one prompt without the concept (or leave them empty to have the concept's "
                         "words taken out of the positive prompts)")
    same = sorted(set(positives) & set(negatives))
    if same:
        raise ValueError(f"prompts on both sides: {same[:3]}: a prompt cannot both show the concept and not")


class ConceptEvidence:
    """Per-bucket sums of the samples' spatially averaged codes and mean tokens, for the positive and the negative
    prompts."""

    def __init__(self, num_latents: int, num_buckets: int, device=None, d_in: int | None = None):
        self.n, self.T = num_latents, num_buckets
        self.sums = torch.zeros(2, num_buckets, num_latents, dtype=torch.float64, device=device)
        self.token_sums = None if d_in is None else torch.zeros(2, num_buckets, d_in, dtype=torch.float64,
                                                                device=device)
        self.counts = torch.zeros(2, num_buckets, dtype=torch.float64)
        self.kept: dict[tuple[bool, int], list[tuple[int, Tensor, Tensor]]] = {}
        """(positive, sample) -> [(bucket, top values, top latents)] per recorded step, on the CPU."""
        self.previews: dict[bool, list[tuple[int, Tensor, Tensor, tuple[int, int]]]] = {True: [], False: []}
        """positive -> [(bucket, code values [N, k], code latents [N, k], grid)] of its first sample, per step."""

    def add(self, values: Tensor, indices: Tensor, grid: tuple[int, int], buckets: list[int], positive: bool,
            samples: list[int], mean_tokens: Tensor | None = None) -> None:
        """One step's top-k codes [b, N, k] of b samples (their buckets and ids), of the positive or negative side, and
        the samples' mean tokens [b, d] of what the SAE reads (kept when the evidence was made with `d_in`)."""
        b, N, _ = values.shape
        mean = torch.zeros(b, self.n, dtype=torch.float32, device=values.device)
        mean.scatter_add_(1, indices.reshape(b, -1), values.float().reshape(b, -1)).div_(N)   # spatial average
        side = 0 if positive else 1
        mean = mean.to(self.sums.device)  # the evidence may live elsewhere than the model (the CPU by default)
        if self.token_sums is not None:
            mean_tokens = mean_tokens.to(self.token_sums.device)
        for j, (bucket, sample) in enumerate(zip(buckets, samples)):
            self.sums[side, bucket] += mean[j].double()
            if self.token_sums is not None:
                self.token_sums[side, bucket] += mean_tokens[j].double()
            self.counts[side, bucket] += 1
            top = mean[j].topk(min(KEPT_PER_SAMPLE, self.n))
            self.kept.setdefault((positive, sample), []).append((bucket, top.values.cpu(), top.indices.cpu()))
            if sample == 0:
                self.previews[positive].append((bucket, values[j].cpu().half(), indices[j].cpu(), grid))

    @property
    def visited(self) -> Tensor:
        """bool [T]: buckets where both sides were recorded."""
        return (self.counts > 0).all(0)


@dataclass
class FoundConcept:
    """A concept found in an SAE's latents: its selection and statistics per bucket, and how well they separate."""

    label: str
    tables: ConceptTables
    """[1, T, L]"""
    auroc: list[float | None]
    """Per bucket, the AUROC of the found latents' summed activation between positive and negative samples (None
    where no step fell)."""
    # tables.directions: [1, T, d] the mean token of the concept's samples minus the negatives' (shift mode), when
    # the evidence kept mean tokens

    @property
    def separation(self) -> float:
        visited = [a for a in self.auroc if a is not None]
        return sum(visited) / len(visited) if visited else float("nan")

    @property
    def warning(self) -> str | None:
        if not self.separation >= SEPARABLE_AUROC:
            return (f"the found latents separate the concept from its negatives poorly at this block (mean AUROC "
                    f"{self.separation:.2f} < {SEPARABLE_AUROC}): erasing them may not erase it; try more or more "
                    "varied prompts, or an SAE of another block")
        return None

    @classmethod
    def from_evidence(cls, label: str, evidence: ConceptEvidence, selection: str = "top_n", top_n: int = 2,
                      percentile: float = 99.99) -> FoundConcept:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        visited = evidence.visited
        if not bool(visited.any()):
            raise ValueError("no sampling step was recorded for both the positive and the negative prompts")
        sums, counts = evidence.sums.cpu(), evidence.counts
        nearest = _nearest_visited(visited)                                   # [T]: a visited bucket for each
        sums, counts = sums[:, nearest], counts[:, nearest]                   # [2, T, n], [2, T]
        # SAeUron's score of the concept (side 0) against its negatives (side 1), per bucket
        scores = _score(sums, counts)                                          # [T, n]
        if selection == "top_n":
            if not 1 <= top_n <= evidence.n:
                raise ValueError(f"top_n must be from 1 to {evidence.n}, got {top_n}")
            chosen = scores.topk(top_n, dim=-1).indices.sort(-1).values[None]  # [1, T, n_top]
        else:
            if not 0 < percentile < 100:
                raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
            chosen = select_saeuron(scores[None], percentile)
        means = (sums / counts[..., None]).float()                            # [2, T, n] mean activations
        tables = build_tables(chosen, means)
        direction = None
        if evidence.token_sums is not None:                                    # [1, T, d]
            tokens = evidence.token_sums.cpu()[:, nearest] / counts[..., None]
            direction = (tokens[0] - tokens[1]).float()[None]
        return cls(label, ConceptTables(tables.latents[:1], tables.mean_acts[:1], tables.thresholds[:1], direction),
                   _aurocs(evidence, chosen[0], visited))

    def concept(self, group: str) -> Concept:
        return Concept(self.label, group, None)


def _score(sums: Tensor, counts: Tensor) -> Tensor:
    """[2, T, n] sums and [2, T] counts (concept, negatives) -> SAeUron's score of the concept [T, n]."""
    per_bucket = [saeuron_scores(sums[:, t].float()[:, None], counts[:, t]) for t in range(sums.shape[1])]
    return torch.stack([s[0, 0] for s in per_bucket])


def _nearest_visited(visited: Tensor) -> Tensor:
    """For each bucket, the nearest visited bucket (ties to the lower)."""
    positions = torch.nonzero(visited).flatten()
    buckets = torch.arange(len(visited))
    return positions[(buckets[:, None] - positions[None]).abs().argmin(1)]


def _aurocs(evidence: ConceptEvidence, chosen: Tensor, visited: Tensor) -> list[float | None]:
    """Per bucket, the AUROC between positive and negative samples of Σ over the bucket's chosen latents of each
    sample's spatially averaged code (entries a sample did not keep count as 0)."""
    scores = {True: {}, False: {}}  # side -> bucket -> [score per sample-step]
    for (positive, _), steps in evidence.kept.items():
        for bucket, values, latents in steps:
            picked = torch.isin(latents, chosen[bucket][chosen[bucket] >= 0])
            scores[positive].setdefault(bucket, []).append(float(values[picked].sum()))
    out = []
    for bucket in range(evidence.T):
        pos, neg = scores[True].get(bucket), scores[False].get(bucket)
        out.append(_auroc(pos, neg) if bool(visited[bucket]) and pos and neg else None)
    return out


def _auroc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half."""
    p, q = torch.tensor(pos)[:, None], torch.tensor(neg)[None]
    return float(((p > q).float() + 0.5 * (p == q).float()).mean())


def with_concept(concepts: list[Concept], tables: ConceptTables | None, num_buckets: int, found: FoundConcept,
                 group: str) -> tuple[list[Concept], ConceptTables]:
    """The concepts and tables with `found` added (replacing a concept of the same label in place). They keep shift
    mode's directions when the found concept has one and every other concept too (DESIGN §7)."""
    old = tables if tables is not None else ConceptTables.empty(num_buckets)
    if old.num_buckets != found.tables.num_buckets:
        raise ValueError(f"the found concept has {found.tables.num_buckets} buckets, the SAE's concepts "
                         f"{old.num_buckets}")
    L = max(old.latents.shape[2], found.tables.latents.shape[2])

    def padded(t: Tensor, pad) -> Tensor:
        return torch.nn.functional.pad(t.cpu(), (0, L - t.shape[2]), value=pad)

    labels = [c.label for c in concepts]
    new = found.concept(group)
    rows = [padded(getattr(found.tables, name), pad) for name, pad in
            (("latents", -1), ("mean_acts", 0.0), ("thresholds", 0.0))]
    olds = [padded(getattr(old, name), pad) for name, pad in (("latents", -1), ("mean_acts", 0.0), ("thresholds", 0.0))]
    if found.tables.directions is not None and (old.directions is not None or not concepts):
        rows.append(found.tables.directions.cpu())
        olds.append(old.directions.cpu().clone() if concepts else found.tables.directions[:0].cpu())
    if found.label in labels:
        i = labels.index(found.label)
        for o, r in zip(olds, rows):
            o[i] = r[0]
        return [new if c.label == found.label else c for c in concepts], ConceptTables(*olds)
    return [*concepts, new], ConceptTables(*(torch.cat([o, r]) for o, r in zip(olds, rows)))


def teach(sae_file, found: FoundConcept, group: str, provenance: dict):
    """An SAE file (SAEFile or its weightless copy) with the found concept added, its selection mode score-based
    (a found concept has no assigned latent), and how it was found in the provenance."""
    concepts, tables = with_concept(sae_file.concepts, sae_file.tables, sae_file.num_buckets, found, group)
    taught = {**sae_file.provenance.get("taught", {}), found.label: provenance}
    return replace(sae_file, concepts=concepts, tables=tables, selection_mode="saeuron",
                   provenance={**sae_file.provenance, "taught": taught})


def buckets_for(num_buckets: int, has_concepts: bool, default: int = 50) -> int:
    """How many buckets a taught concept gets: the SAE's own when it has concepts (they share the tables), else the
    default (an imported SAE without concepts has one bucket, which would make the statistics ignore time)."""
    return num_buckets if has_concepts else default
