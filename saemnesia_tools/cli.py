"""The `saemnesia` console script.

Subcommands are added by registrars in COMMAND_REGISTRARS: each takes the argparse subparsers object, adds its
parser and sets `func` (called with the parsed args; returns an exit code or None). SAEFileError and
UnknownConceptError become a one-line error and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

from saemnesia_core import __version__
from saemnesia_core.concepts import MAX_CALIBRATION, with_calibrations
from saemnesia_core.concepts import UnknownConceptError
from saemnesia_core.concept_statistics import DEFAULT_PERCENTILE, import_concept_statistics
from saemnesia_core.importers import LAYOUTS, load_any
from saemnesia_core.sae_file import SAEFile, SAEFileError, is_sae_file, load_sae_file, save_sae_file
from saemnesia_core.sae_format import SIGNALS, STRENGTH_UNITS, TOKEN_LAYOUTS
from saemnesia_tools.training import commands as training_commands


def register_inspect(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show an SAE file or checkpoint folder: dims, hookpoint, concepts",
                              description="Show what an SAE file (or an importable checkpoint folder) holds.")
    p.add_argument("path", metavar="FILE|FOLDER")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_reading_options(p)
    p.set_defaults(func=_inspect)


def register_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a sparsify/SAeUron/SAEmnesia checkpoint (+ concept statistics) to an SAE file",
        description="Write SRC (an SAE file or a checkpoint folder) as one SAEmnesia .safetensors file, optionally "
                    "with concepts from SAeUron/SAEmnesia statistics (selected by score per timestep bucket).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--concept-stats", metavar="PKL", help="pickle {concept: tensor[n_prompts, steps, n_latents]}")
    p.add_argument("--class-params", metavar="PTH", help="class_params.pth {concept: {percentile, multiplier}}")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"selection percentile for concepts without class params (default {DEFAULT_PERCENTILE})")
    p.add_argument("--group", default="object", help="concept group of the imported concepts (default object)")
    add_reading_options(p)
    p.set_defaults(func=_convert)


def add_reading_options(p) -> None:
    """What a checkpoint's layout cannot tell: its block, model, what it reads and its strength unit."""
    p.add_argument("--hookpoint", help="diffusers-style hookpoint, e.g. unet.up_blocks.1.attentions.1 or "
                                       "transformer.transformer_blocks.18 (needed where the folder's name does not "
                                       "say)")
    p.add_argument("--model-family", "--family", dest="family", help="base model family, e.g. sd15, sdxl, flux, toy")
    p.add_argument("--layout", choices=list(LAYOUTS),
                   help="the checkpoint's layout, when its files do not tell: " +
                        "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    p.add_argument("--reads", choices=SIGNALS, help="what the SAE reads at its block: the output, or the update "
                                                    "(output − input; SAEmnesia's residual_sae, sdxl-unbox, the Flux "
                                                    "SAE)")
    p.add_argument("--tokens", choices=list(TOKEN_LAYOUTS), help="which of the block's tokens it was trained on")
    p.add_argument("--strength-unit", choices=STRENGTH_UNITS,
                   help="what a strength multiplies: the concept's mean activation, or SAEmnesia's beta (use_beta)")


def reading_options(args) -> dict:
    return {"hookpoint": args.hookpoint, "model_family": args.family, "layout": args.layout, "reads": args.reads,
            "tokens": args.tokens, "strength_unit": args.strength_unit}


def register_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="store each concept's calibration kappa: strength -1 then means 'erase it' (DESIGN 6.7)",
        description="Write κ into the concepts of an SAE file. A calibrated concept's firing latent becomes "
                    "γ·κ·‖x − b_dec‖ (the token's own norm) instead of z·γ·μ, so one strength means the same for "
                    "every concept and γ = -1, the node's default, is the strength κ was measured to erase at. "
                    "The toy build finds κ per concept with its judges; for other models, measure it on your own "
                    "images (e.g. with Erase Concepts at several κ) and store it here.")
    p.add_argument("path", metavar="FILE")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--kappa", type=float, help=f"κ in (0, {MAX_CALIBRATION:g}]")
    group.add_argument("--clear", action="store_true", help="remove the calibration (back to z·γ·μ)")
    p.add_argument("--concepts", help="comma-separated labels (default: every concept of the file)")
    p.add_argument("--out", help="write here instead of replacing FILE")
    p.set_defaults(func=_calibrate)


PLUGIN_GROUP = "saemnesia.commands"


def register_plugin_commands(subparsers) -> None:
    """Commands other installed packages register under the entry-point group PLUGIN_GROUP (`saemnesia eval` comes
    from saemnesia_comfy, which needs ComfyUI): each is `main(argv) -> exit code`, loaded only when its command
    runs, so this library never imports what a plugin needs. Arguments are passed through as they are
    (prefix_chars="+" keeps argparse from reading "--flags" here; the plugin parses them, --help included)."""
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        provider = entry.value.split(":")[0]
        p = subparsers.add_parser(entry.name, help=f"provided by {provider}; see `saemnesia {entry.name} --help`",
                                  add_help=False, prefix_chars="+")
        p.add_argument("argv", nargs="*")
        p.set_defaults(func=lambda args, entry=entry: entry.load()(args.argv))


