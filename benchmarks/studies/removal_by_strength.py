# SPDX-License-Identifier: GPL-3.0-or-later
"""Does any strength remove the concept, rather than turn it into another?

The quick evaluation scans γ for every target on its selection set (SAEmnesia in exact and paper mode, the
text-encoder SAE, SAeUron with 1 or 2 latents per bucket) and keeps UA and IRA per setting, not what became of the
target. This study scores the target's images of every one of those settings again, from the evaluation's image
cache (nothing is generated once `saemnesia eval` has run): UA, AR, RM (removed, not replaced: for objects no
object left, for styles judged unstyled; DESIGN §9) and CR, the share both removed and not flagged as broken (a
clean removal). Per target, the best CR over all settings answers the question.
Writes benchmarks/studies/results/removal_by_strength.json, .md and .png.

    .venv/bin/python benchmarks/studies/removal_by_strength.py    # about two minutes with the evaluation's cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_tools.comfyui.toy.eval_runner import DEFAULT_ASSETS, Runner
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.toy.assets import REPO_ROOT
from saemnesia_tools.toy.evaluation.protocol import QUICK, TEXT, Setting, selection_items
from saemnesia_tools.toy.evaluation.quality import removed

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (label, SAE method, mode, SAeUron latents per bucket) for each scan of the evaluation's selection step
SCANS = [("SAEmnesia exact", "saemnesia", "exact", 0), ("SAEmnesia paper", "saemnesia", "paper", 0),
         ("text encoder", TEXT, "exact", 0), *[(f"SAeUron, {k} per bucket", "saeuron", "exact", k) for k in QUICK.kept]]


def score(runner: Runner, group: str, concept: str, scan, gamma: float) -> dict:
    """UA, AR, RM and CR on the target's images of the selection set under one setting of the scan."""
    _, method, mode, kept = scan
    items = selection_items(group, concept, QUICK)
    judged, images = runner.judge(Setting((method, group), ((concept, gamma, kept),), mode=mode), items)
    rows = [k for k, j in enumerate(judged) if j.item.concept(group) == concept]
    target = torch.from_numpy(images[rows])
    judge = runner.artifact_judge()
    flagged = judge.flags(target)
    is_removed = removed(judge, [judged[k].predicted(group) for k in rows], target, group)
    gone = torch.tensor([judged[k].predicted(group) != concept for k in rows])
    share = lambda flags: round(float(flags.double().mean()), 4)
    return {"gamma": gamma, "UA": share(gone), "AR": share(flagged), "RM": share(is_removed),
            "CR": share(is_removed & ~flagged), "images": len(rows)}


def plot(result: dict, path: Path) -> None:
    groups = list(result["targets"])
    fig, axes = plt.subplots(len(groups), len(SCANS), figsize=(3.2 * len(SCANS), 3 * len(groups)), squeeze=False,
                             sharey=True)
    for r, group in enumerate(groups):
        for c, (label, *_) in enumerate(SCANS):
            ax = axes[r][c]
            for concept, scans in result["targets"][group].items():
                rows = scans[label]
                ax.plot([-row["gamma"] for row in rows], [100 * row["CR"] for row in rows], marker="o", label=concept)
            ax.set_xscale("log")
            ax.set_title(f"{group}s: {label}", fontsize=9)
            ax.set_xlabel("−γ")
            if c == 0:
                ax.set_ylabel("clean removal CR (%)")
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    counts = [f"{next(iter(best.values()))['images']} per {group}" for group, best in result["best"].items()]
    lines = ["# Does any strength remove the concept?", "",
             f"Every setting the quick evaluation scans on its selection set, scored on the target's images "
             f"({', '.join(counts)}): UA / RM / AR / CR in % (RM: removed, not replaced; CR: removed and not flagged "
             "as broken). Written by `benchmarks/studies/removal_by_strength.py` from the evaluation's image cache.",
             "", "Best clean removal per target over every setting:", "",
             "| target | best CR | at | UA / RM / AR there |", "|---|---:|---|---|"]
    for group, per_concept in result["targets"].items():
        for concept, best in result["best"][group].items():
            where, there = "no setting", "—"
            if best["CR"] > 0:
                where = f"{best['scan']}, γ {best['gamma']:g}"
                there = " / ".join(f"{100 * best[k]:.1f}" for k in ("UA", "RM", "AR"))
            lines.append(f"| {concept} ({group}) | {100 * best['CR']:.1f} | {where} | {there} |")
    for group, per_concept in result["targets"].items():
        for label, *_ in SCANS:
            gammas = [row["gamma"] for row in next(iter(per_concept.values()))[label]]
            lines += ["", f"## {group}s, {label}", "", "| target | " + " | ".join(f"γ {g:g}" for g in gammas) + " |",
                      "|---|" + "---|" * len(gammas)]
            for concept, scans in per_concept.items():
                cells = [" / ".join(f"{100 * row[k]:.0f}" for k in ("UA", "RM", "AR", "CR")) for row in scans[label]]
                lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "![clean removal by strength](removal_by_strength.png)", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "runs" / "eval_cache", help="the evaluation's images")
    args = p.parse_args()
    runner = Runner(DEFAULT_ASSETS, QUICK, args.cache, progress=False)
    for group, _ in QUICK.targets():
        runner.prepare_saeuron(group)
    targets, best = {}, {}
    for group, concepts in QUICK.targets():
        targets[group], best[group] = {}, {}
        for concept in concepts:
            scans = {scan[0]: [score(runner, group, concept, scan, g) for g in QUICK.gammas] for scan in SCANS}
            targets[group][concept] = scans
            label, row = max(((label, row) for label, rows in scans.items() for row in rows),
                             key=lambda pair: pair[1]["CR"])
            best[group][concept] = {"scan": label, **row}
    result = {"targets": targets, "best": best, "images_generated": runner.generated,
              "method": "benchmarks/studies/removal_by_strength.py on the quick evaluation's selection images"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "removal_by_strength.json", result, indent=2)
    write_bytes_atomic(RESULTS / "removal_by_strength.md", markdown(result).encode())
    plot(result, RESULTS / "removal_by_strength.png")
    print(markdown(result).split("\n## ")[0])
    print(f"images generated: {runner.generated}")


if __name__ == "__main__":
    main()
