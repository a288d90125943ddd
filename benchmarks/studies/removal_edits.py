# SPDX-License-Identifier: GPL-3.0-or-later
"""Which edit removes a concept, rather than turning it into another or breaking the image? (issue 32, item 2)

Every candidate is one setting for every concept of a group (no per-concept or per-image search), run through the
Erase Concepts node's own patch path on the quick evaluation's selection set (the target's every cell and a few of
each other concept's, seeds of their own; `protocol.selection_items`), and scored as the evaluation scores: UA,
IRA, CRA (metrics.py), RM (removed, not replaced) and AR (flagged by the artifact judge) on the target's images,
averaged over the quick targets. No erasure is the first row. Among the candidates one Erase Concepts node expresses
(DESIGN §6.10), the node's default becomes the one with the highest RM averaged over the two groups (it is one
setting for every concept), then the one meeting more of the bar (UA ≥ 95, RM ≥ 80, IRA and CRA at most 3 below no
erasure, AR at most 10 above) summed over the groups. The rule fixed before the world with absence was measured put
the bar count first; it chose replace mode, which removes nothing (RM 0 in both groups) and meets the IRA and CRA
terms by barely acting, so removal now comes first. Both choices are in the results.

Candidates: the current modes at the shipped calibration (exact γ −1, replace −1), shift mode (DESIGN §6.9) on the
cond branch at γ −1, −1.5, −2, the group's multi-site chain in exact and shift mode, and the text encoder's SAE; then
the ones tried after the world with absence was measured: detect-and-replace (and shift) at the 16x16 encoder block,
where an object covers some tokens and not others (at the 8x8 object site the latent fires on most tokens of the cond
branch, so the nearest undetected token is background copied everywhere); the text encoder and the group's block
together (two nodes, the node's default at the block); and multi-site shift with the strengths per block chosen
jointly from a grid (one node per block, γ ∈ {−1, −2} at each), the best of which is reported per group.

    .venv/bin/python benchmarks/studies/removal_edits.py    # with the evaluation's image cache where it has them

Writes benchmarks/studies/results/removal_edits.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.comfyui.toy.eval_runner import DEFAULT_ASSETS, Runner
from saemnesia_tools.toy.assets import REPO_ROOT
from saemnesia_tools.toy.evaluation.metrics import erasure_metrics, mean
from saemnesia_tools.toy.evaluation.protocol import (ENCODER_BLOCK, MULTI_SITE, QUICK, TEXT, Setting,
                                                    selection_items)
from saemnesia_tools.toy.evaluation.quality import removed
from saemnesia_tools.toy.evaluation.report import DEFAULT_BAR

RESULTS = Path(__file__).resolve().parent / "results"


class Candidate(NamedTuple):
    """One edit for every concept of a group: Setting's fields (protocol.Setting) with the concept left out."""
    sae: str  # Setting.sae's method
    mode: str
    branches: str
    strength: float
    site_strengths: tuple[float, ...] = ()
    text_strength: float = 0.0


CANDIDATES = {
    "exact, γ −1 (the node's default before this study)": Candidate("saemnesia", "exact", "both", -1.0),
    "replace, −1": Candidate("saemnesia", "replace", "both", -1.0),
    **{f"shift, cond, γ −{-g:g}": Candidate("saemnesia", "shift", "cond", g) for g in (-1.0, -1.5, -2.0)},
    "multi-site exact, γ −1": Candidate(MULTI_SITE, "exact", "both", -1.0),
    "multi-site shift, cond, γ −1.5": Candidate(MULTI_SITE, "shift", "cond", -1.5),
    "text encoder, γ −1": Candidate(TEXT, "exact", "both", -1.0),
    "encoder block (16x16) replace, −1": Candidate(ENCODER_BLOCK, "replace", "both", -1.0),
    "encoder block (16x16) shift, cond, γ −2": Candidate(ENCODER_BLOCK, "shift", "cond", -2.0),
    "text encoder γ −1 + shift, cond, γ −2": Candidate("saemnesia", "shift", "cond", -2.0, text_strength=-1.0),
    **{f"multi-site shift, cond, γ −{-a:g} (encoder block) / −{-b:g} (own block)":
       Candidate(MULTI_SITE, "shift", "cond", b, site_strengths=(a, b)) for a in (-1.0, -2.0) for b in (-1.0, -2.0)},
}
JOINT = [name for name, c in CANDIDATES.items() if c.site_strengths]  # the per-block grid, chosen jointly
METRICS = ("UA", "RM", "AR", "IRA", "CRA")


def scores(runner: Runner, group: str, concept: str, setting: Setting) -> dict:
    """The metrics of one setting on the target's selection set (fractions)."""
    items = selection_items(group, concept, QUICK)
    judged, images = runner.judge(setting, items)
    rows = [k for k, j in enumerate(judged) if j.item.concept(group) == concept]
    target = torch.from_numpy(images[rows]).float() / 255
    judge = runner.artifact_judge()
    return {**erasure_metrics(judged, group, [concept]),
            "RM": mean(removed(judge, [judged[k].predicted(group) for k in rows], target, group).tolist()),
            "AR": mean(judge.flags(target).tolist())}


