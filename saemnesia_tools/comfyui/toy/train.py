"""Train the toy world's text-to-image model on the CPU: v-prediction, jointly trained text encoder, EMA.

The loss goes through `BaseModel.apply_model`, the exact function ComfyUI's samplers call, so what is
trained is what ComfyUI samples. Checkpoints (every few minutes, atomically) hold the model, the EMA, the
optimiser and every RNG state, so an interrupted run resumes where it stopped and gives the same result.

    python -m saemnesia_tools.comfyui.toy.train --out runs/toy --minutes 90
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import types
from pathlib import Path

import numpy as np
import torch

from saemnesia_tools.toy import assets
from saemnesia_tools.toy.render import OBJECTS, STYLES, render_batch
from saemnesia_tools.toy.prompts import TRAIN_TEMPLATES, make_prompt

from saemnesia_core.files import atomic_path

from saemnesia_comfy import toy_model

ZERO_INIT = ("out_layers.3", "proj_out", "out.2")  # layers the UNet's authors start at zero


def init_weights(unet: torch.nn.Module, text: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops do not initialise weights; use torch's defaults (CLIP's N(0, 0.02) for the text model)."""
    torch.manual_seed(seed)
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            if name.endswith(ZERO_INIT):
                torch.nn.init.zeros_(m.weight)
                torch.nn.init.zeros_(m.bias)
            else:
                type_ = torch.nn.Linear if isinstance(m, torch.nn.Linear) else torch.nn.Conv2d
                type_.reset_parameters(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    for name, m in text.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.01 if "position" in name else 0.02)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def _clip_layer_forward_for_training(self, x, mask=None, optimized_attention=None):
    """ComfyUI's CLIPLayer.forward without its in-place adds (which autograd cannot differentiate)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def make_text_encoder_trainable(text: torch.nn.Module) -> None:
    for layer in text.transformer.text_model.encoder.layers:
        layer.forward = types.MethodType(_clip_layer_forward_for_training, layer)
    text.train()
    text.requires_grad_(True)


class ToyTrainer:
    """Holds everything a training step needs; `state_dict` / `load_state_dict` make runs resumable."""

    def __init__(self, seed=0, batch=64, lr=5e-4, total_steps=2000, warmup=200, cond_dropout=0.1,
                 ema_decay=0.998, weighting="minsnr", snr_gamma=5.0, text_aux=0.0, absence=0.0):
        self.seed, self.batch, self.lr, self.total_steps, self.warmup = seed, batch, lr, total_steps, warmup
        self.cond_dropout, self.ema_decay, self.weighting, self.snr_gamma = cond_dropout, ema_decay, weighting, snr_gamma
        self.text_aux, self.absence = text_aux, absence
        self.base = toy_model.build_base_model(torch.float32)
        self.unet = self.base.diffusion_model
        self.text = toy_model.ToyTextEncoder(dtype=torch.float32)
        init_weights(self.unet, self.text, seed)
        self.unet.train()
        self.unet.requires_grad_(True)
        make_text_encoder_trainable(self.text)
        self.ema = {"unet": copy.deepcopy(self.unet.state_dict()), "text": copy.deepcopy(self.text.state_dict())}
        # Training-only heads: the mean text embedding (what cross-attention mostly sees: 77 positions, most of
        # them padding) must tell the object and the style. CLIP's causal encoder otherwise lets the padding
        # carry only the last content word (the style), and shapes never get conditioned. Not exported.
        self.text_heads = torch.nn.Linear(toy_model.TEXT_CONFIG["hidden_size"], len(OBJECTS) + len(STYLES) + 1)
        params = list(self.unet.parameters()) + list(self.text.parameters()) + list(self.text_heads.parameters())
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        self.step = 0
        self.data_rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator().manual_seed(seed + 1)
        self.tokenizer = toy_model.comfy.sd1_clip.SD1Tokenizer()
        self._token_cache: dict[str, list[int]] = {}
        self.sigmas = self.base.model_sampling.sigmas.float()

    def tokens(self, prompt: str) -> list[int]:
        if prompt not in self._token_cache:
            pairs = self.tokenizer.tokenize_with_weights(prompt)["l"]
            self._token_cache[prompt] = [tok for tok, _ in pairs[0]]
        return self._token_cache[prompt]

    def sample_batch(self):
        """Images in [-1, 1] [B,3,32,32], their prompts (unstyled 1 time in 9; empty prompt for CFG) and labels
        (object index, style index with len(STYLES) = unstyled, -1 where the prompt was dropped or names no
        object). With `absence` > 0, that fraction of the batch shows no object: the style's background alone,
        prompted as such ("An image in Neon style.", or "An image." unstyled). At 0 the batches are those of
        runs made before the option (no extra draws from the data RNG)."""
        rng = self.data_rng
        objs = rng.integers(0, len(OBJECTS), self.batch)
        styles = rng.integers(0, len(STYLES) + 1, self.batch)  # the last value = unstyled
        templates = rng.integers(0, len(TRAIN_TEMPLATES), self.batch)
        seeds = rng.integers(0, 2**31 - 1, self.batch)
        drop = rng.random(self.batch) < self.cond_dropout
        if self.absence:
            objs = np.where(rng.random(self.batch) < self.absence, -1, objs)
        items = [(OBJECTS[o] if o >= 0 else None, STYLES[s] if s < len(STYLES) else None) for o, s in zip(objs, styles)]
        imgs = render_batch(items, seeds)
        x0 = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        prompts = ["" if d else make_prompt(o, s, TRAIN_TEMPLATES[t]) for (o, s), t, d in zip(items, templates, drop)]
        labels = torch.from_numpy(np.stack([np.where(drop, -1, objs), np.where(drop, -1, styles)], 1))
        return x0, prompts, labels

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def loss(self, x0: torch.Tensor, prompts: list[str], labels: torch.Tensor) -> torch.Tensor:
        context, _ = self.text([self.tokens(p) for p in prompts])
        aux = self.text_aux_loss(context, labels) if self.text_aux else 0.0
        t = torch.randint(0, len(self.sigmas), (x0.shape[0],), generator=self.torch_gen)
        sigma = self.sigmas[t]
        noise = torch.randn(x0.shape, generator=self.torch_gen)
        x_sigma = x0 + sigma.view(-1, 1, 1, 1) * noise
        denoised = self.base.apply_model(x_sigma, sigma, c_crossattn=context)
        per_sample = ((denoised - x0) ** 2).mean(dim=(1, 2, 3))
        snr = 1.0 / sigma**2
        # weights on the x0 error: v-prediction's own loss is (SNR + 1); Min-SNR-γ caps it at γ
        weight = torch.clamp(snr, max=self.snr_gamma) if self.weighting == "minsnr" else snr + 1
        return (weight * per_sample).mean() + self.text_aux * aux

    def text_aux_loss(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.text_heads(context.mean(dim=1))
        n_obj = len(OBJECTS)
        return (torch.nn.functional.cross_entropy(logits[:, :n_obj], labels[:, 0], ignore_index=-1)
                + torch.nn.functional.cross_entropy(logits[:, n_obj:], labels[:, 1], ignore_index=-1))

    def train_step(self) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        x0, prompts, labels = self.sample_batch()
        loss = self.loss(x0, prompts, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        for name, module in (("unet", self.unet), ("text", self.text)):
            for k, v in module.state_dict().items():
                ema = self.ema[name][k]
                if ema.dtype.is_floating_point:
                    ema.mul_(decay).add_(v, alpha=1 - decay)
                else:
                    ema.copy_(v)

    def state_dict(self) -> dict:
        return {"step": self.step, "unet": self.unet.state_dict(), "text": self.text.state_dict(), "ema": self.ema,
                "text_heads": self.text_heads.state_dict(), "opt": self.opt.state_dict(),
                "torch_gen": self.torch_gen.get_state(),
                "data_rng": json.dumps(self.data_rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        self.warm_start(state)
        self.text_heads.load_state_dict(state["text_heads"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.torch_gen.set_state(state["torch_gen"])
        self.data_rng.bit_generator.state = json.loads(state["data_rng"])

    def warm_start_from_model_file(self, path: Path) -> None:
        """Weights and EMA from an exported toy model file (fp16, EMA weights): a phase that continues a model
        of which only the file is kept."""
        unet, text, _ = toy_model.read_toy_file(path)
        text = {**self.text.state_dict(), **{f"transformer.{k}": v for k, v in text.items()}}
        self.warm_start({"unet": {k: v.float() for k, v in unet.items()}, "text": {k: v.float() for k, v in text.items()},
                         "ema": {"unet": {k: v.clone() for k, v in self.unet.state_dict().items()},
                                 "text": {k: v.clone() for k, v in self.text.state_dict().items()}}})

    def warm_start(self, state: dict) -> None:
        """Weights and EMA of another run; optimiser, step, schedule and RNGs stay this run's (fresh)."""
        self.unet.load_state_dict(state["unet"])
        self.text.load_state_dict(state["text"])
        self.ema = state["ema"]


