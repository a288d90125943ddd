"""ComfyUI helpers for tests: sampling, recording a block's outputs, an SAE fitted to recorded activations.
Random SD1.5-topology models: saemnesia_tools.comfyui.testing."""

import torch

NODE_IDS = ("SAEmnesiaLoadSAE", "SAEmnesiaEraseConcepts", "SAEmnesiaEraseConceptsText", "SAEmnesiaConceptProbe",
            "SAEmnesiaProbeReport", "SAEmnesiaFindConceptLatents", "SAEmnesiaSaveSAE", "SAEmnesiaToyModelLoader",
            "SAEmnesiaToyEmptyLatent")
"""Every node the pack registers."""


def sample(model, positive, negative, latent, steps=4, cfg=5.0, seed=0, sampler="euler", scheduler="normal",
           start_step=None, last_step=None, noise=None):
    """ComfyUI's own sampling entry point (what KSampler/KSamplerAdvanced call), without a progress bar."""
    import comfy.sample

    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               start_step=start_step, last_step=last_step, disable_pbar=True, seed=seed)


def conditioning(context: torch.Tensor):
    """A CONDITIONING list from a [B, tokens, dim] context tensor."""
    return [[context, {}]]


def record_block_outputs(model, block, run):
    """Outputs of `diffusion_model.<block>` seen while `run(patched_model)` samples (a clone is patched)."""
    from saemnesia_comfy.patch import patch_block_output

    seen = []
    m = model.clone()

    def keep(out, options):
        seen.append((out.detach().clone(), dict(options)))
        return out

    patch_block_output(m, block, keep)
    run(m)
    return seen


def sae_file_for_activations(acts: torch.Tensor, labels=("Hearts", "Neon"), n=256, k=8, num_buckets=10, seed=0,
                             never_fires=("Neon",), groups=None):
    """An SAEmnesia-style SAE file whose concepts own the latents that fire most often on `acts` [N, d].

    Concepts in `never_fires` get a threshold of 1e30 (they never pass it); the others a threshold of 0
    and μ = 1, so erasing them with γ = −1 flips their latent wherever it is active.
    """
    from saemnesia_core.sae import scatter_dense
    from saemnesia_tools.testing import random_sae, sae_file_with_assigned_latents

    sae = random_sae(d=acts.shape[-1], n=n, k=k, seed=seed)
    with torch.no_grad():
        counts = (scatter_dense(*sae.encode(acts.float()), n) > 0).sum(0)
    latents = counts.argsort(descending=True)[: len(labels)].tolist()
    groups = groups or ["object" if i == 0 else "style" for i in range(len(labels))]
    return sae_file_with_assigned_latents(sae, latents, labels, groups, num_buckets,
                                          thresholds=[1e30 if label in never_fires else 0.0 for label in labels],
                                          made_by="tests")
