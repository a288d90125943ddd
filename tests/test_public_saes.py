"""Every public diffusion-SAE family, loaded with its meaning and edited as its authors' hooks edit, in the real
ComfyUI (in-process) at the blocks each family reads: a checkpoint written in the family's exact layout
(helpers_families) is imported the way the README says, Erase Concepts patches a tiny model of the family's kind
(SD1.5- or SDXL-topology UNet, Flux), and at one real call of the block the patched output equals an independent
statement of the family's hook written below from its formulas — in exact and paper mode, for every CFG branch
setting, in fp32 and fp16. Each test also shows it would catch the family's input preparation being dropped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers_families import (Raw, random_raw, write_concept_stats, write_hub_topk, write_saemnesia, write_saeparate,
                              write_saeuron, write_sdxl_unbox, write_unbox)

pytestmark = pytest.mark.comfy

UNIT_NORM_EPS = 1e-5   # SAeUron's preprocess_input: (x − mean) / (std + 1e-5)
BETA_EPS = 1e-8        # SAEmnesia's hook: ‖z‖ / (‖W_dec[i]‖ + 1e-8)
SD15_BLOCK = "unet.up_blocks.1.attentions.1"   # the tiny SD1.5 UNet's 8×8 level, 128 channels
SDXL_BLOCK = "unet.up_blocks.0.attentions.1"   # one of sdxl-unbox's four blocks, 128 channels in the tiny SDXL
FLUX_BLOCK = "transformer.transformer_blocks.1"
CONCEPTS = ["Cats", "Dogs", "Birds"]
STRONG = {"Cats": [3, 7], "Dogs": [11], "Birds": [19]}


# ---------------------------------------------------------------------------------------------- the families' hooks


FP16_DISAGREEMENT = 0.1
"""In fp16 the top-k choice of a token whose k-th and (k+1)-th latents nearly tie can go either way by rounding, and
then that token differs (as between two fp16 runs of the authors' own hook on two kernels): the fp16 comparisons let
this share of the tokens the edit changes, and at least two (the fixtures have few tokens: on ComfyUI 0.33's torch,
SAEmnesia's update fixture flips 2 of 16, exactly the two whose k-th and (k+1)-th latents lie within 2e-4 of each
other, against 2e-3 and more for the rest), differ beyond fp16's tolerance; the fp32 ones let none."""


def code(signal: torch.Tensor, raw: Raw, unit_norm: bool = False, topk_before_relu: bool = False):
    """[N, d] -> (dense z [N, n], the SAE's input [N, d], the tokens' std [N, 1] or None), fp32, as the families
    encode: optional standardisation, x − b_dec, optional GELU(Linear) pre-encoder, the encoder, ReLU and top-k (or
    OpenAI's top-k of the pre-activations, then ReLU)."""
    x, std = signal.float(), None
    if unit_norm:
        centred = x - x.mean(-1, keepdim=True)
        std = centred.std(-1, keepdim=True)
        x = centred / (std + UNIT_NORM_EPS)
    h = x - raw.b_dec
    if raw.pre is not None:
        h = F.gelu(h @ raw.pre[0].T + raw.pre[1])
    pre = h @ raw.W_enc.T + raw.b_enc
    values, indices = (pre.topk(raw.k, -1) if topk_before_relu else pre.relu().topk(raw.k, -1))
    return torch.zeros_like(pre).scatter(-1, indices, values.relu()), x, std


def recon(z: torch.Tensor, raw: Raw) -> torch.Tensor:
    return z @ raw.W_dec + raw.b_dec


def saeuron_selection(stats: dict, concept: str, percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAeUron's latents of a concept at one step (its statistics are the same at every step here): score = the
    concept's share of the mean activation minus the others'; selected where above the percentile; μ the concept's mean
    activation of them, θ the unweighted mean over concepts."""
    means = {c: s[:, 0].double().mean(0) for c, s in stats.items()}
    others = torch.stack([s[:, 0].double() for c, s in stats.items() if c != concept])
    others = others.reshape(-1, means[concept].numel())
    rest = others.mean(0)
    score = means[concept] / (means[concept].sum() + 1e-8) - rest / (rest.sum() + 1e-8)
    selected = torch.nonzero(score > torch.quantile(score.float(), percentile / 100)).flatten()
    theta = torch.stack([m[selected] for m in means.values()]).mean(0)
    return selected, means[concept][selected].float(), theta.float()


def ablate(z: torch.Tensor, selected, scale: torch.Tensor, theta) -> torch.Tensor:
    """The erasure rule of the hooks: a selected latent above θ is multiplied by its scale."""
    z2 = z.clone()
    part = z[:, selected]
    z2[:, selected] = torch.where(part > theta, part * scale, part)
    return z2


def paper_hook(signal, z, z2, sae_in, raw):
    """SAeUron's / SAEmnesia's / SAEParate's released hook: the edited reconstruction plus error = x̂ − x (in the SAE's
    space; standardisation never undone)."""
    return recon(z2, raw) + (recon(z, raw) - signal.float())


def exact_hook(signal, z, z2, std, raw):
    """Ours: the signal plus only the change of the edited latents (times the tokens' std under unit norm)."""
    delta = (z2 - z) @ raw.W_dec
    return signal.float() + (delta if std is None else delta * std)


def standardised_output_hook(raw, selected, scale, theta, mode: str):
    """The SAeUron-style families' hook: the block's output, standardised per token, the selected latents scaled."""
    def hook(out, _inp):
        z, sae_in, std = code(out, raw, unit_norm=True)
        z2 = ablate(z, selected, scale, theta)
        return paper_hook(out, z, z2, sae_in, raw) if mode == "paper" else exact_hook(out, z, z2, std, raw)
    return hook


# ---------------------------------------------------------------------------------------------- one call of a block


def capture(model, block: str, run) -> tuple[list, dict]:
    """The inputs of the first call of `diffusion_model.<block>` while `run()` samples (cloned: Flux's blocks add to
    their inputs in place)."""
    module = model.get_model_object(f"diffusion_model.{block}")
    seen = []
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    hook = module.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()})),
        with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def run_unet(model, context_dim: int, sdxl: bool = False):
    import comfy.sample

    g = torch.Generator().manual_seed(5)
    extra = {"pooled_output": torch.randn(1, 32, generator=g), "width": 128, "height": 128} if sdxl else {}
    cond = [[torch.randn(1, 8, context_dim, generator=g), dict(extra)]]
    negative = [[torch.randn(1, 8, context_dim, generator=g), dict(extra)]]
    noise = torch.randn(1, 4, 16, 16, generator=g)
    return lambda: comfy.sample.sample(model, noise, 1, 3.0, "euler", "normal", cond, negative,
                                       torch.zeros_like(noise), disable_pbar=True, seed=5)


