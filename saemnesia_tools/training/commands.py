# SPDX-License-Identifier: GPL-3.0-or-later
"""``saemnesia specs | collect | train [--supervised] | stats``: the training pipeline from the shell.

Every command runs as one process or under ``torchrun --nproc-per-node N`` (data-parallel; see
`distributed`). Defaults are the papers'; the flags scale everything down for small models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from saemnesia_tools.training.shards import ShardError
from saemnesia_tools.training.specs import SpecError
from saemnesia_tools.training.statistics import DEFAULT_BUCKETS, DEFAULT_PERCENTILE
from saemnesia_tools.training.supervised import SupervisedConfig
from saemnesia_tools.training.trainer import TrainConfig


def register(subparsers) -> None:
    """Add the training subcommands to the ``saemnesia`` parser."""
    p = subparsers.add_parser("specs", help="write the SAeUron prompt grid (objects x styles + unstyled)",
                              description="Write a prompt spec file: every object in every style plus unstyled.")
    p.add_argument("out", metavar="OUT.jsonl|OUT.csv")
    p.add_argument("--objects", required=True, help="comma-separated object labels, e.g. Cats,Dogs")
    p.add_argument("--styles", default="", help="comma-separated style labels, e.g. Van_Gogh,Pop_Art")
    p.add_argument("--repeats", type=int, default=1, help="copies of the grid (each gets its own seeds)")
    p.set_defaults(func=_guarded(_specs))

    p = subparsers.add_parser("collect", help="run a diffusers pipeline on prompt specs and store activations",
                              description="Record the hooked block's output of a diffusers pipeline (SD1.x/SDXL) "
                                          "on labelled prompts into a sharded dataset. Rerun to resume.")
    p.add_argument("--specs", required=True, help="prompt spec file (.jsonl or .csv)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers pipeline folder (model_index.json)")
    source.add_argument("--checkpoint", help="a single-file checkpoint (.safetensors), loaded with ComfyUI's own "
                                             "loader (needs COMFYUI_PATH, or the host scripts/bootstrap.sh sets up)")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--hookpoint", default="unet.up_blocks.1.attentions.1")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (SAeUron: 50)")
    p.add_argument("--guidance", type=float, default=9.0, help="CFG scale (SAeUron: 9.0)")
    p.add_argument("--every-n-steps", type=int, default=1, help="record every n-th step")
    p.add_argument("--branch", choices=("cond", "uncond", "both"), default="cond")
    p.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class (SAeUron: DDIM)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    p.add_argument("--model-dtype", choices=("float16", "bfloat16", "float32"),
                   help="pipeline dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--shard-mb", type=float, default=128.0)
    p.add_argument("--family", "--model-family", dest="family",
                   help="base model family stored with the data (default: from the pipeline or checkpoint)")
    _common(p)
    p.set_defaults(func=_guarded(_collect))

    p = subparsers.add_parser("train", help="train a TopK SAE (unsupervised) or fine-tune it (--supervised)",
                              description="Unsupervised: the SAeUron recipe (BatchTopK, AuxK, FVU). --supervised: "
                                          "SAEmnesia fine-tuning of --init on labelled records; writes concept "
                                          "statistics from the validation split.")
    p.add_argument("--data", required=True, help="activation dataset folder")
    p.add_argument("--out", required=True, help="SAE file to write (.safetensors)")
    p.add_argument("--checkpoint-dir", help="checkpoint here and resume from it")
    p.add_argument("--supervised", action="store_true", help="SAEmnesia fine-tuning of --init")
    p.add_argument("--init", help="the unsupervised SAE file to fine-tune (with --supervised)")
    p.add_argument("--lr", type=float, help="default: 4e-4*sqrt(20480/n) unsupervised, 5e-6 supervised")
    p.add_argument("--epochs", type=int, help="default: 5 unsupervised; supervised: at most 150 (early stopping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", help="base model family (default: from the dataset)")
    g = p.add_argument_group("unsupervised")
    g.add_argument("--expansion", type=int, default=16, help="latents = expansion x d (default 16)")
    g.add_argument("--num-latents", type=int, help="overrides --expansion")
    g.add_argument("--k", type=int, default=32)
    g.add_argument("--batch-size", type=int, default=4096, help="tokens per step (default 4096)")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--no-batch-topk", action="store_true", help="per-token TopK during training too")
    g.add_argument("--auxk-alpha", type=float, default=1 / 32)
    g.add_argument("--dead-tokens", type=int, default=10_000_000, help="dead = not fired in this many tokens")
    g.add_argument("--b-dec-init", choices=("geometric_median", "mean"), default="geometric_median")
    g.add_argument("--input-unit-norm", action="store_true")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument("--shuffle-buffer", type=int, default=2**17, help="tokens in the shuffle buffer")
    g.add_argument("--dense-grad", action="store_true", help="autograd through dense pre-activations (reference)")
    g = p.add_argument_group("supervised")
    g.add_argument("--beta", type=float, default=3.0, help="L_CA weight")
    g.add_argument("--eta", type=float, default=0.1, help="L_DC weight")
    g.add_argument("--l1", type=float, default=0.01, help="L_L1 weight")
    g.add_argument("--exclusivity", type=float, default=0.0,
                   help="L_X weight: other latents' correlation with the labels (0 = the authors' loss)")
    g.add_argument("--batch-records", type=int, default=128)
    g.add_argument("--patience", type=int, default=5)
    g.add_argument("--val-fraction", type=float, default=0.2)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--rec-loss", choices=("mse", "fvu"), default="mse")
    g.add_argument("--ca-post-relu", action="store_true", help="the authors' post-ReLU concept logits")
    g.add_argument("--priority-groups", default="object", help="comma-separated groups assigned first")
    g.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS, help="timestep buckets of the statistics")
    _common(p)
    p.set_defaults(func=_guarded(_train))

    p = subparsers.add_parser("stats", help="write concept statistics (mu_c, theta per bucket) into an SAE file",
                              description="Run an SAE over labelled records and write a ready SAE file.")
    p.add_argument("--sae", required=True, help="SAE file (from train)")
    p.add_argument("--data", required=True, help="activation dataset of held-out labelled prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("saemnesia", "saeuron"),
                   help="default: saemnesia when the SAE has assigned latents, else saeuron")
    p.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS)
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help="saeuron mode selection")
    p.add_argument("--strength", type=float, default=-1.0, help="default strength of new concepts (saeuron mode)")
    _common(p)
    p.set_defaults(func=_guarded(_stats))


def _common(p) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _guarded(func):
    """Input problems (bad specs, shards, configs) become a one-line error and exit code 1; a distributed run that
    succeeded ends on every rank together."""
    def run(args):
        from saemnesia_tools.training.distributed import finish_distributed

        try:
            done = func(args)
            finish_distributed()
            return done
        except (SpecError, ShardError, ValueError) as e:
            print(f"saemnesia {args.command}: error: {e}", file=sys.stderr)
            return 1
    return run


def _context(args):
    from saemnesia_tools.training.distributed import init_distributed

    return init_distributed(args.device)


def _specs(args) -> None:
    from saemnesia_tools.training.specs import saeuron_grid, write_specs

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    specs = saeuron_grid(split(args.objects), split(args.styles), repeats=args.repeats)
    write_specs(specs, args.out)
    print(f"wrote {args.out}: {len(specs)} prompts")


def _collect(args) -> None:
    from saemnesia_tools.training.collect import DiffusersSource, collect, load_diffusers_pipeline
    from saemnesia_tools.training.specs import read_specs

    ctx = _context(args)
    specs = read_specs(args.specs)
    if args.checkpoint:
        source = checkpoint_source(args)
    else:
        dtype = args.model_dtype or ("float16" if ctx.device.type == "cuda" else "float32")
        pipe = load_diffusers_pipeline(args.model, device=str(ctx.device), dtype=dtype, scheduler=args.scheduler)
        source = DiffusersSource(pipe, args.hookpoint, steps=args.steps, guidance_scale=args.guidance,
                                 every_n_steps=args.every_n_steps, branch=args.branch, height=args.height,
                                 width=args.width, model_id=Path(args.model).name, model_family=args.family)
    out = collect(source, specs, args.out, seed=args.seed, batch_size=args.batch_size, dtype=args.store_dtype,
                  shard_mb=args.shard_mb, ctx=ctx, progress=not args.quiet)
    if ctx.is_main:
        from saemnesia_tools.training.shards import ActivationDataset

        ds = ActivationDataset(out, verify=False)
        print(f"wrote {out}: {ds.num_records} records of [{ds.tokens_per_record}, {ds.d}] from {len(specs)} prompts")


SOURCES = "saemnesia.sources"
"""Entry points that make an activation source from `saemnesia collect`'s arguments; `checkpoint` (a single-file
checkpoint through ComfyUI's loader) comes from saemnesia_tools.comfyui, loaded only when it is asked for."""


