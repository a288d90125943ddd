"""The toy world's judges: small CNNs that say which object and which style an image shows.

They play the part of UnlearnCanvas' ViT classifiers. They are trained on renders with mild noise, blur and
contrast jitter so that a generated image of a recognisable shape is judged by its shape, not by
generation artefacts; they must still score ≥ 98 % on clean held-out renders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .render import OBJECTS, STYLES, render_batch

UNSTYLED = "Unstyled"  # the style judge's class for an image with no style
STYLE_CLASSES = STYLES + (UNSTYLED,)
NO_OBJECT = "No object"  # the object judge's class for an empty scene (judges trained with `no_object`)
OBJECT_CLASSES = OBJECTS + (NO_OBJECT,)


class JudgeCNN(torch.nn.Module):
    """[B, 3, 32, 32] images in [0, 1] → [B, num_classes] logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        c = (32, 64, 128)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, c[0], 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c[0], c[0], 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[0], c[1], 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c[1], c[1], 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[1], c[2], 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(c[2] * 16, 128),
                                        torch.nn.ReLU(), torch.nn.Linear(128, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate activations [B, 128]: what the last layer reads."""
        return self.head[:-1](self.features(images * 2 - 1))


@dataclass
class Judges:
    """Both judges; `predict` gives class names for a batch of images in [0, 1] ([B,3,H,W] or [B,H,W,3]). The
    object judge knows NO_OBJECT when it has a class for it (judges trained with `no_object`)."""

    objects: JudgeCNN
    styles: JudgeCNN

    @property
    def object_classes(self) -> tuple[str, ...]:
        return OBJECT_CLASSES[:self.objects.head[-1].out_features]

    @property
    def knows_no_object(self) -> bool:
        return NO_OBJECT in self.object_classes

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        x = _as_nchw(images)
        obj = self.objects(x).argmax(1).tolist()
        sty = self.styles(x).argmax(1).tolist()
        return [self.object_classes[i] for i in obj], [STYLE_CLASSES[i] for i in sty]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Both judges' penultimate activations side by side, [B, 256] (the artifact judge's and KID's features)."""
        x = _as_nchw(images)
        return torch.cat([self.objects.embed(x), self.styles.embed(x)], dim=1)

    def save(self, path) -> None:
        tensors = {f"objects.{k}": v for k, v in self.objects.state_dict().items()}
        tensors.update({f"styles.{k}": v for k, v in self.styles.state_dict().items()})
        save_file(tensors, str(path), metadata={"objects": ",".join(self.object_classes),
                                                "styles": ",".join(STYLE_CLASSES)})

    @classmethod
    def load(cls, path) -> "Judges":
        tensors = load_file(str(path))
        objects = JudgeCNN(tensors["objects.head.4.bias"].shape[0])  # the last layer: a bias per class
        if objects.head[-1].out_features not in (len(OBJECTS), len(OBJECT_CLASSES)):
            raise ValueError(f"{path}: an object judge of {objects.head[-1].out_features} classes; "
                             f"expected {len(OBJECTS)} or {len(OBJECT_CLASSES)} ({NO_OBJECT!r} last)")
        styles = JudgeCNN(len(STYLE_CLASSES))
        objects.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("objects.")})
        styles.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("styles.")})
        return cls(objects.eval(), styles.eval())


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    x = images.float()
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="area")
    return x.contiguous()


def render_labelled(n: int, seed: int, no_object: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n renders over all objects and styles (unstyled included): images [n,3,32,32] in [0,1], labels. With
    `no_object`, empty scenes too, as one more object class (NO_OBJECT, index len(OBJECTS)); without it, the
    renders of judges and reports made before that class."""
    rng = np.random.default_rng(seed)
    obj = rng.integers(0, len(OBJECT_CLASSES) if no_object else len(OBJECTS), n)
    sty = rng.integers(0, len(STYLE_CLASSES), n)
    items = [(OBJECTS[o] if o < len(OBJECTS) else None, STYLES[s] if s < len(STYLES) else None) for o, s in zip(obj, sty)]
    imgs = render_batch(items, rng.integers(0, 2**31 - 1, n))
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(obj), torch.from_numpy(sty)


def augment(x: torch.Tensor, gen: torch.Generator, colour: float = 0.0) -> torch.Tensor:
    """Mild noise, blur and contrast jitter, and with `colour` a shift of each channel by up to that much: what a
    generator's imperfections look like (its palettes drift from the renderer's)."""
    b = x.shape[0]
    contrast = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    x = (x - 0.5) * contrast + 0.5
    if colour:
        x = x + colour * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + torch.randn(x.shape, generator=gen) * 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    return x.clamp(0, 1)


def train_judges(pool_size=12000, steps=1500, batch=128, seed=0, progress=True, no_object=False,
                 colour_jitter=0.0) -> Judges:
    """Train both judges on a pool of renders (with `no_object`, empty scenes are a ninth object class; with
    `colour_jitter`, `augment`'s drift of each channel); `held_out_accuracy` measures them."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, obj_labels, sty_labels = render_labelled(pool_size, seed, no_object)
    judges = Judges(JudgeCNN(len(OBJECT_CLASSES) if no_object else len(OBJECTS)), JudgeCNN(len(STYLE_CLASSES)))
    params = list(judges.objects.parameters()) + list(judges.styles.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    from tqdm import tqdm

    judges.objects.train()
    judges.styles.train()
    for _ in tqdm(range(steps), desc="judges", disable=not progress):
        idx = torch.randint(0, pool_size, (batch,), generator=gen)
        x = augment(images[idx].clone(), gen, colour_jitter)
        loss = F.cross_entropy(judges.objects(x), obj_labels[idx]) + F.cross_entropy(judges.styles(x), sty_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    judges.objects.eval()
    judges.styles.eval()
    return judges


def held_out_accuracy(judges: Judges, n=2000, seed=1000) -> dict:
    """Top-1 accuracy of each judge on fresh clean renders (seeds disjoint from training); for judges that know
    NO_OBJECT, the renders include empty scenes and `no_object` is the accuracy on those alone."""
    images, obj_labels, sty_labels = render_labelled(n, seed, judges.knows_no_object)
    with torch.no_grad():
        obj_hit = judges.objects(images).argmax(1) == obj_labels
        sty_acc = (judges.styles(images).argmax(1) == sty_labels).float().mean().item()
    empty = obj_labels == len(OBJECTS)
    return {"object": obj_hit.float().mean().item(), "style": sty_acc, "n": n,
            **({"no_object": obj_hit[empty].float().mean().item(), "no_object_n": int(empty.sum())}
               if judges.knows_no_object else {})}