def run_flux(model):
    import comfy.sample

    g = torch.Generator().manual_seed(5)
    cond = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]
    negative = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                       "guidance": 3.5}]]
    noise = torch.randn(1, 16, 16, 16, generator=g)
    return lambda: comfy.sample.sample(model, noise, 1, 3.0, "euler", "simple", cond, negative,
                                       torch.zeros_like(noise), disable_pbar=True, seed=5)


@dataclasses.dataclass
class Call:
    """One captured call of a block: its output and input image tokens [B, N, d] (channels last for a UNet), the
    patched block's output the same way, and which batch items the branch setting edits."""

    out: torch.Tensor
    inp: torch.Tensor
    edited: torch.Tensor
    items: torch.Tensor


def run_block(forward, args, kwargs, dit: bool) -> torch.Tensor:
    """A block's forward on copies of the captured inputs -> its output image tokens [B, N, d]."""
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = forward(*[clone(a) for a in args], **{k: clone(v) for k, v in kwargs.items()})
    return out[0] if dit else out.flatten(2).transpose(1, 2)  # Flux's double block returns (image, text)


def block_io(model, block: str, args, kwargs, dit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, input) image tokens of the unpatched block for the captured call."""
    out = run_block(model.get_model_object(f"diffusion_model.{block}").forward, args, kwargs, dit)
    return out, ((kwargs["img"] if "img" in kwargs else args[0]) if dit else args[0].flatten(2).transpose(1, 2))


def call_block(model, block: str, args, kwargs, erased, dit: bool, branches: str) -> Call:
    from saemnesia_comfy.patch import BRANCHES, item_branches

    out, inp = block_io(model, block, args, kwargs, dit)
    edited = run_block(erased.object_patches[f"diffusion_model.{block}.forward"], args, kwargs, dit)
    options = kwargs["transformer_options"] if dit else args[2] if len(args) > 2 else kwargs["transformer_options"]
    branch = item_branches(options, out.shape[0])
    return Call(out, inp, edited, torch.isin(branch, torch.tensor(BRANCHES[branches])))


def expected(call: Call, per_item) -> torch.Tensor:
    """The reference edit on the items of the branch setting, the block's own output elsewhere."""
    ref = call.out.float().clone()
    for b in torch.nonzero(call.items).flatten().tolist():
        ref[b] = per_item(call.out[b], call.inp[b])
    return ref