def checkpoint_source(args):
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group=SOURCES) if e.name == "checkpoint"]
    if not found:
        raise SystemExit("saemnesia collect --checkpoint: this installation has no ComfyUI source (pip install -e . "
                         "registers saemnesia_tools.comfyui's)")
    try:
        make = found[0].load()
    except RuntimeError as e:  # saemnesia_tools.comfyui found no host
        raise SystemExit(f"saemnesia collect --checkpoint loads the model with ComfyUI's own loader, and {e}: set "
                         "COMFYUI_PATH to your ComfyUI folder, or run scripts/bootstrap.sh") from None
    return make(args)


def _train(args) -> None:
    ctx = _context(args)
    if args.supervised:
        from saemnesia_tools.training.supervised import finetune_supervised

        if not args.init:
            raise ValueError("--supervised needs --init <unsupervised SAE file>")
        cfg = SupervisedConfig(
            beta=args.beta, eta=args.eta, l1=args.l1, lr=args.lr if args.lr is not None else 5e-6,
            batch_records=args.batch_records, max_epochs=args.epochs or 150, patience=args.patience,
            val_fraction=args.val_fraction, grad_clip=args.grad_clip or None, rec_loss=args.rec_loss,
            ca_post_relu=args.ca_post_relu, num_buckets=args.buckets, seed=args.seed, exclusivity=args.exclusivity,
            priority_groups=tuple(g for g in args.priority_groups.split(",") if g))
        result = finetune_supervised(args.init, args.data, cfg, out=args.out, checkpoint_dir=args.checkpoint_dir,
                                     model_family=args.family, ctx=ctx, progress=not args.quiet)
        if ctx.is_main:
            print(f"wrote {args.out}: {len(result.concepts)} concepts after {len(result.history)} epochs")
            print(format_selectivity(result))
        return
    from saemnesia_tools.training.trainer import train_unsupervised

    cfg = TrainConfig(
        expansion_factor=args.expansion, num_latents=args.num_latents, k=args.k, batch_topk=not args.no_batch_topk,
        input_unit_norm=args.input_unit_norm, batch_size=args.batch_size, epochs=args.epochs or 5,
        max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps, auxk_alpha=args.auxk_alpha,
        dead_tokens_threshold=args.dead_tokens, b_dec_init=args.b_dec_init, sparse_grad=not args.dense_grad,
        seed=args.seed, shuffle_buffer_tokens=args.shuffle_buffer, checkpoint_every=args.checkpoint_every)
    result = train_unsupervised(args.data, cfg, out=args.out, checkpoint_dir=args.checkpoint_dir,
                                model_family=args.family, ctx=ctx, progress=not args.quiet)
    if ctx.is_main:
        final = result.history[-1] if result.history else {}
        print(f"wrote {args.out} after {result.steps} steps: {json.dumps(final)}")


