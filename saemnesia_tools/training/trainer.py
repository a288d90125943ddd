# SPDX-License-Identifier: GPL-3.0-or-later
"""Unsupervised TopK SAE training (DESIGN §4.2, the SAeUron recipe).

Loss = FVU + α·AuxK over a batch of tokens. FVU = ‖x − x̂‖² / Σ‖x − mean(x)‖²; AuxK (Gao et al. 2024,
in its corrected form): the residual e = x − x̂ is detached, the k_aux largest pre-activations of the dead
latents decode ê *without* b_dec, loss ‖e − ê‖² / the same total variance, scaled by min(#dead / k_aux, 1).
Decoder rows are kept unit-norm and their gradient's parallel component removed; b_dec starts at the first
batch's geometric median (or mean); Adam with linear decay. The encoder backward is sparse (`sparse_ops`).

Checkpoints (model, Adam state, step, dead-latent counters, history) are replaced atomically; a resumed run
regenerates the seeded data order and skips the consumed batches, so it ends bit-identical to an
uninterrupted run on the same machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia_core.files import atomic_path
from saemnesia_core.sae import SAEConfig, TopKSAE, standardize
from saemnesia_core.sae_file import SAEFile, save_sae_file
from saemnesia_tools.training.distributed import DistContext
from saemnesia_tools.training.shards import as_dataset
from saemnesia_tools.training.sparse_ops import (
    Selection, batch_topk, dead_latent_topk, decode_rows, encoder_values, per_token_topk,
)

CHECKPOINT_NAME = "checkpoint.pt"
REFERENCE_LATENTS = 20480
REFERENCE_LR = 4e-4  # SAeUron: lr 4e-4 at n = 20480


@dataclass
class TrainConfig:
    """Unsupervised stage. Defaults: SAeUron's SD1.5 recipe (×16, k 32, BatchTopK, batch 4096, AuxK 1/32)."""

    expansion_factor: int = 16
    num_latents: int | None = None       # overrides expansion_factor
    k: int = 32
    batch_topk: bool = True              # train BatchTopK (SAeUron); inference is per-token TopK either way
    input_unit_norm: bool = False
    batch_size: int = 4096               # tokens per optimizer step, across all ranks
    epochs: int = 5                      # SAeUron: 5 for up_blocks.1.attentions.1, 10 for .2
    max_steps: int | None = None         # cap on optimizer steps (the LR decays over the capped run)
    lr: float | None = None              # None: 4e-4 · sqrt(20480 / n)
    warmup_steps: int = 0
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None             # None: d // 2
    dead_tokens_threshold: int = 10_000_000
    b_dec_init: str = "geometric_median"  # or "mean"
    grad_clip: float | None = None
    sparse_grad: bool = True             # False: autograd through the dense pre-activations (reference)
    seed: int = 0
    shuffle_buffer_tokens: int = 2**17
    log_every: int = 50
    checkpoint_every: int = 500

    def sae_config(self, d: int) -> SAEConfig:
        return SAEConfig(d, self.num_latents or self.expansion_factor * d, self.k, self.input_unit_norm)

    def learning_rate(self, num_latents: int) -> float:
        """SAeUron's 4e-4 at n = 20480, scaled by 1/√n for other sizes (sparsify's rule)."""
        return self.lr if self.lr is not None else REFERENCE_LR * math.sqrt(REFERENCE_LATENTS / num_latents)


@dataclass
class TrainResult:
    sae: TopKSAE
    history: list[dict] = field(default_factory=list)  # one entry per logged step
    steps: int = 0
    sae_file: Path | None = None


