"""Image quality in the evaluation (DESIGN §9.1): an artifact rate (AR) and a distribution distance (KID).

The artifact judge asks whether an image looks like *something the toy world shows*, with two kinds of evidence:
- semantic: the judges' penultimate features near a render of any object in any look, a look's background with
  no object at all (what a clean erasure leaves), or what the model itself makes of a prompt when nothing is
  erased (its own imperfections are not artifacts). One Gaussian per such class, one shared covariance; the score
  is the Mahalanobis distance to the nearest class.
- structural (`scene_cues`): every toy image is one flat background with at most one connected object, so a
  border that is not one colour (noise fields, smears, torn images) or object pixels in more than one piece
  (fragments) is broken whatever the judges' features say. The global features alone missed most of these.
An image is flagged when any score exceeds what 99 % of fresh renders and of the model's un-erased images stay
below. `benchmarks/studies/artifact_judge.py` validates it (renders, the model's own images, deliberately broken
images, edited images) and shows flagged and unflagged examples side by side.

KID (Bińkowski et al. 2018, unbiased, cubic polynomial kernel) compares the images an edit leaves alone (the other
concepts') with the model's own un-erased images of the same prompts at another seed: what the edit changed
there. Unlike FID it has no bias at the few dozen images per setting the quick evaluation makes. Against renders
of the prompts it would mostly measure that the model is not the renderer, with a spread across subsets larger than
the differences between methods (the study above measures both references).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..judges import NO_OBJECT, UNSTYLED, Judges, augment
from ..render import OBJECTS, render_batch
from .protocol import LOOKS, OBJECT, STYLE, Item, Judged

REFERENCE_SEED = 8_000_000  # render seeds of the fit (+1e6: the calibration), apart from every other seed base
PER_CLASS = 16              # renders per class for the fit, and again for the calibration
FLAGGED_QUANTILE = 0.99     # fresh renders scoring above a threshold: 1 %
COLOUR_TOLERANCE = 0.12     # max channel difference (in [0, 1]) that still counts as the background's colour
BORDER = 2                  # pixels of the border that must show only background
MIN_PIECE = 3               # pieces of the object smaller than this (pixels) are speckle, not fragments
KID_RENDER_SEED = 10_000_000


def _as_unit(images) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] (numpy or torch) or float in [0, 1] -> float [N, 32, 32, 3] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def reference_renders(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [K·per_class, 32, 32, 3] in [0, 1] with the judges' training noise, class index) for the K classes:
    every object in every look, and every look's background alone."""
    classes = [(o, s) for o in (*OBJECTS, None) for s in LOOKS]
    items = [c for c in classes for _ in range(per_class)]
    seeds = [seed + i for i in range(len(items))]
    images = torch.from_numpy(render_batch(items, seeds)).float() / 255
    noisy = augment(images.permute(0, 3, 1, 2).contiguous(), torch.Generator().manual_seed(seed)).permute(0, 2, 3, 1)
    return noisy, torch.arange(len(classes)).repeat_interleave(per_class)