def agreeing(call: Call, ref: torch.Tensor) -> tuple[int, int]:
    """Of the tokens the edit or the reference changes: how many agree with the reference in every channel within
    fp16's tolerance, and how many there are."""
    near = lambda a, b: torch.isclose(a.float(), b.float(), rtol=2e-2, atol=2e-2).all(-1)  # noqa: E731
    changed = ~near(call.edited, call.out) | ~near(ref, call.out)
    return int(near(call.edited, ref)[changed].sum()), int(changed.sum())


def assert_matches(call: Call, ref: torch.Tensor, dtype):
    assert not torch.equal(call.edited, call.out), "the edit changed nothing: the comparison would be vacuous"
    if dtype == torch.float32:
        torch.testing.assert_close(call.edited.float(), ref, rtol=1e-4, atol=1e-4)
    else:
        agree, changed = agreeing(call, ref)
        assert changed - agree <= max(2, int(FP16_DISAGREEMENT * changed)), f"{changed - agree} of {changed} differ"
        torch.testing.assert_close(call.edited[~call.items], call.out[~call.items], rtol=0, atol=0)


def assert_differs(call: Call, ref: torch.Tensor):
    """The same edit without the family's input preparation does not reproduce the family's hook."""
    agree, changed = agreeing(call, ref)
    assert agree < 0.5 * changed


# ---------------------------------------------------------------------------------------------- fixtures

MODES = ["exact", "paper"]
BRANCH_SETTINGS = ["both", "cond", "uncond"]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def unets(comfy):
    from saemnesia_tools.comfyui.testing import make_sd15_model, tiny_sdxl_model

    cache = {}

    def get(kind: str, dtype):
        if (kind, dtype) not in cache:
            model = make_sd15_model(dtype=dtype) if kind == "sd15" else tiny_sdxl_model(dtype)
            ctx, block = (64, "output_blocks.4.1") if kind == "sd15" else (32, "output_blocks.1.1")
            cache[kind, dtype] = model, block, capture(model, block, run_unet(model, ctx, sdxl=kind == "sdxl"))
        return cache[kind, dtype]
    return get


@pytest.fixture(scope="module")
def flux(comfy):
    from saemnesia_tools.comfyui.testing import tiny_dit_model

    cache = {}

    def get(dtype):
        if dtype not in cache:
            model = tiny_dit_model("flux", dtype)
            cache[dtype] = model, "double_blocks.1", capture(model, "double_blocks.1", run_flux(model))
        return cache[dtype]
    return get


def converted(tmp_path, *argv) -> Path:
    """The README's `saemnesia convert` command run on the fixture; the file it wrote."""
    from saemnesia_tools.cli import main

    out = tmp_path / "converted.safetensors"
    assert main(["convert", *map(str, argv), str(out)]) == 0
    return out


def load(path: Path, **dropped):
    """The file as Load SAE loads it; with `dropped`, the same SAE with part of what it reads or of its input
    preparation taken away (reads="output", input_unit_norm=False, pre_encoder=False, b_dec=0)."""
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_core.sae_file import load_sae_file, save_sae_file
    from saemnesia_core.sae_format import PRE_ENCODER_NAMES

    if dropped:
        f = load_sae_file(path)
        config = dataclasses.replace(f.config, **{k: dropped.pop(k) for k in ("input_unit_norm", "pre_encoder")
                                                  if k in dropped})
        weights = {k: v for k, v in f.weights.items() if config.pre_encoder or k not in PRE_ENCODER_NAMES}
        if dropped.pop("b_dec", None) == 0:
            weights["b_dec"] = torch.zeros_like(weights["b_dec"])
        path = path.with_name("dropped.safetensors")
        save_sae_file(dataclasses.replace(f, config=config, weights=weights, **dropped), path)
    return load_sae_path(path)


def erase(model, loaded, label, strength, mode, branches):
    from saemnesia_comfy.erase import erase_concepts

    return erase_concepts(model, loaded, {label: strength}, -1.0, branches=branches, mode=mode)