def format_selectivity(result) -> str:
    """The assignment and, per concept, unsupervised -> supervised: selectivity and AUROC of the assigned latent,
    its share of the concept's mean difference, other latents with AUROC > 0.8 (DESIGN §4.3-4.4), as a text table."""
    width = max((len(c.label) for c in result.concepts), default=5)
    lines = [f"{'concept':<{width}}  group     latent  selectivity   AUROC         mean-diff share  other latents"]
    rows = zip(result.selectivity_before, result.selectivity_after, result.centralisation_before,
               result.centralisation_after)
    for b, a, cb, ca in rows:
        lines.append(f"{a['label']:<{width}}  {a['group']:<8}  {a['latent']:>6}  "
                     f"{b['selectivity']:.2f} -> {a['selectivity']:.2f}  {cb['auroc']:.2f} -> {ca['auroc']:.2f}  "
                     f"{cb['mean_difference_share']:>5.2f} -> {ca['mean_difference_share']:<5.2f}    "
                     f"{cb['other_latents_above']:>3} -> {ca['other_latents_above']}")
    return "\n".join(lines)


def _stats(args) -> None:
    from saemnesia_tools.training.statistics import compute_statistics

    ctx = _context(args)
    result = compute_statistics(args.sae, args.data, mode=args.mode, num_buckets=args.buckets,
                                percentile=args.percentile, default_strength=args.strength, out=args.out, ctx=ctx,
                                progress=not args.quiet)
    if ctx.is_main:
        print(f"wrote {args.out}: {len(result.concepts)} concepts ({result.selection_mode}), "
              f"{result.num_buckets} buckets")
