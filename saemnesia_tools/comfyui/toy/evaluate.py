"""`saemnesia eval`: the miniature UnlearnCanvas evaluation on the toy world, run end to end (DESIGN §9).

The protocol (what is generated, the methods compared), the metrics and the reports are ComfyUI-free and live in
`saemnesia_tools.toy.evaluation`; this module runs them: `Runner` generates and judges images through the Erase
Concepts node's own patch path, `evaluate` chooses each method's setting on the selection set and measures it
on the test set, plus sequential erasure of the objects and the targets under rephrased prompts. Both SAE
methods erase objects with the SAEs at one block and styles with those at another (`saemnesia_tools.toy.assets`);
the multi-site row adds the SAEmnesia file at the 16x16 encoder level to each (DESIGN §6.6); the text-encoder SAE
erases both in the prompt's conditioning (DESIGN §6.8).

    saemnesia eval                  # quick (QUICK; it prints how many images it makes at most)
    saemnesia eval --full           # every concept, 5 test seeds per prompt (hours; resumable)

Generated images are cached by content (model, SAE files, setting, prompts, seeds, steps) under --cache, so a
rerun only judges, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saemnesia_tools.toy.assets import REPO_ROOT
from saemnesia_tools.toy.evaluation.metrics import (best_candidate, erasure_metrics, judged_as, selection_score,
                                                   summarize)
from saemnesia_tools.toy.evaluation.protocol import (FULL, MULTI_SITE, OBJECT, QUICK, SAE_METHODS, STYLE, TEXT, Item,
                                                    Protocol, Setting, default_setting, example_cells, grid_items,
                                                    planned_images, rephrase_items, selection_items)
from saemnesia_tools.toy.evaluation.quality import quality_metrics
from saemnesia_tools.toy.evaluation.report import Results, shown_path, summary_table, write_reports
from saemnesia_tools.toy.render import OBJECTS, STYLES

from .eval_runner import DEFAULT_ASSETS, Runner


def evaluate(runner: Runner, mode: str = "custom") -> Results:
    """Every target of the runner's protocol, each method chosen on the selection set and measured on the test set;
    then sequential erasure and the summary."""
    P = runner.protocol
    start = time.time()
    results = Results({"mode": mode, "protocol": asdict(P), "assets": {
        k: {"path": shown_path(p), "sha256": runner.digests[k]} for k, p in runner.assets.items()}})
    results.data["saeuron_selection"] = {g: runner.prepare_saeuron(g) for g, _ in P.targets()}
    results.data["text_sae"] = {"hookpoint": runner.text_sae.file.hookpoint,
                                "num_latents": runner.text_sae.file.config.num_latents}
    runner.bar = tqdm(total=planned_images(P), desc="eval images", unit="img", disable=not runner.progress,
                      smoothing=0.05)
    artifacts = runner.artifact_judge()
    results.data["artifact_judge"] = {"threshold": artifacts.threshold,
                                      "border_off_colour": artifacts.cue_thresholds[0],
                                      "stray_object_pixels": artifacts.cue_thresholds[1]}
    tests = grid_items(P.test_seeds)
    no_erasure = runner.judge(Setting(), tests)
    reference = runner.kid_reference()
    targets, chosen = {OBJECT: {}, STYLE: {}}, {}
    for group, concepts in P.targets():
        for concept in concepts:
            targets[group][concept], chosen[concept] = evaluate_target(runner, group, concept, tests, no_erasure,
                                                                       reference, results.examples)
    results.data["targets"] = targets
    results.data["sequential"] = sequential(runner, chosen, tests)
    runner.bar.close()
    results.data["summary"] = summarize(targets, P)
    results.data["cost"] = {"images_generated": runner.generated, "images_from_cache": runner.cached,
                            "minutes": round((time.time() - start) / 60, 1), "torch_threads": torch.get_num_threads(),
                            "cpus": os.cpu_count()}
    return results


def evaluate_target(runner: Runner, group: str, concept: str, tests: list[Item], no_erasure, reference: dict,
                    examples: dict):
    """One target: γ (and SAeUron's latents per bucket) chosen by (UA + IRA)/2 on the selection set, then every
    method on the test set and on rephrased prompts. Returns the target's results and the chosen erase entries."""
    P = runner.protocol
    select = selection_items(group, concept, P)
    sae = {method: (method, group) for method in (*SAE_METHODS, TEXT)}

    def candidate(method, gamma, kept, mode="exact"):
        setting = Setting(sae[method], ((concept, gamma, kept),), mode=mode)
        m = erasure_metrics(runner.judge(setting, select)[0], group, {concept})
        return {**({"kept": kept} if method == "saeuron" else {}), "gamma": gamma, **m, "score": selection_score(m)}

    candidates = {"saemnesia": [candidate("saemnesia", gamma, 0) for gamma in P.gammas],
                  "saemnesia_paper": [candidate("saemnesia", gamma, 0, "paper") for gamma in P.gammas],
                  "saeuron": [candidate("saeuron", gamma, kept) for kept in P.kept for gamma in P.gammas],
                  "text": [candidate(TEXT, gamma, 0) for gamma in P.gammas]}
    sm, sp = best_candidate(candidates["saemnesia"]), best_candidate(candidates["saemnesia_paper"])
    st = best_candidate(candidates["text"])
    su = best_candidate(candidates["saeuron"])
    chosen = {"saemnesia": (concept, sm["gamma"], 0), "saeuron": (concept, su["gamma"], su["kept"])}
    settings = {"none": Setting(), "saemnesia": Setting(sae["saemnesia"], (chosen["saemnesia"],)),
                "saemnesia_gamma1": Setting(sae["saemnesia"], ((concept, -1.0, 0),)),
                "saemnesia_multisite": Setting((MULTI_SITE, group), ((concept, -1.0, 0),)),
                "saemnesia_uncalibrated": Setting(sae["saemnesia"], ((concept, -1.0, 0),), uncalibrated=True),
                "saemnesia_paper": Setting(sae["saemnesia"], ((concept, sp["gamma"], 0),), mode="paper"),
                "saemnesia_paper_gamma1": Setting(sae["saemnesia"], ((concept, -1.0, 0),), mode="paper"),
                "saeuron": Setting(sae["saeuron"], (chosen["saeuron"],)),
                "replace": Setting(sae["saemnesia"], ((concept, -1.0, 0),), mode="replace"),
                "text": Setting(sae[TEXT], ((concept, st["gamma"], 0),)),
                "text_gamma1": Setting(sae[TEXT], ((concept, -1.0, 0),)),
                "negative": Setting(negative=concept), "default": default_setting(group, concept)}
    test, rephrased = {}, {}
    for method, setting in settings.items():
        judged, images = no_erasure if method == "none" else runner.judge(setting, tests)
        test[method] = {**erasure_metrics(judged, group, {concept}),
                        **quality_metrics(runner.artifact_judge(), judged, images, group, {concept}, reference),
                        "judged_as": judged_as(judged, group, concept)}
        for cell in example_cells(group, concept):
            pos = next(k for k, j in enumerate(judged) if (j.item.obj, j.item.style) == cell)
            examples.setdefault(method, []).append((f"{concept}: {cell[0]}/{cell[1] or 'unstyled'}", images[pos]))
        rephrased[method] = erasure_metrics(
            runner.judge(setting, rephrase_items(group, concept, P.rephrase_seeds))[0], group, {concept})["UA"]
    entry = {"chosen": {"saemnesia": {"gamma": sm["gamma"]}, "saemnesia_paper": {"gamma": sp["gamma"]},
                        "saeuron": {"kept": su["kept"], "gamma": su["gamma"]}, "text": {"gamma": st["gamma"]}},
             "selection": candidates, "test": test, "rephrased_UA": rephrased}
    return entry, chosen


def sequential(runner: Runner, chosen: dict, tests: list[Item]) -> dict:
    """Objects erased one after another (1…N, in the order of the targets) with each concept's chosen setting."""
    order = list(runner.protocol.object_targets)
    rows = {}
    for method in SAE_METHODS:
        rows[method] = []
        for j in range(1, len(order) + 1):
            setting = Setting((method, OBJECT), tuple(chosen[c][method] for c in order[:j]))
            judged, _ = runner.judge(setting, tests)
            rows[method].append({"erased": order[:j], **erasure_metrics(judged, OBJECT, order[:j])})
    return {"order": order, "rows": rows}


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saemnesia eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="quick mode: objects " + ", ".join(QUICK.object_targets) + "; styles "
                                       + ", ".join(QUICK.style_targets) + f"; {QUICK.test_seeds} test seed per "
                                       f"prompt; selection on every image of the target + {QUICK.select_others} of "
                                       f"each other concept; {QUICK.steps} steps; γ in {QUICK.gammas}; SAeUron latents per "
                                       f"bucket {QUICK.kept}.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="the default")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    p.set_defaults(mode="quick")
    p.add_argument("--out", type=Path, help="report folder (default benchmarks/results/eval_<mode>)")
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "runs" / "eval_cache", help="generated images")
    for name, path in DEFAULT_ASSETS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=Path, default=path, help=f"default {shown_path(path)}")
    g = p.add_argument_group("overrides of the mode's protocol")
    g.add_argument("--objects", type=_csv(str), help="object targets, comma-separated ('' = none)")
    g.add_argument("--styles", type=_csv(str), help="style targets, comma-separated ('' = none)")
    g.add_argument("--test-seeds", type=int)
    g.add_argument("--select-seeds", type=int)
    g.add_argument("--select-others", type=int)
    g.add_argument("--rephrase-seeds", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--gammas", type=_csv(float), help="comma-separated; write --gammas=-1,-5 (a value starting with - needs the =)")
    g.add_argument("--kept", type=_csv(int), help="SAeUron latents per bucket, e.g. 1,2,3")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def protocol_from_args(args) -> Protocol:
    overrides = {"object_targets": args.objects, "style_targets": args.styles, "test_seeds": args.test_seeds,
                 "select_seeds": args.select_seeds, "select_others": args.select_others,
                 "rephrase_seeds": args.rephrase_seeds, "steps": args.steps, "gammas": args.gammas, "kept": args.kept}
    protocol = replace(QUICK if args.mode == "quick" else FULL, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [c for c in protocol.object_targets if c not in OBJECTS] + \
              [c for c in protocol.style_targets if c not in STYLES]
    if unknown:
        raise SystemExit(f"saemnesia eval: unknown targets {unknown}; objects {OBJECTS}, styles {STYLES}")
    return protocol


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = protocol_from_args(args)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"eval_{args.mode}"
    assets = {name: getattr(args, name) for name in DEFAULT_ASSETS}
    print(f"saemnesia eval ({args.mode}): at most {planned_images(protocol)} images at {protocol.steps} steps; "
          f"cache {args.cache}", flush=True)
    runner = Runner(assets, protocol, args.cache, progress=not args.no_progress)
    results = evaluate(runner, args.mode)
    write_reports(results, out)
    runner.artifact_judge().save(out / "artifact_judge.safetensors")  # the demo flags its images with it
    print(summary_table(results.data))
    print(f"wrote {out}/results.json, report.md, README_snippet.md and plots ({results.data['cost']['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
