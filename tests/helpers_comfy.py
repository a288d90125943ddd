"""Small real ComfyUI models for tests: an SD1.5-topology UNet with random weights (no download needed)."""

import torch


def sd15_unet_config(model_channels=32, context_dim=64, in_channels=4, full_res_attention=True, dtype=torch.float32):
    """SD1.5's UNet config at a small width; the block layout (and so the hookpoints) is SD1.5's."""
    level0 = 1 if full_res_attention else 0
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": in_channels, "out_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [level0, level0, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [level0] * 3 + [1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": 4, "num_head_channels": -1, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": dtype,
    }


def init_random_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised (torch.empty); give every layer torch's default init."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for torch_cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding):
            if isinstance(m, torch_cls):
                torch_cls.reset_parameters(m)  # torch's own init; ComfyUI's override is a no-op
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
    torch.random.set_rng_state(gen_state)


def make_sd15_model(model_channels=32, context_dim=64, in_channels=4, seed=0, full_res_attention=True,
                    dtype=torch.float32):
    """A ComfyUI MODEL (ModelPatcher over BaseModel, epsilon prediction) with SD1.5 topology, random weights,
    stored and run in `dtype`."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {}

    config = TinySD15(sd15_unet_config(model_channels, context_dim, in_channels, full_res_attention, dtype))
    config.set_inference_dtype(dtype, None)
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    init_random_weights(base.diffusion_model, seed)
    base.eval()
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


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
    from helpers_core import random_sae
    from saemnesia_core.concepts import Concept, ConceptTables
    from saemnesia_core.sae import scatter_dense
    from saemnesia_core.sae_file import SAEFile

    sae = random_sae(d=acts.shape[-1], n=n, k=k, seed=seed)
    with torch.no_grad():
        counts = (scatter_dense(*sae.encode(acts.float()), n) > 0).sum(0)
    latents = counts.argsort(descending=True)[: len(labels)].tolist()
    C = len(labels)
    tables = ConceptTables(
        latents=torch.tensor(latents).view(C, 1, 1).expand(C, num_buckets, 1).clone(),
        mean_acts=torch.ones(C, num_buckets, 1),
        thresholds=torch.tensor([1e30 if l in never_fires else 0.0 for l in labels]).view(C, 1, 1)
        .expand(C, num_buckets, 1).clone(),
    )
    groups = groups or ["object" if i == 0 else "style" for i in range(C)]
    concepts = [Concept(l, g, lat) for l, g, lat in zip(labels, groups, latents)]
    return SAEFile(config=sae.cfg, weights={k_: v.detach() for k_, v in sae.state_dict().items()},
                   concepts=concepts, tables=tables, hookpoint="unet.up_blocks.1.attentions.1", model_family="toy",
                   num_buckets=num_buckets, supervised=True, provenance={"made_by": "tests"})