def busiest_latent(model, block, captured, dit: bool, raw: Raw, update: bool, **encoding) -> int:
    """The latent active on most tokens of the captured call's signal (its output, or its update): the one a test
    erases by its index ("#j")."""
    out, inp = block_io(model, block, *captured, dit)
    signal = (out.float() - inp.float()) if update else out.float()
    z = code(signal.reshape(-1, signal.shape[-1]), raw, **encoding)[0]
    return int((z > 0).sum(0).argmax())


def check(model, block, captured, loaded, label, strength, mode, branches, dtype, dit, hook, dropped_loaded):
    """The patched block equals the family's hook on the edited items; without the preparation it does not."""
    args, kwargs = captured
    call = call_block(model, block, args, kwargs, erase(model, loaded, label, strength, mode, branches), dit, branches)
    ref = expected(call, hook)
    assert_matches(call, ref, dtype)
    without = call_block(model, block, args, kwargs, erase(model, dropped_loaded, label, strength, mode, branches), dit,
                         branches)
    assert_differs(without, ref)


def parametrized(test):
    test = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])(test)
    test = pytest.mark.parametrize("branches", BRANCH_SETTINGS)(test)
    return pytest.mark.parametrize("mode", MODES)(test)


# ---------------------------------------------------------------------------------------------- the parity tests


@parametrized
def test_saeuron_reads_the_standardised_block_output(tmp_path, unets, mode, branches, dtype):
    """SAeUron: `<hookpoint>/` folder + its statistics pickle; the block's output, standardised per token."""
    raw = random_raw(d=128, n=256, k=16, seed=1, bias=1.0)  # a b_dec the standardisation makes a difference to
    folder = write_saeuron(tmp_path, SD15_BLOCK, raw, input_unit_norm=True)
    stats_file = tmp_path / f"cls_latents_dict_{SD15_BLOCK}.pkl"
    stats = write_concept_stats(stats_file, CONCEPTS, 256, steps=10, seed=2, strong=STRONG)
    p = 100 * (256 - 2 - 0.5) / 255  # two latents of 256 (DESIGN §5.2)
    path = converted(tmp_path, folder, "--concept-stats", stats_file, "--percentile", p)
    selected, mu, theta = saeuron_selection(stats, "Cats", p)
    hook = standardised_output_hook(raw, selected, -2.0 * mu, theta, mode)

    model, block, captured = unets("sd15", dtype)
    check(model, block, captured, load(path), "Cats", -2.0, mode, branches, dtype, False, hook,
          load(path, input_unit_norm=False))


@parametrized
def test_saemnesia_residual_sae_with_beta_reads_the_block_update(tmp_path, unets, mode, branches, dtype):
    """SAEmnesia: its repository root (cfg.json with d_model) + class_params.pth; `residual_sae` (the update) and
    `use_beta` (β = ‖z‖₂ / ‖W_dec[i]‖₂ times the multiplier) told to the importer; the error-preserving write-back
    input + (the edited reconstruction + the error)."""
    raw = random_raw(d=128, n=256, k=16, seed=3)
    p = 100 * (256 - 2 - 0.5) / 255
    root = write_saemnesia(tmp_path / "SAEmnesia", raw, {c: (p, -1.5) for c in CONCEPTS})
    stats_file = tmp_path / f"cls_latents_dict_{SD15_BLOCK}.pkl"
    stats = write_concept_stats(stats_file, CONCEPTS, 256, steps=10, seed=4, strong=STRONG)
    path = converted(tmp_path, root, "--hookpoint", SD15_BLOCK, "--concept-stats", stats_file, "--class-params",
                     root / "class_params.pth", "--reads", "update", "--strength-unit", "beta")
    selected, _mu, theta = saeuron_selection(stats, "Cats", p)

    def hook(out, inp):
        update = out.float() - inp.float()
        z, sae_in, std = code(update, raw, unit_norm=True)
        beta = z.norm(dim=-1, keepdim=True) / (raw.W_dec[selected].norm(dim=-1) + BETA_EPS)
        z2 = ablate(z, selected, -1.5 * beta, theta)
        if mode == "paper":
            return inp.float() + paper_hook(update, z, z2, sae_in, raw)
        return out.float() + (z2 - z) @ raw.W_dec * std

    model, block, captured = unets("sd15", dtype)
    check(model, block, captured, load(path), "Cats", -1.5, mode, branches, dtype, False, hook,
          load(path, reads="output"))