def save_checkpoint(trainer: ToyTrainer, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(trainer.state_dict(), tmp)


def train(out: Path, steps: int, batch: int, lr: float, seed: int, weighting: str, stop_at: int | None = None,
          init: Path | None = None, text_aux: float = 0.0, absence: float = 0.0, checkpoint_minutes: float = 5.0,
          log_every: int = 25, export_every: int = 0) -> ToyTrainer:
    """Train (or resume) a run whose LR schedule spans `steps`, stopping at `stop_at` (default: `steps`).

    `init`: start from another run's checkpoint, or from an exported model file (.safetensors), for a later phase
    of a recipe. `absence`: the fraction of images with no object (`ToyTrainer.sample_batch`). Writes
    checkpoint.pt and log.jsonl in `out`.
    """
    out.mkdir(parents=True, exist_ok=True)
    trainer = ToyTrainer(seed=seed, batch=batch, lr=lr, total_steps=steps, weighting=weighting, text_aux=text_aux,
                         absence=absence)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        trainer.load_state_dict(torch.load(ckpt, weights_only=True))
        print(f"resumed at step {trainer.step}", flush=True)
    elif init is not None and init.suffix == ".safetensors":
        trainer.warm_start_from_model_file(init)
        print(f"warm start from the model file {init}", flush=True)
    elif init is not None:
        trainer.warm_start(torch.load(init, weights_only=True))
        print(f"warm start from {init}", flush=True)
    steps_to_run = stop_at if stop_at is not None else steps
    from tqdm import tqdm

    last_ckpt = time.time()
    t0, seen0 = time.time(), trainer.step
    avg = None
    with open(out / "log.jsonl", "a") as log, tqdm(total=steps_to_run, initial=trainer.step, desc="toy model") as bar:
        while trainer.step < steps_to_run:
            loss = trainer.train_step()
            avg = loss if avg is None else 0.98 * avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}")
            if trainer.step % log_every == 0:
                rate = (trainer.step - seen0) * batch / (time.time() - t0)
                log.write(json.dumps({"step": trainer.step, "loss": avg, "img_per_s": rate, "time": time.time()}) + "\n")
                log.flush()
            if time.time() - last_ckpt > checkpoint_minutes * 60 or trainer.step == steps_to_run:
                save_checkpoint(trainer, ckpt)
                last_ckpt = time.time()
            if export_every and trainer.step % export_every == 0:
                export(trainer, out / f"ema_step{trainer.step}.safetensors", {"step": trainer.step})
    return trainer