def lr_at(step: int, base: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then linear decay to 0 at ``total_steps``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return base * warm * max(0.0, 1.0 - step / max(1, total_steps))


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising Σ‖x_i − y‖ over x [N, d] -> [d]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_next
        y = y_next
    return y


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch supports it (on a CPU ~8x faster than the foreach update at SD1.5 size)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def save_checkpoint_atomic(path: Path, state: dict) -> None:
    """torch.save, whole or not at all (never a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold tensors and plain data only: loaded with weights_only=True."""
    return torch.load(path, map_location="cpu", weights_only=True)


def total_variance(x: Tensor) -> Tensor:
    """Σ‖x_i − mean(x)‖² of tokens x [N, d], float64 (the FVU denominator)."""
    x = x.double()
    return (x - x.mean(0)).pow(2).sum()


class UnsupervisedStep:
    """One optimizer step of FVU + α·AuxK on this rank's share of a global batch."""

    def __init__(self, sae: TopKSAE, cfg: TrainConfig, ctx: DistContext):
        self.sae, self.cfg, self.ctx = sae, cfg, ctx
        self.k_aux = cfg.k_aux or sae.cfg.d_in // 2
        self.tokens_since_fired = torch.zeros(sae.cfg.num_latents, dtype=torch.int64, device=sae.device)

    def __call__(self, x_global: Tensor, optimizer: torch.optim.Optimizer) -> dict:
        sae, cfg, ctx = self.sae, self.cfg, self.ctx
        x_global = x_global.to(sae.device, torch.float32)
        if cfg.input_unit_norm:
            x_global = standardize(x_global).x
        variance = total_variance(x_global)
        x = x_global[ctx.local_slice(x_global.shape[0])]
        W_enc, b_enc = sae.encoder.weight, sae.encoder.bias
        with torch.no_grad():
            pre = sae.pre_acts(x)  # [N, n], no graph: the backward only needs the selected pairs
        sel = batch_topk(pre, cfg.k, ctx.gather) if cfg.batch_topk else per_token_topk(pre, cfg.k)
        dead = self.tokens_since_fired > cfg.dead_tokens_threshold
        use_aux = cfg.auxk_alpha > 0 and bool(dead.any())
        aux_sel = dead_latent_topk(pre, dead, self.k_aux) if use_aux else None
        both = sel if aux_sel is None else Selection(torch.cat([sel.rows, aux_sel.rows]),
                                                     torch.cat([sel.cols, aux_sel.cols]))
        values = encoder_values(x, W_enc, b_enc, sae.b_dec, pre, both, cfg.sparse_grad)
        del pre
        main_values = values[:sel.rows.numel()]
        recon = decode_rows(main_values, sel, sae.W_dec, x.shape[0]) + sae.b_dec
        fvu = (recon - x).pow(2).sum() / variance      # this rank's share of the global FVU
        loss = fvu
        aux = torch.zeros((), device=x.device)
        if aux_sel is not None:
            residual = (x - recon).detach()
            e_hat = decode_rows(values[sel.rows.numel():], aux_sel, sae.W_dec, x.shape[0])
            scale = min(int(dead.sum()) / self.k_aux, 1.0)
            aux = scale * (residual - e_hat).pow(2).sum() / variance
            loss = loss + cfg.auxk_alpha * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.sum_gradients(list(sae.parameters()))
        sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

        fired = torch.zeros(sae.cfg.num_latents, device=x.device)
        fired[sel.cols] = 1.0
        ctx.all_reduce(fired, "max")
        self.tokens_since_fired += x_global.shape[0]
        self.tokens_since_fired[fired > 0] = 0
        stats = ctx.all_reduce(torch.stack([fvu.detach().double(), aux.detach().double(),
                                            torch.tensor(float(sel.rows.numel()), dtype=torch.float64)]))
        return {"fvu": float(stats[0]), "auxk": float(stats[1]), "l0": float(stats[2]) / x_global.shape[0],
                "dead_fraction": float(dead.float().mean())}


def train_unsupervised(data, cfg: TrainConfig | None = None, *, out: str | Path | None = None,
                       checkpoint_dir: str | Path | None = None, model_family: str | None = None,
                       ctx: DistContext | None = None, device: str | None = None, progress: bool = True,
                       stop_at_step: int | None = None) -> TrainResult:
    """Train a TopK SAE on an activation dataset (a path or `ActivationDataset`).

    ``out``: write the SAE file there (no concepts yet; `finetune_supervised` / `compute_statistics` add
    them). ``checkpoint_dir``: checkpoint every ``cfg.checkpoint_every`` steps and at the end, and resume
    from an existing checkpoint. ``stop_at_step``: checkpoint and return early (as if interrupted).
    Under ``torchrun`` pass ``ctx=init_distributed()``; only rank 0 writes files.
    """
    cfg = cfg or TrainConfig()
    ds = as_dataset(data)
    ctx = ctx or DistContext(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    ctx.local_slice(cfg.batch_size)  # fails early when ranks cannot split the batch
    steps_per_epoch = ds.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {ds.num_tokens} tokens, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    sae_cfg = cfg.sae_config(ds.d)
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(sae_cfg, device=ctx.device)
    base_lr = cfg.learning_rate(sae_cfg.num_latents)
    optimizer = make_adam(sae.parameters(), base_lr)
    step_fn = UnsupervisedStep(sae, cfg, ctx)
    history: list[dict] = []
    step = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("stage") != "unsupervised" or state["train_config"] != asdict(cfg):
            raise ValueError(f"{ckpt_path}: checkpoint of another run (stage or config differ); "
                             "use another --checkpoint-dir or delete it")
        sae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step_fn.tokens_since_fired.copy_(state["tokens_since_fired"])
        step, history = state["step"], state["history"]

    def checkpoint():
        if ckpt_path is not None and ctx.is_main:
            save_checkpoint_atomic(ckpt_path, {
                "format": "saemnesia-train-checkpoint", "stage": "unsupervised", "train_config": asdict(cfg),
                "sae_config": sae_cfg.to_dict(), "model": sae.state_dict(), "optimizer": optimizer.state_dict(),
                "tokens_since_fired": step_fn.tokens_since_fired.cpu(), "step": step, "history": history})
        ctx.barrier()

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress or not ctx.is_main)
    started = time.perf_counter()
    while step < total_steps and (stop_at_step is None or step < stop_at_step):
        epoch, skip = divmod(step, steps_per_epoch)
        stream = ds.iter_tokens(cfg.batch_size, seed=cfg.seed, epoch=epoch, buffer_tokens=cfg.shuffle_buffer_tokens)
        for i, batch in enumerate(stream):
            if i < skip:
                continue
            if step == 0:
                init = geometric_median if cfg.b_dec_init == "geometric_median" else (lambda t: t.mean(0))
                x0 = batch.to(ctx.device, torch.float32)
                sae.b_dec.data.copy_(init(standardize(x0).x if cfg.input_unit_norm else x0))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr, total_steps, cfg.warmup_steps)
            metrics = step_fn(batch, optimizer)
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                history.append({"step": step, **metrics, "lr": optimizer.param_groups[0]["lr"]})
            bar.update(1)
            bar.set_postfix(fvu=f"{metrics['fvu']:.4f}", dead=f"{metrics['dead_fraction']:.3f}",
                            l0=f"{metrics['l0']:.1f}")
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
            if step >= total_steps or (stop_at_step is not None and step >= stop_at_step):
                break
    bar.close()
    checkpoint()
    result = TrainResult(sae, history, step)
    if out is not None and step >= total_steps and ctx.is_main:
        result.sae_file = Path(out)
        save_sae_file(SAEFile(
            config=sae_cfg, weights={k: v.detach().cpu() for k, v in sae.state_dict().items()}, concepts=[],
            hookpoint=ds.hookpoint, model_family=model_family or ds.index["source"].get("model_family", "unknown"),
            num_buckets=1, supervised=False,
            provenance={"trainer": "saemnesia unsupervised", "dataset": ds.root.name, "model_id": ds.index["model_id"],
                        "tokens": step * cfg.batch_size, "steps": step, "train_config": asdict(cfg),
                        "final": history[-1] if history else {},
                        "seconds": round(time.perf_counter() - started, 1)}),
            result.sae_file)
    return result