@parametrized
def test_saeparate_encodes_through_its_gelu_pre_encoder(tmp_path, unets, mode, branches, dtype):
    """SAEParate: cfg.json with `use_pre_encoder_gelu`, the pre-encoder's weights beside the SAE's."""
    raw = random_raw(d=128, n=256, k=16, seed=5, pre_encoder=True)
    folder = write_saeparate(tmp_path, SD15_BLOCK, raw)
    stats_file = tmp_path / "cls_latents.pkl"
    stats = write_concept_stats(stats_file, CONCEPTS, 256, steps=10, seed=6, strong=STRONG)
    p = 100 * (256 - 2 - 0.5) / 255
    path = converted(tmp_path, folder, "--concept-stats", stats_file, "--percentile", p)
    selected, mu, theta = saeuron_selection(stats, "Cats", p)
    hook = standardised_output_hook(raw, selected, -2.0 * mu, theta, mode)

    model, block, captured = unets("sd15", dtype)
    check(model, block, captured, load(path), "Cats", -2.0, mode, branches, dtype, False, hook,
          load(path, pre_encoder=False))


def unbox_hook(raw: Raw, latent: int, strength: float, mode: str):
    """sdxl-unbox's and the Flux SAE's convention: encode the update (OpenAI's top-k before the ReLU), and add the
    decoded change of the code to the block's output; a latent's strength in units of its mean activation (mean.pt).
    Paper mode: SAEmnesia's residual write-back on the same code."""
    def hook(out, inp):
        update = out.float() - inp.float()
        z, _, _ = code(update, raw, topk_before_relu=True)
        z2 = ablate(z, [latent], strength * raw.means[latent], 0.0)
        if mode == "paper":
            return inp.float() + paper_hook(update, z, z2, update, raw)
        return out.float() + (z2 - z) @ raw.W_dec
    return hook


@parametrized
def test_sdxl_unbox_reads_the_block_update_and_keeps_its_latent_means(tmp_path, unets, mode, branches, dtype):
    """sdxl-unbox: `<hookpoint>_k10_hidden5120_…/final/` dropped into the SAE folder as it is, a latent erased by
    its index in units of its mean activation."""
    from saemnesia_comfy.sae_library import load_sae_path

    raw = random_raw(d=128, n=256, k=10, seed=7, means=True)
    folder = write_sdxl_unbox(tmp_path / "checkpoints", SDXL_BLOCK, raw)
    model, block, captured = unets("sdxl", dtype)
    latent = busiest_latent(model, block, captured, False, raw, update=True, topk_before_relu=True)
    loaded = load_sae_path(folder.parent)  # Load SAE reads the folder itself (its hookpoint from the name)
    assert (loaded.file.reads, loaded.file.hookpoint) == ("update", SDXL_BLOCK)
    path = tmp_path / "unbox.safetensors"
    converted(tmp_path, folder.parent, "--model-family", "sdxl").rename(path)
    check(model, block, captured, loaded, f"#{latent}", -1.0, mode, branches, dtype, False,
          unbox_hook(raw, latent, -1.0, mode), load(path, reads="output"))


@parametrized
def test_the_flux_sae_reads_the_update_of_a_double_blocks_image_stream(tmp_path, flux, mode, branches, dtype):
    """antoniomari/SAE_flux_18: config.json, state_dict.pth and mean.pt at the root; the block comes from the
    importer's --hookpoint (its files do not say it)."""
    raw = random_raw(d=64, n=128, k=8, seed=9, means=True)
    root = write_unbox(tmp_path / "SAE_flux_18", raw)
    model, block, captured = flux(dtype)
    latent = busiest_latent(model, block, captured, True, raw, update=True, topk_before_relu=True)
    path = converted(tmp_path, root, "--hookpoint", FLUX_BLOCK, "--model-family", "flux")
    check(model, block, captured, load(path), f"#{latent}", -1.0, mode, branches, dtype, True,
          unbox_hook(raw, latent, -1.0, mode), load(path, reads="output"))


