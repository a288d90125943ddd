# SPDX-License-Identifier: GPL-3.0-or-later
"""Supervised fine-tuning (DESIGN §4.3, SAEmnesia): tie every concept label to one dedicated latent.

1. Assignment: SAeUron scores of the unsupervised SAE, averaged over the buckets a concept has records in;
   greedy and exclusive (best (concept, latent) pair first, a latent serves one concept, object concepts
   first by a +1 boost as in the authors' code).
2. Loss = L_rec + β·L_CA + η·L_DC + λ·L_L1 (+ ζ·L_X) on batches of whole records:
   - L_rec: MSE of the per-token TopK reconstruction (the authors' choice; "fvu" optional);
   - L_CA: BCE with logits v[r, a] = spatial mean of the *pre-ReLU* encoder output at assigned latent a,
     target 1 for the record's own concepts and 0 for every other assigned latent. The logits come from
     a separate [#assigned, d] matmul on the record's mean token (the mean commutes with the linear map).
     ``ca_post_relu`` reproduces the authors' code (mean of post-ReLU values, which cannot go below 0);
   - L_DC: mean squared Pearson correlation across the batch between assigned latents of different groups;
   - L_L1: mean pre-activation (non-negative after the ReLU), clamped at 100 as the authors do. It needs the
     dense encoder gradient; with λ = 0 the encoder backward stays sparse.
   - L_X (ours, off by default; DESIGN §4.4): so that the assigned latent *carries* its concept, not only detects
     it, the other latents' record logits are pushed out of correlation with the labels: per assigned concept,
     Σ over the non-assigned latents of max(0, |Pearson r| − margin)², averaged over concepts (correlations
     within the margin are batch noise and cost nothing).
3. Validation split by sample id, early stopping on the validation loss (best weights kept), then the
   concept statistics are rebuilt with the fine-tuned SAE on the validation records.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia_core.concepts import Concept, assigned_selection, build_tables
from saemnesia_core.sae import TopKSAE, standardize
from saemnesia_core.sae_file import SAEFile, load_sae_file, save_sae_file
from saemnesia_tools.training.centralisation import centralisation
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import RecordBatch, as_dataset, validation_mask
from saemnesia_tools.training.sparse_ops import decode_rows, encoder_values, per_token_topk
from saemnesia_tools.training.statistics import DEFAULT_BUCKETS, ConceptActivations, concept_activations
from saemnesia_tools.training.trainer import (
    CHECKPOINT_NAME, load_checkpoint, make_adam, save_checkpoint_atomic, total_variance,
)

L1_CLAMP = 100.0
LOSS_NAMES = ("loss", "rec", "ca", "dc", "l1", "x")


@dataclass
class SupervisedConfig:
    """Defaults: the authors' run (β 3, η 0.1, λ 0.01, Adam 5e-6, 128 records, ≤150 epochs, patience 5)."""

    beta: float = 3.0
    eta: float = 0.1
    l1: float = 0.01
    lr: float = 5e-6
    batch_records: int = 128
    max_epochs: int = 150
    patience: int = 5
    val_fraction: float = 0.2
    grad_clip: float | None = 1.0
    rec_loss: str = "mse"                 # or "fvu"
    ca_post_relu: bool = False            # the authors' variant of the L_CA logits
    priority_groups: tuple[str, ...] = ("object",)
    num_buckets: int = DEFAULT_BUCKETS
    default_strength: float = -1.0
    exclusivity: float = 0.0              # ζ of L_X (0: the authors' loss)
    exclusivity_margin: float = 0.3       # |r| up to this costs nothing (the noise of r over 128 records is ~0.09)
    seed: int = 0
    shuffle_buffer_records: int = 4096


@dataclass
class SupervisedResult:
    sae: TopKSAE
    concepts: list[Concept]                                      # label, group and assigned latent
    history: list[dict] = field(default_factory=list)            # one entry per epoch
    selectivity_before: list[dict] = field(default_factory=list)  # the unsupervised SAE, validation records
    selectivity_after: list[dict] = field(default_factory=list)
    centralisation_before: list[dict] = field(default_factory=list)  # DESIGN §4.4, validation records
    centralisation_after: list[dict] = field(default_factory=list)
    sae_file: SAEFile | None = None


def assign_latents(scores: Tensor, groups: list[str], priority_groups=("object",), boost: float = 1.0) -> list[int]:
    """Greedy exclusive assignment: scores [C, n] -> one distinct latent per concept, best pair first."""
    C, n = scores.shape
    if C > n:
        raise ValueError(f"{C} concepts but only {n} latents")
    first = torch.tensor([g in priority_groups for g in groups], dtype=torch.float64)
    ranked = scores.double() + boost * first[:, None]
    assigned, used = [-1] * C, set()
    for flat in ranked.flatten().argsort(descending=True).tolist():
        c, i = divmod(flat, n)
        if assigned[c] < 0 and i not in used:
            assigned[c] = i
            used.add(i)
            if len(used) == C:
                break
    return assigned


