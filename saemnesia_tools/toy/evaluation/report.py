"""How evaluation results are shown: the summary table, the markdown report, the README snippet and the plots,
all written from the results JSON (DESIGN §9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from ..assets import REPO_ROOT
from ..prompts import HELD_OUT_TEMPLATES
from ..render import OBJECTS, STYLES
from .metrics import DEFINITIONS, mean
from .protocol import LOOKS, METHODS, OBJECT, QUALITY_FIT_SEEDS, STYLE


@dataclass
class Results:
    """Everything a run measured (`data`, written as JSON) and the example images for the figure."""

    data: dict
    examples: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)


def shown_path(path: Path) -> str:
    """Repository-relative when inside the repository (reports are committed), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _kid(v) -> str:
    return "—" if v is None else f"{1e3 * v:.1f}"


def _methods(data: dict) -> list[str]:
    """The methods a results file measured, in METHODS order (reports of older runs have fewer)."""
    return [m for m in METHODS if m in data["summary"]]


def _has_quality(data: dict) -> bool:
    return "artifact_judge" in data


def summary_table(data: dict) -> str:
    groups = [g for g in (OBJECT, STYLE) if data["targets"].get(g)]
    quality = _has_quality(data)
    head = "| method | configs searched / concept | " + " | ".join(
        f"{g.capitalize()} {m}" for g in groups for m in ("UA", "IRA", "CRA")) + " | Avg | UA, rephrased |"
    if quality:
        head += " " + " | ".join(f"{g.capitalize()} {m}" for g in groups for m in ("AR", "CE")) + " | KID ×10³ |"
    lines = [head, "|" + "---|" * (4 + 3 * len(groups) + (2 * len(groups) + 1 if quality else 0))]
    for method in _methods(data):
        s = data["summary"][method]
        cells = [_pct(s[g][m]) for g in groups for m in ("UA", "IRA", "CRA")]
        searched = s["configurations_searched"] or "—"
        row = (f"| {METHODS[method][0]} | {searched} | " + " | ".join(cells) + f" | {_pct(s['average'])} | "
               f"{_pct(s['rephrased_UA'])} |")
        if quality:
            kids = [s[g]["KID"] for g in groups if s[g].get("KID") is not None]
            row += " " + " | ".join(_pct(s[g].get(m)) for g in groups for m in ("AR", "CE")) + \
                f" | {_kid(sum(kids) / len(kids) if kids else None)} |"
        lines.append(row)
    return "\n".join(lines)


def protocol_text(data: dict) -> str:
    P = data["protocol"]
    sites = [f"{group} targets at `{sel['hookpoint']}` ({sel['num_latents']} latents; statistics from "
             f"{sel['heldout_samples']} held-out samples; kept " + ", ".join(
                 f"{m} at p = {v['percentile']:.4f}: measured {v['mean_latents_per_bucket']:.2f} latents/bucket"
                 for m, v in sel["kept"].items()) + ")" for group, sel in data["saeuron_selection"].items()]
    return "\n".join([
        f"- mode **{data['mode']}**; targets: objects {', '.join(P['object_targets']) or 'none'}; "
        f"styles {', '.join(P['style_targets']) or 'none'}",
        f"- test set: the full grid ({len(OBJECTS)} objects × ({len(STYLES)} styles + unstyled)) × {P['test_seeds']} "
        f"seed(s) per prompt = {len(OBJECTS) * len(LOOKS) * P['test_seeds']} images per configuration; Euler, "
        f"{P['steps']} steps, CFG {P['cfg']}",
        f"- selection set (other seeds): every image of the target + {P['select_others']} image(s) of each other "
        f"concept of its group, × {P['select_seeds']} seed(s); score (UA + IRA)/2",
        f"- γ grid {', '.join(f'{g:g}' for g in P['gammas'])}; SAEs and SAeUron selection: " + "; ".join(sites),
        *([f"- text encoder: one SAE for objects and styles at `{T['hookpoint']}` ({T['num_latents']} latents), "
           f"applied to every prompt's conditioning (the empty negative's too) before sampling"]
          if (T := data.get("text_sae")) else []),
        f"- rephrased prompts: the target's images in each of {len(HELD_OUT_TEMPLATES)} held-out wordings × "
        f"{P['rephrase_seeds']} seed(s)",
        *([f"- image quality: AR = the target's test images flagged by the artifact judge (fitted on renders and "
           f"{QUALITY_FIT_SEEDS} un-erased images per prompt, calibrated on one more: Mahalanobis threshold "
           f"{A['threshold']:.0f}, border off colour > {A['border_off_colour']:.3f}, stray object "
           f"pixels > {A['stray_object_pixels']:.0f}; validated in "
           f"benchmarks/studies/artifact_judge.py); KID of the other test images against the model's own un-erased "
           f"images of their prompts at another seed (the quality set's calibration seed); CE (clean erasure) = the "
           f"target's test images with the target gone and not flagged"]
          if (A := data.get("artifact_judge")) else []),
        f"- cost: {data['cost']['images_generated']} images generated, {data['cost']['images_from_cache']} from cache, "
        f"{data['cost']['minutes']} min ({data['cost']['torch_threads']} torch threads, {data['cost']['cpus']} CPUs)",
    ])