def setting_of(group: str, concept: str, c: Candidate) -> Setting:
    return Setting((c.sae, group), ((concept, c.strength, 0),), mode=c.mode, branches=c.branches,
                   site_strengths=c.site_strengths, text_strength=c.text_strength)


def meets(row: dict, none: dict) -> list[bool]:
    """The bar (report.DEFAULT_BAR), target by target: UA ≥ 95, RM ≥ 80, IRA and CRA at most 3 below no erasure, AR
    at most 10 above."""
    b = {k: v / 100 for k, v in DEFAULT_BAR.items()}
    return [row["UA"] >= b["UA"], row["RM"] >= b["RM"], row["IRA"] >= none["IRA"] - b["IRA"],
            row["CRA"] >= none["CRA"] - b["CRA"], row["AR"] <= none["AR"] + b["AR"]]


def node_default(groups: dict, bar_first: bool = False, any_sites: bool = False) -> str:
    """Of the candidates one Erase Concepts node expresses (the group's own SAEmnesia file), the one with the highest
    RM averaged over the groups, then meeting more of the bar summed over them (DESIGN §6.10); `bar_first`: the
    rule fixed before the results, the two keys the other way round; `any_sites`: the same rule over every candidate
    (other blocks, several nodes, the text encoder), to show whether a default of other sites would win."""
    def rank(name):
        rows = [part["settings"][name] for part in groups.values()]
        keys = sum(r["RM"] for r in rows) / len(rows), sum(r["bar_met"] for r in rows)
        return keys[::-1] if bar_first else keys
    return max((name for name, c in CANDIDATES.items()
                if any_sites or (c.sae == "saemnesia" and not c.text_strength)), key=rank)


def by_rule(settings: dict, names) -> str:
    """Of `names`, the one with the highest RM, then meeting more of the bar (the default's rule, in one group; with
    the bar first, an edit that barely acts wins on IRA, CRA and AR, as the encoder block alone does for objects)."""
    return max(names, key=lambda n: (settings[n]["RM"], settings[n]["bar_met"]))


def markdown(result: dict) -> str:
    b = DEFAULT_BAR
    lines = ["# Which edit removes?", "", "Written by `benchmarks/studies/removal_edits.py` on the quick evaluation's "
             f"selection set; means over its targets, in %. Bar: UA ≥ {b['UA']:g}, RM ≥ {b['RM']:g}, IRA/CRA ≥ no "
             f"erasure − {b['IRA']:g}, AR ≤ no erasure + {b['AR']:g}."]
    for group, part in result["groups"].items():
        lines += ["", f"## {group}s ({', '.join(part['targets'])})", "",
                  "| setting | " + " | ".join(METRICS) + " | bar met |", "|---|" + "---:|" * (len(METRICS) + 1)]
        for name, row in part["settings"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]:.1f}" for m in METRICS)
                         + f" | {row.get('bar_met', '—')} |")
        lines += ["", f"Best for {group}s (the highest RM, then the most of the bar): **{part['best']}**. Best strengths "
                  f"per block, chosen jointly: {part['best_per_block_strengths']}."]
    lines += ["", f"The node's default (the highest RM over both groups, then the most of the bar): "
              f"**{result['default']}** (the rule fixed before these results, the bar first: "
              f"{result['default_by_the_first_rule']}). The same rule over every candidate, sites and nodes "
              f"included: {result['default_among_every_candidate']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "runs" / "eval_cache", help="the evaluation's images")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    runner = Runner(DEFAULT_ASSETS, QUICK, args.cache, progress=False)
    groups = {}
    for group, targets in QUICK.targets():
        per_setting = {"no erasure": [scores(runner, group, c, Setting()) for c in targets]}
        for name, candidate in CANDIDATES.items():
            per_setting[name] = [scores(runner, group, c, setting_of(group, c, candidate)) for c in targets]
        settings = {name: {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}
                    for name, rows in per_setting.items()}
        none = settings["no erasure"]
        for name, row in settings.items():
            if name != "no erasure":
                row["bar_met"] = sum(meets(row, none))
        groups[group] = {"targets": list(targets), "settings": settings,
                         "best": by_rule(settings, [n for n in settings if n != "no erasure"]),
                         "best_per_block_strengths": by_rule(settings, JOINT),
                         "per_target": {n: dict(zip(targets, rows)) for n, rows in per_setting.items()}}
    result = {"written_by": "python benchmarks/studies/removal_edits.py", "groups": groups,
              "default": (default := node_default(groups)),
              "default_by_the_first_rule": node_default(groups, bar_first=True),
              "default_among_every_candidate": node_default(groups, any_sites=True),
              "default_setting": {k: v for k, v in CANDIDATES[default]._asdict().items()
                                  if k in ("sae", "mode", "branches", "strength")},
              "images_generated": runner.generated}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "removal_edits.json", result, indent=2)
    write_bytes_atomic(args.out / "removal_edits.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