def timestep_averaged_scores(acts: ConceptActivations) -> Tensor:
    """[C, n]: each concept's SAeUron score averaged over the buckets it has records in."""
    weight = (acts.records > 0).double()
    return (acts.scores().double() * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


def cross_group_decorrelation(v: Tensor, latent_groups: list[str]) -> Tensor:
    """Mean squared Pearson correlation over the batch [R, A] between columns of different groups."""
    centred = v - v.mean(0)
    std = centred.pow(2).mean(0).sqrt()
    corr = (centred.T @ centred / v.shape[0]) / (std[:, None] * std[None, :] + 1e-8)
    ids = {g: i for i, g in enumerate(dict.fromkeys(latent_groups))}
    gid = torch.tensor([ids[g] for g in latent_groups], device=v.device)
    pairs = torch.triu(gid[:, None] != gid[None, :], diagonal=1)
    return corr[pairs].pow(2).mean() if bool(pairs.any()) else v.new_zeros(())


def other_latent_label_correlation(v: Tensor, targets: Tensor, assigned: Tensor, margin: float) -> Tensor:
    """L_X: v [R, n] every latent's record logit, targets [R, A] the assigned concepts' 0/1 labels; the mean over
    concepts of Σ over non-assigned latents of max(0, |r| − margin)², r = Pearson correlation over the R records."""
    v_c, y_c = v - v.mean(0), targets - targets.mean(0)
    scale = v_c.pow(2).mean(0).sqrt()[None, :] * y_c.pow(2).mean(0).sqrt()[:, None]
    r = (y_c.T @ v_c / v.shape[0]) / (scale + 1e-8)                        # [A, n]
    others = torch.ones(v.shape[1], device=v.device)
    others[assigned] = 0
    return ((r.abs() - margin).clamp(min=0).pow(2) * others).sum(1).mean()


class SupervisedStep:
    """One optimizer step of L_rec + β·L_CA + η·L_DC + λ·L_L1 on this rank's share of a batch of records."""

    def __init__(self, sae: TopKSAE, cfg: SupervisedConfig, concepts: list[Concept], label_groups: list[str],
                 label_vocab: dict[str, list[str]], ctx: DistContext):
        self.sae, self.cfg, self.ctx = sae, cfg, ctx
        dev = sae.device
        self.latents = torch.tensor([c.latent for c in concepts], device=dev)                      # [A]
        self.group_pos = torch.tensor([label_groups.index(c.group) for c in concepts], device=dev)  # [A]
        self.label_ids = torch.tensor([label_vocab[c.group].index(c.label) for c in concepts], device=dev)
        self.latent_groups = [c.group for c in concepts]

    def losses(self, local: RecordBatch, global_records: int, variance: Tensor | None = None) -> dict[str, Tensor]:
        """The losses of this rank's records ``local``, each as its share of the global-batch value
        (``variance``: the global batch's total variance, for rec_loss "fvu")."""
        sae, cfg = self.sae, self.cfg
        R, HW, d = local.acts.shape
        x = local.acts.to(sae.device, torch.float32).reshape(R * HW, d)
        if sae.cfg.input_unit_norm:
            x = standardize(x).x
        W_enc, b_enc = sae.encoder.weight, sae.encoder.bias
        global_tokens = global_records * HW
        if cfg.l1 > 0:  # L1 over every pre-activation: dense encoder gradient
            pre = sae.pre_acts(x)
            sel = per_token_topk(pre.detach(), sae.cfg.k)
            values = pre[sel.rows, sel.cols]
            l1 = pre.clamp(max=L1_CLAMP).sum() / (global_tokens * sae.cfg.num_latents)
        else:
            with torch.no_grad():
                pre = sae.pre_acts(x)
            sel = per_token_topk(pre, sae.cfg.k)
            values = encoder_values(x, W_enc, b_enc, sae.b_dec, pre, sel)
            l1 = x.new_zeros(())
        recon = decode_rows(values, sel, sae.W_dec, R * HW) + sae.b_dec
        squared_error = (recon - x).pow(2).sum()
        if cfg.rec_loss == "fvu":
            rec = squared_error / variance
        else:
            rec = squared_error / (global_tokens * d)

        W_a, b_a = W_enc[self.latents], b_enc[self.latents]                  # [A, d], [A]
        centred = x.view(R, HW, d) - sae.b_dec
        if cfg.ca_post_relu:
            logits = F.relu(centred @ W_a.T + b_a).mean(1)                   # [R, A]
        else:
            logits = centred.mean(1) @ W_a.T + b_a                           # [R, A]
        labels = local.labels.to(sae.device).long()
        targets = (labels[:, self.group_pos] == self.label_ids).float()
        ca = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / (global_records * targets.shape[1])
        all_logits = self.ctx.gather_with_grad(logits)
        dc = cross_group_decorrelation(all_logits, self.latent_groups) / self.ctx.world_size
        if cfg.exclusivity > 0:  # every latent's record logit: one [R, d] x [d, n] product
            every = centred.mean(1) @ W_enc.T + b_enc
            x_loss = other_latent_label_correlation(self.ctx.gather_with_grad(every), self.ctx.gather_with_grad(targets),
                                                    self.latents, cfg.exclusivity_margin) / self.ctx.world_size
        else:
            x_loss = x.new_zeros(())
        total = rec + cfg.beta * ca + cfg.eta * dc + cfg.l1 * l1 + cfg.exclusivity * x_loss
        return {"loss": total, "rec": rec, "ca": ca, "dc": dc, "l1": l1, "x": x_loss}

    def variance(self, batch: RecordBatch) -> Tensor | None:
        """Total variance of the batch's tokens (only needed for rec_loss "fvu")."""
        if self.cfg.rec_loss != "fvu":
            return None
        x = batch.acts.to(self.sae.device, torch.float32).reshape(-1, batch.acts.shape[-1])
        x = standardize(x).x if self.sae.cfg.input_unit_norm else x
        return total_variance(x).float()

    def __call__(self, batch: RecordBatch, optimizer: torch.optim.Optimizer) -> Tensor:
        """Step on a global batch (each rank takes its slice); returns the loss values (LOSS_NAMES), float64."""
        sae, ctx = self.sae, self.ctx
        local = batch.select(ctx.local_slice(len(batch))) if ctx.active else batch
        losses = self.losses(local, len(batch), self.variance(batch))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        ctx.sum_gradients(list(sae.parameters()))
        sae.remove_gradient_parallel_to_decoder_directions()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        return ctx.all_reduce(torch.stack([v.detach().double().cpu() for v in losses.values()]))


def finetune_supervised(sae_file: SAEFile | str | Path, data, cfg: SupervisedConfig | None = None, *,
                        out: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                        model_family: str | None = None, ctx: DistContext | None = None, device: str | None = None,
                        progress: bool = True) -> SupervisedResult:
    """Fine-tune an unsupervised SAE (file or path) on labelled records into an SAEmnesia SAE.

    Writes ``out`` (when given): a ready SAE file with the assignment and μ_c / θ from the validation records.
    ``checkpoint_dir``: a checkpoint after every epoch; a rerun resumes after the last finished epoch.
    """
    cfg = cfg or SupervisedConfig()
    ds = as_dataset(data)
    sf = sae_file if isinstance(sae_file, SAEFile) else load_sae_file(sae_file)
    if sf.config.d_in != ds.d:
        raise ValueError(f"the SAE reads d = {sf.config.d_in}, the dataset has d = {ds.d}")
    ctx = ctx or DistContext(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if ctx.active:
        ctx.local_slice(cfg.batch_records)
    sae = sf.build_sae(device=ctx.device, dtype=torch.float32)

    def held_out(b: RecordBatch) -> Tensor:
        return validation_mask(b.sample, cfg.val_fraction, cfg.seed)

    def training_rows(b: RecordBatch) -> Tensor:
        return ~held_out(b)

    eval_where = held_out if cfg.val_fraction > 0 else None
    stats_kw = dict(num_buckets=cfg.num_buckets, ctx=ctx, progress=progress)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    state = load_checkpoint(ckpt_path) if ckpt_path is not None and ckpt_path.exists() else None
    if state is not None and (state.get("stage") != "supervised" or state["config"] != asdict(cfg)):
        raise ValueError(f"{ckpt_path}: checkpoint of another run (stage or config differ)")

    if state is None:
        train_acts = concept_activations(sae, ds, where=training_rows, **stats_kw)
        if train_acts.missing():
            raise ValueError(f"the training split has no records of {train_acts.missing()}: collect more prompts "
                             "or lower the validation fraction")
        groups = [g for g, _ in train_acts.concepts]
        latents = assign_latents(timestep_averaged_scores(train_acts), groups, cfg.priority_groups)
        concepts = [Concept(label, group, latent, cfg.default_strength)
                    for (group, label), latent in zip(train_acts.concepts, latents)]
        before_acts = concept_activations(sae, ds, where=eval_where, track_latents=latents, **stats_kw)
        if eval_where is not None and before_acts.missing():  # too few held-out samples: report on all records
            eval_where = None
            before_acts = concept_activations(sae, ds, track_latents=latents, **stats_kw)
        before = [before_acts.selectivity(c.group, c.label, c.latent) for c in concepts]
        central_before = centralisation(sae, concepts, ds, where=eval_where)
    else:
        concepts = [Concept(**c) for c in state["concepts"]]
        before, eval_where = state["selectivity_before"], held_out if state["report_on_validation"] else None
        central_before = state["centralisation_before"]

    step = SupervisedStep(sae, cfg, concepts, ds.label_groups, ds.label_vocab, ctx)
    optimizer = make_adam(sae.parameters(), cfg.lr)
    history: list[dict] = []
    best_val, best_state, bad_epochs, start_epoch = float("inf"), copy.deepcopy(sae.state_dict()), 0, 0
    if state is not None:
        sae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_val, best_state = state["history"], state["best_val"], state["best_model"]
        bad_epochs, start_epoch = state["bad_epochs"], state["epoch"] + 1

    @torch.no_grad()
    def validation_loss() -> float:
        """Mean loss per record over the validation split (every rank computes it whole)."""
        single = SupervisedStep(sae, cfg, concepts, ds.label_groups, ds.label_vocab, DistContext(device=ctx.device))
        total, count = 0.0, 0
        for batch in ds.iter_records(cfg.batch_records, shuffle=False, where=held_out):
            total += float(single.losses(batch, len(batch), single.variance(batch))["loss"]) * len(batch)
            count += len(batch)
        return total / max(count, 1)

    started = time.perf_counter()
    epochs = range(start_epoch, cfg.max_epochs) if bad_epochs < cfg.patience else range(0)
    bar = tqdm(epochs, desc="finetune", unit="epoch", disable=not progress or not ctx.is_main)
    for epoch in bar:
        sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        batches = 0
        for batch in ds.iter_records(cfg.batch_records, seed=cfg.seed, epoch=epoch, where=training_rows,
                                     buffer_records=cfg.shuffle_buffer_records, drop_last=True):
            sums += step(batch, optimizer)
            batches += 1
        means = (sums / max(batches, 1)).tolist()
        entry = {"epoch": epoch, **dict(zip(LOSS_NAMES, means))}
        if cfg.val_fraction > 0:
            entry["val_loss"] = validation_loss()
            if entry["val_loss"] < best_val:
                best_val, best_state, bad_epochs = entry["val_loss"], copy.deepcopy(sae.state_dict()), 0
            else:
                bad_epochs += 1
        else:
            best_state = copy.deepcopy(sae.state_dict())
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", val=f"{entry.get('val_loss', float('nan')):.4f}")
        if ckpt_path is not None and ctx.is_main:
            save_checkpoint_atomic(ckpt_path, {
                "format": "saemnesia-train-checkpoint", "stage": "supervised", "config": asdict(cfg),
                "concepts": [asdict(c) for c in concepts], "selectivity_before": before,
                "centralisation_before": central_before,
                "report_on_validation": eval_where is not None, "model": sae.state_dict(),
                "optimizer": optimizer.state_dict(), "best_model": best_state, "best_val": best_val,
                "bad_epochs": bad_epochs, "epoch": epoch, "history": history})
        ctx.barrier()
        if bad_epochs >= cfg.patience:
            break
    bar.close()
    sae.load_state_dict(best_state)

    after_acts = concept_activations(sae, ds, where=eval_where, track_latents=[c.latent for c in concepts],
                                     **stats_kw)
    after = [after_acts.selectivity(c.group, c.label, c.latent) for c in concepts]
    central_after = centralisation(sae, concepts, ds, where=eval_where)
    order = [after_acts.index(c.group, c.label) for c in concepts]
    selection = assigned_selection([c.latent for c in concepts], cfg.num_buckets)
    tables = build_tables(selection, after_acts.means()[order])
    provenance = {
        "trainer": "saemnesia supervised", "unsupervised": sf.provenance, "dataset": ds.root.name,
        "model_id": ds.index["model_id"], "config": asdict(cfg), "epochs": len(history),
        "best_val_loss": best_val if cfg.val_fraction > 0 else None, "history": history,
        "selectivity_before": before, "selectivity_after": after,
        "centralisation_before": central_before, "centralisation_after": central_after,
        "statistics": {"records": "validation split" if eval_where else "all records", "num_buckets": cfg.num_buckets},
        "seconds": round(time.perf_counter() - started, 1)}
    result_file = dataclasses.replace(sf, weights={k: v.detach().cpu() for k, v in sae.state_dict().items()},
                                      concepts=concepts, tables=tables, model_family=model_family or sf.model_family,
                                      num_buckets=cfg.num_buckets, supervised=True, provenance=provenance,
                                      selection_mode="saemnesia")
    if out is not None and ctx.is_main:
        save_sae_file(result_file, out)
    return SupervisedResult(sae, concepts, history, before, after, central_before, central_after, result_file)