@dataclass
class ArtifactJudge:
    """Flags images far from everything the toy world can show (module docstring)."""

    judges: Judges
    means: torch.Tensor       # [K, F] class means of the features
    precision: torch.Tensor   # [F, F] inverse of the shared covariance (ridge-regularised)
    threshold: float          # scores above it are flagged
    cue_thresholds: tuple[float, float] = (float("inf"), float("inf"))  # for scene_cues' two columns
    center: torch.Tensor | None = None  # [F] mean of the fitted features, and their RMS around it:
    scale: float = 1.0                   # KID reads (feature − center) / scale

    @classmethod
    def fit(cls, judges: Judges, own: tuple[np.ndarray, list[Item]], own_calibration: np.ndarray,
            per_class: int = PER_CLASS, seed: int = REFERENCE_SEED) -> ArtifactJudge:
        """own: the model's un-erased images and their items (several per prompt); own_calibration: more of them,
        other seeds. Renders are made here."""
        images, labels = reference_renders(per_class, seed)
        render_classes = int(labels.max()) + 1
        cells = sorted({(i.obj, i.style) for i in own[1]}, key=str)
        own_labels = torch.tensor([render_classes + cells.index((i.obj, i.style)) for i in own[1]])
        features = torch.cat([judges.embed(images), judges.embed(_as_unit(own[0]))]).double()
        labels = torch.cat([labels, own_labels])
        means = torch.stack([features[labels == k].mean(0) for k in range(render_classes + len(cells))])
        centred = features - means[labels]
        covariance = centred.T @ centred / (len(features) - len(means))
        ridge = 1e-3 * covariance.diagonal().mean()
        precision = torch.linalg.inv(covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype))
        center = features.mean(0)
        judge = cls(judges, means, precision, float("inf"), center=center,
                    scale=float((features - center).pow(2).mean().sqrt()))
        fresh, _ = reference_renders(per_class, seed + 1_000_000)
        judge.threshold = max(_quantile(judge.scores(part)) for part in (fresh, own_calibration))
        own_all = torch.cat([_as_unit(own[0]), _as_unit(own_calibration)])  # the cues fit nothing: use every image
        cues = [scene_cues(part) for part in (fresh, own_all)]
        judge.cue_thresholds = tuple(max(_quantile(c[:, j]) for c in cues) for j in range(2))
        return judge

    def save(self, path) -> None:
        """The fitted state, float32 (the judges are the toy world's own file): the evaluation writes it beside its
        report so the demo flags images with the judge its AR came from."""
        tensors = {"means": self.means, "precision": self.precision, "center": self.center}
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path), metadata={"fit": json.dumps(
            {"threshold": self.threshold, "cue_thresholds": list(self.cue_thresholds), "scale": self.scale})})

    @classmethod
    def load(cls, path, judges: Judges) -> ArtifactJudge:
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k).double() for k in ("means", "precision", "center")}
            fit = json.loads(f.metadata()["fit"])
        return cls(judges, t["means"], t["precision"], fit["threshold"], tuple(fit["cue_thresholds"]),
                   center=t["center"], scale=fit["scale"])

    def features(self, images) -> torch.Tensor:
        """The judges' features, centred and scaled as the fitted ones (zero mean, unit RMS there), [N, F] float64."""
        return (self.judges.embed(_as_unit(images)).double() - self.center) / self.scale

    def _distances(self, images) -> torch.Tensor:
        """Squared Mahalanobis distance to every class, [N, K] float64."""
        diff = self.judges.embed(_as_unit(images)).double()[:, None] - self.means[None]     # [N, K, F]
        return torch.einsum("nkf,fg,nkg->nk", diff, self.precision, diff)

    def scores(self, images) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class, [N] float64."""
        return self._distances(images).min(1).values

    def empty(self, images) -> torch.Tensor:
        """bool [N]: the nearest class is a look's background with no object (the render classes come first, the
        objects' before the empty ones: `reference_renders`). The object judge always names an object; this is
        what tells an object removed from one turned into another."""
        first = len(OBJECTS) * len(LOOKS)
        nearest = self._distances(images).argmin(1)
        return (nearest >= first) & (nearest < first + len(LOOKS))

    def flag_parts(self, images) -> dict[str, torch.Tensor]:
        """bool [N] per score: semantic (Mahalanobis), border (off the background's colour), stray (pieces)."""
        border, stray = (scene_cues(images) > torch.tensor(self.cue_thresholds, dtype=torch.float64)).T
        return {"semantic": self.scores(images) > self.threshold, "border": border, "stray": stray}

    def flags(self, images) -> torch.Tensor:
        """bool [N]: the image looks broken (any score above its threshold)."""
        parts = self.flag_parts(images).values()
        return torch.stack(list(parts)).any(0)

    def rate(self, images) -> float | None:
        """Share of `images` flagged (None for no images)."""
        return float(self.flags(images).double().mean()) if len(images) else None


def _quantile(scores: torch.Tensor) -> float:
    return float(torch.quantile(scores.double(), FLAGGED_QUANTILE))


def scene_cues(images) -> torch.Tensor:
    """[N, 2] float64 per image: (share of the border not in the background's colour, object pixels outside the
    object's largest connected piece). Both are 0 on a render: one flat background, one connected object.

    Read after a 3×3 median filter, which removes the Noise look's confetti and the model's speckle but not a
    noise field or a fragment. The background's colour is the border's median; object pixels differ from it by
    more than COLOUR_TOLERANCE in some channel, and are closed (3×3) before their pieces are counted (8-connected),
    so an outline or a dotted texture stays one piece.
    """
    from scipy import ndimage  # the evaluation's dependency only (installed with ComfyUI and the test extra)

    x = ndimage.median_filter(_as_unit(images).double().numpy(), size=(1, 3, 3, 1), mode="nearest")
    n = len(x)
    border = np.concatenate([x[:, :BORDER].reshape(n, -1, 3), x[:, -BORDER:].reshape(n, -1, 3),
                             x[:, BORDER:-BORDER, :BORDER].reshape(n, -1, 3),
                             x[:, BORDER:-BORDER, -BORDER:].reshape(n, -1, 3)], axis=1)
    background = np.median(border, axis=1)                                              # [N, 3]
    off_border = (np.abs(border - background[:, None]).max(-1) > COLOUR_TOLERANCE).mean(1)
    foreground = np.abs(x - background[:, None, None]).max(-1) > COLOUR_TOLERANCE      # [N, H, W]
    stray = np.zeros(n)
    for k in range(n):
        square = np.ones((3, 3))  # closing that does not erode at the image's edge (outside counts as set)
        closed = ndimage.binary_erosion(ndimage.binary_dilation(foreground[k], square), square, border_value=1)
        pieces, _ = ndimage.label(closed, square)
        sizes = np.bincount(pieces.ravel())[1:]
        sizes = sizes[sizes >= MIN_PIECE]
        stray[k] = sizes.sum() - sizes.max() if len(sizes) else 0
    return torch.from_numpy(np.stack([off_border, stray], axis=1))


def renders_of(items: list[Item]) -> torch.Tensor:
    """Clean renders of the items' prompts (object, look), seeds of their own (the study compares KID's references)."""
    seeds = [KID_RENDER_SEED + i for i in range(len(items))]
    return torch.from_numpy(render_batch([(i.obj, i.style) for i in items], seeds)).float() / 255


def kid(artifacts: ArtifactJudge, images, reference, prompts: list | None = None) -> float | None:
    """Unbiased squared MMD with the kernel (x·y/F + 1)³ between two image sets' features (ArtifactJudge.features).

    `prompts` (one per image, the same list for both sets) leaves out every pair of images of one prompt: the
    reference renders the same prompts, and a same-prompt pair occurs across the sets but never within one, which
    would bias the estimate. Without it the sets are taken as independent samples.
    """
    if len(images) < 2 or len(reference) < 2:
        return None
    x, y = artifacts.features(images), artifacts.features(reference)
    if prompts is None:
        within_x, within_y = ~torch.eye(len(x), dtype=torch.bool), ~torch.eye(len(y), dtype=torch.bool)
        across = torch.ones(len(x), len(y), dtype=torch.bool)
    else:
        if not len(prompts) == len(x) == len(y):
            raise ValueError("prompts must name the prompt of each image of both sets")
        index: dict = {}
        ids = torch.tensor([index.setdefault(p, len(index)) for p in prompts])
        within_x = within_y = across = ids[:, None] != ids[None, :]
    kernel = lambda a, b, keep: ((a @ b.T / a.shape[1] + 1) ** 3)[keep].mean()
    return float(kernel(x, x, within_x) + kernel(y, y, within_y) - 2 * kernel(x, y, across))


ABSENT = {OBJECT: NO_OBJECT, STYLE: UNSTYLED}  # what a group's judge says of an image with the concept removed (RM)


def removed(artifacts: ArtifactJudge, predicted: list[str], images, group: str) -> torch.Tensor:
    """bool [N]: the image's concept of `group` is removed, not replaced by another (RM, DESIGN §9), from what the
    group's judge `predicted` per image: no object left (the object judge's NO_OBJECT; for judges made before that
    class, the artifact judge's nearest class an empty background), or judged unstyled."""
    if group == OBJECT and not artifacts.judges.knows_no_object:
        return artifacts.empty(images)
    return torch.tensor([p == ABSENT[group] for p in predicted], dtype=torch.bool)


def quality_metrics(artifacts: ArtifactJudge, judged: list[Judged], images, group: str, erased,
                    reference: dict) -> dict:
    """On the erased concepts' images: AR, CE (clean erasure: the concept gone and the image not flagged) and RM
    (removed, not replaced: for objects no object left, for styles judged unstyled); KID of the other images against
    `reference`: {(object, look): the model's un-erased image of that prompt at another seed}."""
    images = _as_unit(images)
    erased = set(erased)
    target = [k for k, j in enumerate(judged) if j.item.concept(group) in erased]
    rest = [k for k, j in enumerate(judged) if j.item.concept(group) not in erased]
    flags = artifacts.flags(images[target])
    gone = torch.tensor([judged[k].predicted(group) != judged[k].item.concept(group) for k in target])
    is_removed = removed(artifacts, [judged[k].predicted(group) for k in target], images[target], group)
    prompts = [(judged[k].item.obj, judged[k].item.style) for k in rest]
    others = _as_unit(np.stack([np.asarray(reference[p]) for p in prompts])) if len(rest) >= 2 else None
    return {"AR": float(flags.double().mean()) if target else None,
            "CE": float((gone & ~flags).double().mean()) if target else None,
            "RM": float(is_removed.double().mean()) if target else None,
            "KID": kid(artifacts, images[rest], others, prompts) if others is not None else None}
