"""The toy world's images: one object (a shape) drawn in one style (a palette and a texture), 32×32 RGB.

Deterministic: the same (object, style, seed) always gives the same pixels. Shapes are drawn 4× larger and
box-filtered down, so edges are anti-aliased. Each style has its own palette *and* texture, so a style is
recognisable by colour alone; the diamond is a tall rhombus and rotations stay within ±15°, so it never
becomes a square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OBJECTS = ("Circles", "Squares", "Triangles", "Stars", "Hearts", "Crosses", "Rings", "Diamonds")
STYLES = ("Stripes", "Dots", "Checker", "Outline", "Gradient", "Neon", "Pastel", "Noise")

SIZE = 32
_SS = 4  # supersampling factor
_C = SIZE * _SS


@dataclass(frozen=True)
class Placement:
    """Where and how big the object is, in canvas pixels (the 4× supersampled canvas)."""

    cx: float
    cy: float
    radius: float
    angle: float  # radians


def random_placement(rng: np.random.Generator) -> Placement:
    return Placement(
        cx=_C / 2 + rng.uniform(-3, 3) * _SS,
        cy=_C / 2 + rng.uniform(-3, 3) * _SS,
        radius=rng.uniform(8.5, 11.5) * _SS,
        angle=math.radians(rng.uniform(-15, 15)),
    )


def _polygon(points: np.ndarray, p: Placement) -> list[tuple[float, float]]:
    """Unit-radius points → rotated, scaled, translated canvas points."""
    c, s = math.cos(p.angle), math.sin(p.angle)
    x, y = points[:, 0], points[:, 1]
    xr, yr = c * x - s * y, s * x + c * y
    return list(zip(p.cx + p.radius * xr, p.cy + p.radius * yr))


def _star(n=5, inner=0.45) -> np.ndarray:
    a = -math.pi / 2 + np.arange(2 * n) * math.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / np.abs(pts).max()


_SHAPES = {
    "Squares": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "Triangles": np.array([[0, -1.0], [0.93, 0.68], [-0.93, 0.68]]),
    "Stars": _star(),
    "Hearts": _heart(),
    "Crosses": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                         [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
    "Diamonds": np.array([[0, -1.0], [0.6, 0], [0, 1.0], [-0.6, 0]]),
}


def shape_mask(obj: str | None, p: Placement) -> np.ndarray:
    """Float mask [C, C] in {0, 1} on the supersampled canvas (all 0 for None: an empty scene)."""
    img = Image.new("L", (_C, _C), 0)
    draw = ImageDraw.Draw(img)
    if obj is None:
        pass
    elif obj in ("Circles", "Rings"):
        r = p.radius * 0.9
        draw.ellipse([p.cx - r, p.cy - r, p.cx + r, p.cy + r], fill=255)
        if obj == "Rings":
            ri = r * 0.55
            draw.ellipse([p.cx - ri, p.cy - ri, p.cx + ri, p.cy + ri], fill=0)
    elif obj in _SHAPES:
        draw.polygon(_polygon(_SHAPES[obj], p), fill=255)
    else:
        raise ValueError(f"unknown object {obj!r}; known: {', '.join(OBJECTS)}")
    return np.asarray(img, dtype=np.float32) / 255.0


def _outline(mask: np.ndarray, width_px: int) -> np.ndarray:
    """The band of `mask` within `width_px` canvas pixels of its edge."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width_px + 1)), dtype=np.float32) / 255.0
    return mask - eroded


def _rgb(c) -> np.ndarray:
    return np.asarray(c, dtype=np.float32)


def _style_layers(style: str | None, mask: np.ndarray, rng: np.random.Generator):
    """(foreground texture [C,C,3], background colour, coverage mask [C,C]) of a style. Every look has a background
    colour of its own, so that a style still shows in a scene with no object (Stripes and Outline drew on the
    unstyled white before the world had such scenes: their empty scenes were the unstyled one)."""
    yy, xx = np.mgrid[0:_C, 0:_C]
    full = np.ones((_C, _C, 1), np.float32)
    if style is None:
        return full * _rgb((20, 20, 20)), _rgb((250, 250, 250)), mask
    if style == "Stripes":
        on = ((yy // (4 * _SS)) % 2 == 0)[..., None]
        return np.where(on, _rgb((25, 45, 170)), _rgb((250, 200, 40))), _rgb((255, 240, 165)), mask
    if style == "Dots":
        cell = 4 * _SS
        d = np.hypot((xx % cell) - cell / 2, (yy % cell) - cell / 2)[..., None]
        return np.where(d < 1.3 * _SS, _rgb((215, 25, 35)), _rgb((255, 235, 190))), _rgb((205, 225, 255)), mask
    if style == "Checker":
        on = (((xx // (4 * _SS)) + (yy // (4 * _SS))) % 2 == 0)[..., None]
        return np.where(on, _rgb((15, 15, 15)), _rgb((255, 255, 255))), _rgb((250, 150, 50)), mask
    if style == "Outline":
        return full * _rgb((125, 40, 170)), _rgb((250, 210, 225)), _outline(mask, int(1.5 * _SS))
    if style == "Gradient":
        g = ((xx - xx.min()) / (_C - 1))[..., None]
        return (1 - g) * _rgb((255, 50, 60)) + g * _rgb((255, 235, 60)), _rgb((20, 70, 85)), mask
    if style == "Neon":
        glow = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(1.5 * _SS)), dtype=np.float32) / 255.0
        cover = np.clip(0.6 * glow + _outline(mask, int(1.5 * _SS)), 0, 1)
        return full * _rgb((60, 255, 140)), _rgb((5, 5, 15)), cover
    if style == "Pastel":
        return full * _rgb((250, 165, 200)), _rgb((185, 235, 215)), mask
    if style == "Noise":
        palette = _rgb([(230, 60, 60), (60, 200, 80), (60, 90, 230), (240, 220, 50), (240, 240, 240)])
        cells = rng.integers(0, len(palette), size=(SIZE, SIZE))
        tex = palette[cells].repeat(_SS, 0).repeat(_SS, 1)
        return tex, _rgb((110, 110, 110)), mask
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)} or None")


def render(obj: str | None, style: str | None, seed: int) -> np.ndarray:
    """One image, uint8 [32, 32, 3]; obj None: the style's background alone. Same arguments, same pixels."""
    rng = np.random.default_rng(seed)
    placement = random_placement(rng)
    mask = shape_mask(obj, placement)
    fg, bg, cover = _style_layers(style, mask, rng)
    canvas = bg * (1 - cover[..., None]) + fg * cover[..., None]
    big = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX))


def render_batch(items, seeds) -> np.ndarray:
    """uint8 [N, 32, 32, 3] for (object, style) items and their seeds."""
    return np.stack([render(o, s, int(seed)) for (o, s), seed in zip(items, seeds)])
