"""Generate toy-world images in-process exactly as a workflow would (CLIPTextEncode → KSampler → VAEDecode),
many prompts in one sampling call, each image with noise from its own seed (so it does not depend on the
batch it is in)."""

from __future__ import annotations

import torch

import comfy.sample

from saemnesia_tools.toy import assets
from saemnesia_tools.toy.judges import Judges
from saemnesia_tools.toy.render import SIZE

from saemnesia_comfy.toy_model import load_toy_model

DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_SCHEDULER = 25, 5.0, "euler", "normal"


class PromptEncoder:
    """CLIPTextEncode's conditioning for prompts, computed once per distinct prompt."""

    def __init__(self, clip):
        self.clip = clip
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompt: str) -> torch.Tensor:
        if prompt not in self._cache:
            cond, _ = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            self._cache[prompt] = cond
        return self._cache[prompt]

    def batch(self, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self(p) for p in prompts])


def item_noise(seeds: list[int], shape=(3, SIZE, SIZE)) -> torch.Tensor:
    """One noise tensor per image, drawn from that image's seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generate(model, vae, encoder: PromptEncoder, prompts: list[str], seeds: list[int], negative: str | list[str] = "",
             steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, sampler: str = DEFAULT_SAMPLER,
             scheduler: str = DEFAULT_SCHEDULER, batch_size: int = 128) -> torch.Tensor:
    """IMAGE [N, 32, 32, 3] in [0, 1] for N (prompt, seed) pairs."""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s, n = prompts[i:i + batch_size], seeds[i:i + batch_size], negatives[i:i + batch_size]
        noise = item_noise(s)
        latent = torch.zeros_like(noise)
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, [[encoder.batch(p), {}]],
                                      [[encoder.batch(n), {}]], latent, disable_pbar=True, seed=int(s[0]))
        out.append(vae.decode(samples))
    return torch.cat(out)


def load_toy_world(models=assets.MODELS):
    """The shipped toy world, ready to generate and judge: (MODEL, VAE, a PromptEncoder, the Judges)."""
    model, clip, vae = load_toy_model(assets.path(assets.MODEL, models))
    return model, vae, PromptEncoder(clip), Judges.load(assets.path(assets.JUDGES, models))
