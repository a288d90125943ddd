"""The GPU path (run by scripts/gpu_check.sh on a CUDA machine; skipped elsewhere): the edit on CUDA in fp16 and
bf16 against the fp32 result on the CPU, exact mode's identity on the GPU, and Erase Concepts in a ComfyUI model
sampled on the GPU with its SAE placed there by ComfyUI's memory manager."""

import pytest
import torch

from saemnesia_core.eraser import ConceptEraser
from saemnesia_tools.testing import concept_tokens, make_random_sae_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")

T = torch.tensor([0.05, 0.3, 0.6, 0.99])


def concept_activations(sae_file, sae):
    """[4, 12, d] tokens where each concept's latent fires on some tokens, noise elsewhere."""
    x = torch.randn(4, 12, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    for j, c in enumerate(sae_file.concepts):
        x[j % 4, 2 * j: 2 * j + 2] = concept_tokens(sae, c.latent, (2,), seed=j)
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode, detection", [("exact", "topk"), ("paper", "topk"), ("replace", "topk"),
                                             ("exact", "threshold"), ("replace", "threshold")])
def test_the_edit_on_cuda_in_half_precision_matches_the_fp32_result_on_the_cpu(dtype, mode, detection):
    sae_file = make_random_sae_file()
    strengths = {"Cats": -1.0, "Dogs": -5.0}
    cpu_sae = sae_file.build_sae()
    x = concept_activations(sae_file, cpu_sae).reshape(4, 3, 4, -1).permute(0, 3, 1, 2)  # [B, d, 3, 4] blocks
    region = torch.ones(4, 3, 4)
    region[:, :, 3] = 0.5  # a soft mask edge, on the device too
    kw = dict(mode=mode, detection=detection)
    expected = ConceptEraser.from_file(sae_file, strengths, sae=cpu_sae, **kw)(x, T, region=region)
    gpu = ConceptEraser.from_file(sae_file, strengths, sae=sae_file.build_sae(device="cuda"), **kw)
    out = gpu(x.to("cuda", dtype), T.cuda(), region=region.cuda())
    out, expected, x = (block.flatten(2).transpose(1, 2) for block in (out, expected, x))
    assert out.device.type == "cuda" and out.dtype == dtype
    tol = 5e-2 if dtype == torch.float16 else 2e-1
    close = torch.isclose(out.float().cpu(), expected, rtol=tol, atol=tol).all(-1)
    assert close.float().mean() > 0.9  # near-ties at the k-th latent may pick another latent in half precision
    assert not torch.equal(out.float().cpu(), x)  # the concepts were edited


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_mode_on_cuda_is_the_identity_bit_for_bit_when_nothing_is_chosen(dtype):
    sae_file = make_random_sae_file()
    x = torch.randn(2, 16, 3, 5, device="cuda", dtype=dtype)
    out = ConceptEraser.from_file(sae_file, {}, sae=sae_file.build_sae(device="cuda"))(x, 0.5)
    assert torch.equal(out, x)


def test_erase_concepts_samples_on_the_gpu_with_the_sae_placed_there(comfy_gpu):
    from helpers_comfy import conditioning, record_block_outputs, sae_file_for_activations, sample
    from saemnesia_comfy.erase import erase_concepts
    from saemnesia_comfy.patch import ADDITIONAL_MODELS_KEY, patch_block_output
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_tools.comfyui.testing import make_sd15_model
    from saemnesia_core.sae import block_to_tokens
    from saemnesia_core.sae_file import save_sae_file

    model = make_sd15_model(dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    pos, neg = (conditioning(torch.randn(1, 77, 64, generator=g)) for _ in range(2))
    latent = torch.zeros(1, 4, 32, 32)
    seen = record_block_outputs(model, "output_blocks.4.1", lambda m: sample(m, pos, neg, latent))
    assert seen[0][0].device.type == "cuda" and seen[0][0].dtype == torch.float16
    acts = torch.cat([block_to_tokens(o).reshape(-1, o.shape[1]).float().cpu() for o, _ in seen])
    path = comfy_gpu / "gpu_test_sae.safetensors"
    save_sae_file(sae_file_for_activations(acts), path)
    loaded = load_sae_path(path)
    erased = erase_concepts(model, loaded, {"Hearts": -1.0}, -1.0)
    (attached,) = erased.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert attached.model.sae.dtype == torch.float16  # the fp32 file is held in the model's dtype
    watched, seen_on = erased.clone(), []
    patch_block_output(watched, "output_blocks.4.1",
                       lambda out, options: seen_on.append((attached.model.sae.W_dec.device, out.device)) or out)
    sample(watched, pos, neg, latent)
    assert seen_on and all(w.type == "cuda" and a.type == "cuda" for w, a in seen_on)  # ComfyUI placed it on the GPU
    plain = sample(model, pos, neg, latent)
    assert torch.equal(sample(erase_concepts(model, loaded, {}, -1.0), pos, neg, latent), plain)
    assert not torch.equal(sample(erase_concepts(model, loaded, {"Hearts": -1.0}, -1.0), pos, neg, latent), plain)


@pytest.fixture(scope="module")
def comfy_gpu(tmp_path_factory):
    """ComfyUI imported in-process on the GPU; a folder for files."""
    from saemnesia_tools.comfyui.host import import_comfy

    import_comfy(cpu=False)
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cuda":
        pytest.skip("ComfyUI was imported on the CPU earlier in this session; run tests/test_gpu.py on its own")
    return tmp_path_factory.mktemp("gpu")