def export(trainer: ToyTrainer, path: Path, provenance: dict) -> None:
    """The EMA weights as a toy model file (fp16) that ComfyUI loads."""
    info = {"steps": trainer.step, "batch": trainer.batch, "lr": trainer.lr, "seed": trainer.seed,
            "weighting": trainer.weighting, **provenance}
    # ComfyUI's CLIP.load_sd fills the encoder's `transformer`, so the file holds that module's weights
    text = {k.removeprefix("transformer."): v for k, v in trainer.ema["text"].items() if k.startswith("transformer.")}
    toy_model.save_toy_model(path, trainer.ema["unet"], text, info)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000, help="length of the LR schedule")
    p.add_argument("--stop-at", type=int, help="stop at this step (default: --steps)")
    p.add_argument("--init", type=Path, help="warm start from this checkpoint (a later phase of a recipe)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weighting", choices=["minsnr", "v"], default="minsnr")
    p.add_argument("--text-aux", type=float, default=0.0, help="weight of the text encoder's object/style loss")
    p.add_argument("--absence", type=float, default=0.0, help="fraction of images with no object (and prompts that say so)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--export-every", type=int, default=0, help="also export EMA weights every N steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = train(args.out, args.steps, args.batch, args.lr, args.seed, args.weighting, args.stop_at, args.init,
                    args.text_aux, args.absence, export_every=args.export_every)
    export(trainer, args.out / Path(assets.MODEL).name, {})


if __name__ == "__main__":
    main()
