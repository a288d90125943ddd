# SPDX-License-Identifier: GPL-3.0-or-later
"""Does the evaluation's artifact judge (saemnesia_tools.toy.evaluation.quality) flag what a person calls broken,
and only that?

The judge is fitted exactly as `saemnesia eval` fits it (renders + the model's own un-erased images of the quality
set). It is then scored on images it never saw:
- clean: fresh renders, and the model's own un-erased images of the evaluation's test grid (should be ~1 %);
- empty backgrounds: every look without an object (what a clean erasure leaves; should be ~1 %);
- broken on purpose, made from fresh renders: the image cut into 8x8 tiles and shuffled (fragments), the image
  torn in two and its halves shifted apart, half the image replaced by a noise field, a smear (the image dragged
  sideways), and two renders blended half and half;
- the model's images under each edit of the evaluation for the object targets of the quick evaluation (exact
  latent scaling at γ = −5 and −30, replace mode), for a reader to compare with the grid.
Last, KID's two candidate references (renders of the prompts, the model's own images at another seed): the spread
of KID over random subsets of the un-erased test grid against each.
Writes benchmarks/studies/results/artifact_judge.json, .md and artifact_judge.png (flagged images framed in red).

    .venv/bin/python benchmarks/studies/artifact_judge.py    # a few minutes once the evaluation's images are cached
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import saemnesia_tools.comfyui  # noqa: F401  (makes ComfyUI importable)
from saemnesia_tools.comfyui.toy.eval_runner import DEFAULT_ASSETS, Runner
from saemnesia_core.files import write_bytes_atomic, write_json_atomic
from saemnesia_tools.toy.assets import REPO_ROOT
from saemnesia_tools.toy.evaluation.protocol import LOOKS, OBJECT, QUICK, Setting, grid_items
from saemnesia_tools.toy.evaluation.quality import kid, renders_of
from saemnesia_tools.toy.render import OBJECTS, render_batch

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 11_000_000  # fresh renders, apart from every other seed base
PER_SET = 144
OWN = "clean: the model's own images (test grid, no erasure)"
EDITED = ("Circles", "Hearts")  # the objects whose erased images the judge sees (the quick eval's two then)
SUBSETS, SUBSET_SIZE = 20, 64  # KID's spread: random subsets of the test grid's prompts


def fresh_renders(n: int, seed: int, empty: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    items = [(None if empty else OBJECTS[rng.integers(len(OBJECTS))], LOOKS[rng.integers(len(LOOKS))])
             for _ in range(n)]
    return render_batch(items, rng.integers(0, 2**31 - 1, n))


def broken_sets(seed: int) -> dict[str, np.ndarray]:
    """Images a person would call broken, each made from fresh renders."""
    rng = np.random.default_rng(seed)
    base = fresh_renders(PER_SET, seed + 1)
    other = fresh_renders(PER_SET, seed + 2)
    tiles = base.reshape(PER_SET, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(PER_SET, 16, 8, 8, 3)
    shuffled = np.stack([t[rng.permutation(16)] for t in tiles]).reshape(PER_SET, 4, 4, 8, 8, 3)
    shuffled = shuffled.transpose(0, 1, 3, 2, 4, 5).reshape(PER_SET, 32, 32, 3)
    torn = base.copy()  # the left half pushed up, the right half down
    torn[:, :, :16] = np.roll(base[:, :, :16], -6, axis=1)
    torn[:, :, 16:] = np.roll(base[:, :, 16:], 6, axis=1)
    noise = base.copy()
    noise[:, :, 16:] = rng.integers(0, 256, size=(PER_SET, 32, 16, 3))
    smear = np.stack([np.cumsum(img.astype(np.float64), axis=1) / np.arange(1, 33)[None, :, None] for img in base])
    blend = (base.astype(np.float64) + other) / 2
    return {"fragments (tiles shuffled)": shuffled, "torn: halves shifted apart": torn, "half noise field": noise,
            "smeared sideways": smear.round().astype(np.uint8), "two renders blended": blend.round().astype(np.uint8)}


def main() -> None:
    runner = Runner(DEFAULT_ASSETS, QUICK, REPO_ROOT / "runs" / "eval_cache")
    judge = runner.artifact_judge()
    tests = grid_items(QUICK.test_seeds)
    sets = {"clean: fresh renders": fresh_renders(500, SEED),
            OWN: runner.images(Setting(), tests),
            "clean: empty backgrounds": fresh_renders(PER_SET, SEED + 10, empty=True),
            **{f"broken: {k}": v for k, v in broken_sets(SEED + 20).items()}}
    for concept in EDITED:
        rows = [k for k, i in enumerate(tests) if i.obj == concept]
        for label, setting in (("exact, γ = −5", Setting(("saemnesia", OBJECT), ((concept, -5.0, 0),))),
                               ("exact, γ = −30", Setting(("saemnesia", OBJECT), ((concept, -30.0, 0),))),
                               ("replace", Setting(("saemnesia", OBJECT), ((concept, -1.0, 0),), mode="replace"))):
            sets[f"edited: {concept} erased, {label}"] = runner.images(setting, tests)[rows]
    flags, rates = {}, {}
    for name, images in sets.items():
        parts = {cue: f.numpy() for cue, f in judge.flag_parts(images).items()}
        flags[name] = np.any(list(parts.values()), axis=0)
        rates[name] = {"images": len(images), "flagged": int(flags[name].sum()), "rate": float(flags[name].mean()),
                       **{f"rate_{cue}": float(f.mean()) for cue, f in parts.items()}}
    kid_references = compare_kid_references(runner, judge, tests, sets[OWN])
    result = {"threshold": judge.threshold, "cue_thresholds": list(judge.cue_thresholds), "sets": rates,
              "kid_references": kid_references,
              "method": "benchmarks/studies/artifact_judge.py; judge fitted as in saemnesia eval (quick protocol)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "artifact_judge.json", result, indent=2)
    lines = ["# The artifact judge, validated", "", f"Flagged = judged broken: squared Mahalanobis distance to the "
             f"nearest class above {judge.threshold:.0f}, or more than {judge.cue_thresholds[0]:.3f} of the border "
             f"off the background's colour, or more than {judge.cue_thresholds[1]:.0f} object pixels outside the "
             "object's largest piece. The last three columns: each score alone.", "",
             "| image set | images | flagged | rate | semantic | border | stray pieces |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['images']} | {r['flagged']} | {100 * r['rate']:.1f} % | "
              + " | ".join(f"{100 * r[f'rate_{cue}']:.1f} %" for cue in ("semantic", "border", "stray")) + " |"
              for n, r in rates.items()]
    lines += ["", "![flagged (red) and unflagged (green) examples](artifact_judge.png)", "",
              "## KID's reference", "", f"KID ×10³ of the model's un-erased test images against each reference, over "
              f"{SUBSETS} random subsets of {SUBSET_SIZE} prompts (the evaluation uses the second):", "",
              "| reference | mean | sd | min | max |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | " + " | ".join(f"{1e3 * r[k]:.1f}" for k in ("mean", "sd", "min", "max")) + " |"
              for name, r in kid_references.items()]
    lines += [""]
    write_bytes_atomic(RESULTS / "artifact_judge.md", "\n".join(lines).encode())
    plot(sets, flags, RESULTS / "artifact_judge.png")
    print("\n".join(lines))


def compare_kid_references(runner: Runner, judge, tests: list, own: np.ndarray) -> dict:
    """KID of the model's un-erased test images against renders of their prompts and against its own un-erased
    images of the same prompts at another seed (the evaluation's reference), over random subsets."""
    own_other_seed = runner.kid_reference()
    prompts = [(i.obj, i.style) for i in tests]
    references = {"renders of the same prompts": renders_of(tests).numpy(),
                  "the model's own images of the same prompts, another seed":
                      np.stack([own_other_seed[p] for p in prompts])}
    rng = np.random.default_rng(SEED + 30)
    subsets = [rng.choice(len(tests), SUBSET_SIZE, replace=False) for _ in range(SUBSETS)]
    out = {}
    for name, reference in references.items():
        values = [kid(judge, own[k], reference[k], [prompts[j] for j in k]) for k in subsets]
        out[name] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "min": min(values),
                     "max": max(values)}
    return out


def plot(sets: dict, flags: dict, path: Path, columns: int = 12) -> None:
    """One row per set: up to `columns` images, flagged ones first, framed red (flagged) or green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), columns, figsize=(columns * 0.75 + 3.2, len(sets) * 0.8), squeeze=False)
    for row, (name, images) in zip(axes, sets.items()):
        flagged, clean = np.flatnonzero(flags[name]).tolist(), np.flatnonzero(~flags[name]).tolist()
        shown = min(len(flagged), max(columns // 2, columns - len(clean)))  # half each where both have enough
        picks = flagged[:shown] + clean[: columns - shown]
        for ax in row:
            ax.axis("off")
        for ax, k in zip(row, picks):
            ax.imshow(images[k], interpolation="nearest")
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("red" if flags[name][k] else "green")
                spine.set_linewidth(2.5)
        row[0].text(-0.3, 0.5, f"{name}\n{100 * flags[name].mean():.0f} % flagged", transform=row[0].transAxes,
                    ha="right", va="center", fontsize=6.5)
    fig.subplots_adjust(left=0.3, right=0.99, top=0.99, bottom=0.01, wspace=0.08, hspace=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