COMMAND_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_inspect, register_convert, register_calibrate, training_commands.register, register_plugin_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saemnesia", description="SAEmnesia: concept erasure with sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (SAEFileError, UnknownConceptError) as e:
        print(f"saemnesia {args.command}: error: {printable(str(e))}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------- commands


def _inspect(args) -> None:
    path = Path(args.path)
    ours = path.is_file() and path.suffix == ".safetensors" and is_sae_file(path)
    sae_file = load_any(path, **reading_options(args))
    if ours:
        kind = f"saemnesia SAE file v{sae_file.header.format_version}"
    else:
        kind = f"{sae_file.provenance['imported_from']['format']} checkpoint (import it with saemnesia convert)"
    info = {"format": kind, **describe(sae_file)}
    print(json.dumps(info, indent=2) if args.json else _format(info))


def _convert(args) -> None:
    if args.class_params and not args.concept_stats:
        raise SAEFileError("--class-params needs --concept-stats")
    sae_file = load_any(args.src, **reading_options(args))
    if args.concept_stats:
        sae_file = import_concept_statistics(sae_file, args.concept_stats, args.class_params,
                                             percentile=args.percentile, group=args.group)
    save_sae_file(sae_file, args.out)
    print(f"wrote {args.out}: {len(sae_file.concepts)} concepts, hookpoint {sae_file.hookpoint}, model family "
          f"{sae_file.model_family}" + (" (give --model-family)" if sae_file.model_family == "unknown" else "") +
          f"; reads {sae_file.reads_text}")


def _calibrate(args) -> None:
    sae_file = load_sae_file(args.path)
    known = [c.label for c in sae_file.concepts]
    labels = known if args.concepts is None else [label.strip() for label in args.concepts.split(",")]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise UnknownConceptError(unknown, known)
    kappa = None if args.clear else args.kappa
    concepts = with_calibrations(sae_file.concepts, dict.fromkeys(labels, kappa))
    out = args.out or args.path
    save_sae_file(replace(sae_file, concepts=concepts), out)  # validated first: a κ outside its range is refused
    print(f"wrote {out}: " + (f"κ = {kappa:g}" if kappa is not None else "no calibration") + f" for {', '.join(labels)}")


def describe(f: SAEFile) -> dict:
    """What `inspect` shows, as plain JSON data."""
    concepts = []
    for c, concept in enumerate(f.concepts):
        selected = sorted(set(f.tables.latents[c].flatten().tolist()) - {-1})
        concepts.append({"label": concept.label, "group": concept.group, "latent": concept.latent,
                         "default_strength": concept.default_strength, "calibration": concept.calibration,
                         "selected_latents": selected})
    return {
        "d_in": f.config.d_in, "num_latents": f.config.num_latents, "k": f.config.k,
        "input_unit_norm": f.config.input_unit_norm, "dtype": str(f.weights["encoder.weight"].dtype).removeprefix("torch."),
        "hookpoint": f.hookpoint, "model_family": f.model_family, "num_buckets": f.num_buckets,
        "reads": f.reads, "tokens": f.tokens, "pre_encoder": f.config.pre_encoder, "strength_unit": f.strength_unit,
        "reads_text": f.reads_text, "latent_means": f.latent_means is not None,
        "supervised": f.supervised, "selection_mode": f.selection_mode, "concepts": concepts,
        "provenance": f.provenance,
    }


def printable(text: str) -> str:
    """Control and format characters escaped: what a file says must not drive the terminal (ANSI escapes)."""
    return "".join(ch.encode("unicode_escape").decode() if unicodedata.category(ch).startswith("C") else ch
                   for ch in text)


def _format(info: dict) -> str:
    lines = [
        f"format        {info['format']}",
        f"hookpoint     {info['hookpoint']}",
        f"reads         {info['reads_text']}",
        f"model family  {info['model_family']}",
        f"d / n / k     {info['d_in']} / {info['num_latents']} / {info['k']}"
        + ("  (input_unit_norm)" if info["input_unit_norm"] else ""),
        f"dtype         {info['dtype']}",
        f"buckets       {info['num_buckets']}",
        f"selection     {info['selection_mode']}" + ("  (supervised SAE)" if info["supervised"] else ""),
        "strength      in units of " + ("β = ‖z‖ / ‖W_dec[i]‖ (SAEmnesia's use_beta)"
                                         if info["strength_unit"] == "beta" else "the concept's mean activation") +
        ("; each latent's mean activation is kept (#N latents use it)" if info["latent_means"] else ""),
        f"concepts      {len(info['concepts'])}" + (
            "" if info["concepts"] else "  (none yet: Find Concept Latents teaches one; #N erases latent N)"),
    ]
    width = max((len(c["label"]) for c in info["concepts"]), default=0)
    for c in info["concepts"]:
        if c["latent"] is not None:
            where = f"latent {c['latent']}"
        else:
            where = f"latents {', '.join(map(str, c['selected_latents']))} (by score, across buckets)"
        calibrated = f"  calibrated κ {c['calibration']:g}" if c["calibration"] is not None else ""
        lines.append(f"  {c['label']:<{width}}  {c['group']:<8} {where}  strength {c['default_strength']:g}{calibrated}")
    return "\n".join(map(printable, lines))


if __name__ == "__main__":
    sys.exit(main())