@parametrized
def test_hub_topk_flux_saes_read_the_image_stream_of_their_block(tmp_path, flux, mode, branches, dtype):
    """Krea / finebooru TopK SAEs (PyTorchModelHubMixin): the block output's image stream (`-1` in the folder's
    name); no mean activations, so a latent's strength is in its own units. Their own tool replaces the output by the
    edited reconstruction; here exact mode keeps the error, paper mode adds it as the SAeUron hooks do."""
    raw = random_raw(d=64, n=128, k=8, seed=11)
    folder = write_hub_topk(tmp_path, "cc3m-transformer_blocks.1-1", raw)
    model, block, captured = flux(dtype)

    def hook(out, _inp):
        z, sae_in, _ = code(out, raw)
        z2 = ablate(z, [latent], torch.tensor(-1.0), 0.0)
        return paper_hook(out, z, z2, sae_in, raw) if mode == "paper" else out.float() + (z2 - z) @ raw.W_dec

    latent = busiest_latent(model, block, captured, True, raw, update=False)
    path = converted(tmp_path, folder, "--model-family", "flux")
    check(model, block, captured, load(path), f"#{latent}", -1.0, mode, branches, dtype, True, hook,
          load(path, b_dec=0))


# -------------------------------------------------------------------------------------- unlabelled SAEs, bad input


def test_a_latent_index_probes_an_unlabelled_sae_where_it_fires(tmp_path, unets):
    """Concept Probe takes latent indices as well as labels: an sdxl-unbox SAE (no concepts) shows where latent j of
    the block's update fires."""
    from saemnesia_comfy.probe import probe_concepts
    from saemnesia_comfy.sae_library import load_sae_path

    raw = random_raw(d=128, n=256, k=10, seed=7, means=True)
    loaded = load_sae_path(write_sdxl_unbox(tmp_path, SDXL_BLOCK, raw).parent)
    model, block, captured = unets("sdxl", torch.float32)
    latent = busiest_latent(model, block, captured, False, raw, update=True, topk_before_relu=True)
    probed, record = probe_concepts(model, loaded, [f"#{latent}"])
    run_unet(probed, 32, sdxl=True)()
    assert record.labels == [f"#{latent}"] and record.steps == 1 and float(record.scores().max()) > 0
    with pytest.raises(ValueError, match="out of range: this SAE has 256 latents"):
        probe_concepts(model, loaded, ["#256"])


def test_an_sae_of_a_dit_blocks_text_stream_is_refused_naming_what_it_reads(tmp_path, flux):
    from saemnesia_comfy.patch import HookpointError

    folder = write_hub_topk(tmp_path, "cc3m-transformer_blocks.1-0", random_raw(d=64, n=128, k=8, seed=11))
    loaded = load(converted(tmp_path, folder, "--model-family", "flux"))
    assert loaded.file.tokens == "text"
    with pytest.raises(HookpointError, match="reads the text tokens of transformer.transformer_blocks.1, but Erase "
                                             "Concepts reads and edits the image tokens"):
        erase(flux(torch.float32)[0], loaded, "#3", -1.0, "exact", "both")


def test_an_update_reading_sae_fails_clearly_where_the_block_gives_no_input(tmp_path, unets):
    """A block called without its input (another pack's replacement, say) cannot give the update: a clear error, never
    a silent read of the output."""
    from saemnesia_comfy.patch import HookpointError

    raw = random_raw(d=128, n=256, k=10, seed=7, means=True)
    folder = write_sdxl_unbox(tmp_path, SDXL_BLOCK, raw)
    model, block, (args, kwargs) = unets("sdxl", torch.float32)
    patched = erase(model, load(converted(tmp_path, folder.parent)), "#1", -1.0, "exact", "both")
    patch = patched.object_patches[f"diffusion_model.{block}.forward"]
    patch.previous = lambda *a, **kw: args[0]  # a stand-in block that takes its input by a name the patch cannot see
    with pytest.raises(HookpointError, match=r"reads the update \(output − input\) of .* called without its input"):
        patch(x_by_another_name=args[0], transformer_options=args[2])


def test_the_text_encoder_node_refuses_an_update_reading_sae(tmp_path):
    from saemnesia_comfy.patch import HookpointError
    from saemnesia_comfy.sae_library import load_sae_path
    from saemnesia_comfy.text_erase import erase_text_concepts

    folder = write_unbox(tmp_path / "unbox", random_raw(d=128, n=256, k=10, seed=7, means=True))
    loaded = load_sae_path(converted(tmp_path, folder, "--hookpoint", SD15_BLOCK))
    with pytest.raises(HookpointError, match="reads a block's update .* Erase Concepts \\(text\\) edits the output"):
        erase_text_concepts(object(), loaded, {"#1": None}, -1.0)