def _findings(data: dict) -> list[str]:
    """The summary's follow-ups (replace mode, the one setting against its bar and what the judges saw instead,
    paper vs exact, one block vs several, text encoder vs UNet), each with a blank line after."""
    return [line for text in (replace_findings(data), one_setting_findings(data), default_against_bar(data),
                              judged_instead(data), paper_and_exact(data), multi_site_findings(data),
                              text_findings(data)) if text for line in (text, "")]


def markdown_report(data: dict) -> str:
    lines = ["# Miniature UnlearnCanvas on the toy world", "", summary_table(data), "", *_findings(data), "## Protocol", "",
             protocol_text(data), "", "## Definitions", "", "```", DEFINITIONS, "```", "", "## Per concept (test set, %)", "",
             "| target | method | UA | IRA | CRA | UA rephrased | AR | CE | RM | KID ×10³ | chosen "
             "| target's images judged as |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for group, per_concept in data["targets"].items():
        for concept, t in per_concept.items():
            for method in _methods(data):
                label, m = METHODS[method][0], t["test"][method]
                chosen = ""
                if method in ("saemnesia", "saemnesia_paper", "text"):
                    chosen = f"γ = {t['chosen'][method]['gamma']:g}"
                elif method == "saeuron":
                    chosen = f"{t['chosen']['saeuron']['kept']} latent(s), γ = {t['chosen']['saeuron']['gamma']:g}"
                cells = [m["UA"], m["IRA"], m["CRA"], t["rephrased_UA"][method],
                         *(m.get(k) for k in ("AR", "CE", "RM"))]
                lines.append(f"| {concept} ({group}) | {label} | " + " | ".join(map(_pct, cells))
                             + f" | {_kid(m.get('KID'))} | {chosen} | {_judged_as(m)} |")
    seq = data["sequential"]
    if seq["order"]:
        lines += ["", "## Sequential erasure of objects (%)", "", f"Order: {', '.join(seq['order'])}.", "",
                  "| erased | " + " | ".join(f"{METHODS[m][0]} {k}" for m in seq["rows"] for k in ("UA", "IRA", "CRA"))
                  + " |", "|---|" + "---:|" * (3 * len(seq["rows"]))]
        for j in range(len(seq["order"])):
            cells = [_pct(seq["rows"][m][j][k]) for m in seq["rows"] for k in ("UA", "IRA", "CRA")]
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
    lines += ["", "![per concept](per_concept.png)", "", "![sequential](sequential.png)", "",
              "![examples](examples.png)", ""]
    return "\n".join(lines)


def _judged_as(m: dict) -> str:
    return ", ".join(f"{label} {n}" for label, n in m["judged_as"].items()) if "judged_as" in m else "—"


def replace_findings(data: dict) -> str:
    """Replace mode (one setting) against latent scaling with γ tuned per concept and against no erasure, per
    group, on the measures of the clean-erasure targets (UA, IRA, AR). Empty for runs without both."""
    S = data["summary"]
    if "replace" not in S or not _has_quality(data):
        return ""
    lines = []
    for group in (g for g in (OBJECT, STYLE) if data["targets"].get(g)):
        r, t, n = S["replace"][group], S["saemnesia"][group], S["none"][group]
        lines.append(f"- {group}s: replace mode (one setting, no search) UA {_pct(r['UA'])} %, IRA {_pct(r['IRA'])} % "
                     f"(no erasure {_pct(n['IRA'])} %), AR {_pct(r['AR'])} %, CE {_pct(r['CE'])} %; SAEmnesia with γ "
                     f"tuned UA {_pct(t['UA'])} %, IRA {_pct(t['IRA'])} %, AR {_pct(t['AR'])} %, CE {_pct(t['CE'])} %; "
                     f"the un-erased target images AR {_pct(n['AR'])} %.")
    return "\n".join(lines)


def one_setting_findings(data: dict) -> str:
    """SAEmnesia in exact mode at γ = −1 with the files' calibrations (DESIGN §6.7), per group against no
    erasure and the same γ uncalibrated, on every measure of the one-setting targets (UA, IRA, CRA, AR, CE).
    Empty for runs without the uncalibrated row."""
    S = data["summary"]
    if "saemnesia_uncalibrated" not in S or not _has_quality(data):
        return ""
    lines = []
    for group in (g for g in (OBJECT, STYLE) if data["targets"].get(g)):
        c, u, n = (S[m][group] for m in ("saemnesia_gamma1", "saemnesia_uncalibrated", "none"))
        lines.append(f"- {group}s: γ = −1 calibrated UA {_pct(c['UA'])} %, IRA {_pct(c['IRA'])} % (no erasure "
                     f"{_pct(n['IRA'])} %), CRA {_pct(c['CRA'])} % (no erasure {_pct(n['CRA'])} %), "
                     f"AR {_pct(c['AR'])} % (no erasure {_pct(n['AR'])} %), CE {_pct(c['CE'])} %; "
                     f"uncalibrated UA {_pct(u['UA'])} %, AR {_pct(u['AR'])} %, CE {_pct(u['CE'])} %.")
    return "\n".join(lines)


# What the node's default (DEFAULT_EDIT, no search) should reach per group (DESIGN §9): UA and RM at least this, IRA
# and CRA at most this many points below no erasure's, AR at most this many points above it, UA on the rephrased
# prompts at most this many points below UA on the training wording.
DEFAULT_BAR = {"UA": 95.0, "RM": 80.0, "IRA": 3.0, "CRA": 3.0, "AR": 10.0, "rephrased": 5.0}


def default_against_bar(data: dict) -> str:
    """The node's default (the "default" row) per group against DEFAULT_BAR: each measure, its bound and the margin
    by which it is met or missed. Empty for runs without the default's row or quality."""
    S = data["summary"]
    if "default" not in S or not _has_quality(data):
        return ""
    b = DEFAULT_BAR
    lines = [f"| group | UA (≥ {b['UA']:g}) | RM (≥ {b['RM']:g}) | IRA (≥ no erasure − {b['IRA']:g}) "
             f"| CRA (≥ no erasure − {b['CRA']:g}) | AR (≤ no erasure + {b['AR']:g}) "
             f"| UA rephrased (≥ UA − {b['rephrased']:g}) |", "|---|---|---|---|---|---|---|"]
    for group in (g for g in (OBJECT, STYLE) if data["targets"].get(g)):
        d, n = ({k: 100 * S[m][group][k] for k in ("UA", "RM", "IRA", "CRA", "AR")} for m in ("default", "none"))
        rephrased = 100 * mean(t["rephrased_UA"]["default"] for t in data["targets"][group].values())
        shown = {**d, "rephrased": rephrased}
        margins = {"UA": d["UA"] - b["UA"], "RM": d["RM"] - b["RM"], "IRA": d["IRA"] - (n["IRA"] - b["IRA"]),
                   "CRA": d["CRA"] - (n["CRA"] - b["CRA"]), "AR": n["AR"] + b["AR"] - d["AR"],
                   "rephrased": rephrased - (d["UA"] - b["rephrased"])}
        cells = [f"{shown[k]:.1f} ({'met' if margin >= 0 else f'missed by {-margin:.1f}'})"
                 for k, margin in margins.items()]
        lines.append(f"| {group}s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


AT_THE_DEFAULT = (("default", "the node's default"), ("saemnesia_gamma1", "SAEmnesia, exact, its own block"),
                  ("saemnesia_multisite", "SAEmnesia, multi-site"), ("text_gamma1", "text encoder"))


def judged_instead(data: dict) -> str:
    """Per target, what the judges saw in its test images at the node's default and at γ = −1 exact (one block, every
    block, the text encoder), with RM, the share removed: the target where it survived, another concept where the
    edit steered it, nothing (object) or unstyled (style) where it was removed. Empty for runs without the default's
    row."""
    if "default" not in data["summary"]:
        return ""
    columns = [(m, label) for m, label in AT_THE_DEFAULT if m in data["summary"]]
    lines = ["| target | " + " | ".join(f"{label}: judged as (removed)" for _, label in columns) + " |",
             "|---|" + "---|" * len(columns)]
    cell = lambda m: f"{_judged_as(m)} ({_pct(m.get('RM'))} %)"
    for group, per_concept in data["targets"].items():
        for concept, t in per_concept.items():
            lines.append(f"| {concept} ({group}) | " + " | ".join(cell(t["test"][m]) for m, _ in columns) + " |")
    return "\n".join(lines)


PAPER_AND_EXACT = (("saemnesia_gamma1", "exact, γ = −1"), ("saemnesia_uncalibrated", "exact uncalibrated, γ = −1"),
                   ("saemnesia_paper_gamma1", "paper, γ = −1"), ("saemnesia", "exact, γ tuned"),
                   ("saemnesia_paper", "paper, γ tuned"))


def paper_and_exact(data: dict) -> str:
    """SAEmnesia per target concept in exact and in paper mode (the released hooks' formula), at γ = −1 and with
    γ tuned: UA / IRA / CRA side by side. Empty for runs without paper mode."""
    if "saemnesia_paper" not in data["summary"]:
        return ""
    columns = [(method, label) for method, label in PAPER_AND_EXACT if method in data["summary"]]
    head = "| target | " + " | ".join(f"{label}: UA / IRA / CRA" for _, label in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for group, per_concept in data["targets"].items():
        for concept, t in per_concept.items():
            cells = []
            for method, _ in columns:
                m = t["test"][method]
                gamma = f" (γ {t['chosen'][method]['gamma']:g})" if method in t["chosen"] else ""
                cells.append(f"{_pct(m['UA'])} / {_pct(m['IRA'])} / {_pct(m['CRA'])}{gamma}")
            lines.append(f"| {concept} ({group}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TEXT_AND_UNET = (("text_gamma1", "text encoder, γ = −1"), ("saemnesia_gamma1", "UNet, γ = −1"),
                 ("text", "text encoder, γ tuned"), ("saemnesia", "UNet, γ tuned"))


def text_findings(data: dict) -> str:
    """The text-encoder SAE against the UNet-side SAEmnesia, per group, at γ = −1 (the nodes' default) and with γ
    tuned. Empty for runs without the text row."""
    return _group_table(data, TEXT_AND_UNET) if "text" in data["summary"] else ""


ONE_AND_MORE_SITES = (("none", "no erasure"), ("saemnesia_gamma1", "its own block"),
                      ("saemnesia_multisite", "its own block and the 16x16 encoder level"))


def multi_site_findings(data: dict) -> str:
    """SAEmnesia in exact mode at γ = −1 at one block against every block that reads the group (DESIGN §6.6), per
    group, with no erasure for reference. Empty for runs without the multi-site row."""
    return _group_table(data, ONE_AND_MORE_SITES) if "saemnesia_multisite" in data["summary"] else ""


def _group_table(data: dict, methods) -> str:
    """Per group and method: UA, IRA, CRA, AR, CE, UA on rephrased prompts and RM, the share of the target's images
    with the concept removed (the rest of UA is the concept replaced by another). Empty for runs without quality."""
    if not _has_quality(data):
        return ""
    lines = ["| group | SAE at | UA | IRA | CRA | AR | CE | UA, rephrased | removed (RM) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in (g for g in (OBJECT, STYLE) if data["targets"].get(g)):
        for method, label in methods:
            m = data["summary"][method][group]
            rephrased = [t["rephrased_UA"][method] for t in data["targets"][group].values()]
            lines.append(f"| {group}s | {label} | " + " | ".join(_pct(m[k]) for k in ("UA", "IRA", "CRA", "AR", "CE"))
                         + f" | {_pct(sum(rephrased) / len(rephrased))} | {_pct(m.get('RM'))} |")
    return "\n".join(lines)


def readme_snippet(data: dict, out: Path) -> str:
    rel = shown_path(out)
    return "\n".join([
        f"### Erasure quality (miniature UnlearnCanvas, {data['mode']} mode)", "", summary_table(data), "",
        *_findings(data), protocol_text(data), "",
        f"![per-concept UA/IRA/CRA]({rel}/per_concept.png)", f"![sequential erasure]({rel}/sequential.png)",
        f"![examples, same seeds]({rel}/examples.png)", "",
        f"Reproduce: `saemnesia eval{' --full' if data['mode'] == 'full' else ''}`.", ""])


def plot(results: Results, out: Path) -> None:
    """per_concept.png (grouped bars), sequential.png (curves), examples.png (same seeds, upscaled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = results.data
    colors = {"none": "0.6", "saemnesia": "tab:blue", "saemnesia_gamma1": "tab:cyan",
              "saemnesia_uncalibrated": "tab:olive", "saemnesia_paper": "tab:red",
              "saemnesia_paper_gamma1": "tab:pink", "saeuron": "tab:orange", "replace": "tab:purple",
              "negative": "tab:green", "text": "tab:brown", "text_gamma1": "goldenrod",
              "saemnesia_multisite": "navy", "default": "black"}
    groups = [g for g in (OBJECT, STYLE) if data["targets"].get(g)]
    height = 3.6 * len(groups) + 0.8  # 0.8 inch below the plots for the legend, so that it covers no bar
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, height), squeeze=False)
    for row, group in zip(axes, groups):
        concepts = list(data["targets"][group])
        for ax, metric in zip(row, ("UA", "IRA", "CRA")):
            width = 0.8 / len(_methods(data))
            for k, method in enumerate(_methods(data)):
                values = [100 * (data["targets"][group][c]["test"][method][metric] or 0) for c in concepts]
                ax.bar(np.arange(len(concepts)) + (k - (len(_methods(data)) - 1) / 2) * width, values, width,
                       color=colors[method], label=METHODS[method][0])
            ax.set_xticks(range(len(concepts)), concepts, rotation=30, fontsize=8)
            ax.set_ylim(0, 105)
            ax.set_title(f"{group} targets: {metric} (%)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1))
    fig.savefig(out / "per_concept.png", dpi=110)
    plt.close(fig)

    seq = data["sequential"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(1, len(seq["order"]) + 1)
    for ax, metric in zip(axes, ("UA", "IRA", "CRA")):
        for method, rows in seq["rows"].items():
            ax.plot(x, [np.nan if r[metric] is None else 100 * r[metric] for r in rows], "o-", color=colors[method],
                    label=METHODS[method][0])
        ax.set_xticks(x)
        ax.set_xlabel("objects erased")
        ax.set_ylim(0, 105)
        ax.set_title({"UA": "UA over the erased objects (%)", "IRA": "retained object accuracy (%)",
                      "CRA": "style accuracy (%)"}[metric])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sequential.png", dpi=110)
    plt.close(fig)

    methods = [m for m in METHODS if m in results.examples]
    if not methods:
        return
    columns = len(results.examples[methods[0]])
    fig, axes = plt.subplots(len(methods), columns, figsize=(1.3 * columns + 1.5, 1.45 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, (title, image) in enumerate(results.examples[method]):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title.replace(": ", ":\n"), fontsize=6)
        axes[r][0].set_ylabel(METHODS[method][0].replace(" (", "\n("), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=110)
    plt.close(fig)


def write_reports(results: Results, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results.data)
    write_bytes_atomic(out / "report.md", markdown_report(results.data).encode())
    write_bytes_atomic(out / "README_snippet.md", readme_snippet(results.data, out).encode())
    plot(results, out)
