"""A procedural five-class flower set with the real class names, for runs without a download.

`generate(out, per_class, size, seed)` writes ``out/<class>/<class>_<i:05d>.jpg`` for every class
of `FLOWER_CLASSES`. Each class has its own petal shape, count and arrangement (daisy: many thin
petals round a yellow disc; dandelion: very many tiny rays or a seed puffball; roses: a spiral of
overlapping rounded petals; sunflowers: large pointed petals round a big dark disc; tulips: a cup
of tall rounded petals seen from the side), while the colour distributions overlap (yellow roses
and tulips, white daisies, roses and tulips...), so colour alone does not tell the classes apart.
Scale, position, rotation, lighting, clutter, extra flowers, occlusion and border cropping vary.

Every image is drawn from its own `numpy.random.Generator` seeded with ``(seed, class, index)``:
the same arguments give byte-identical files, whatever the number of workers. 1,000 images of
128 px take about 10 s on one core.

Calibration (`_K`): the tutorial's small residual network (seed_resnet) trained on 200 images per
class at 128 px (80/20 split, 96 px inputs, RandomResizedCrop + flip, AdamW, batch 32, 8 epochs)
goes from about 50% validation accuracy after epoch 1 to 85-94% after epoch 8, while colour alone
(mean RGB or a 64-bin colour histogram, linear classifier) stays at 30-40%. The classes are told
apart by shape, not colour; more position/scale spread or clutter makes them markedly harder for
that network, which has no global pooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flowerdist.data import FLOWER_CLASSES
from flowerdist.errors import FlowerdistError
from flowerdist.files import atomic_dir

__all__ = ["generate", "render"]

#: Supersampling factor: shapes are drawn at this multiple of the output size, then box-reduced.
_SS = 2
_JPEG_QUALITY = 90

Color = tuple[float, float, float]

# Base colours; every flower jitters its own.
WHITE: Color = (240, 240, 232)
CREAM: Color = (242, 230, 190)
YELLOW: Color = (245, 205, 45)
GOLD: Color = (238, 165, 30)
ORANGE: Color = (232, 110, 35)
RED: Color = (200, 30, 40)
DARKRED: Color = (135, 15, 35)
PINK: Color = (232, 120, 165)
LIGHTPINK: Color = (245, 190, 205)
PURPLE: Color = (125, 55, 150)
LAVENDER: Color = (185, 160, 222)
BROWN: Color = (95, 58, 25)
DARKBROWN: Color = (52, 33, 18)
GREEN: Color = (60, 120, 45)

# Petal colour distributions per class: deliberately overlapping.
_PETALS: dict[str, tuple[Sequence[Color], Sequence[float]]] = {
    "daisy": ((WHITE, CREAM, YELLOW, PINK, LIGHTPINK, LAVENDER, ORANGE), (0.34, 0.1, 0.14, 0.1, 0.12, 0.12, 0.08)),
    "dandelion": ((YELLOW, GOLD, ORANGE), (0.6, 0.28, 0.12)),  # + 25% white seed puffballs
    "roses": ((RED, PINK, WHITE, YELLOW, DARKRED, ORANGE, LIGHTPINK), (0.2, 0.16, 0.14, 0.2, 0.1, 0.1, 0.1)),
    "sunflowers": ((YELLOW, GOLD, ORANGE, DARKRED), (0.45, 0.3, 0.15, 0.1)),
    "tulips": ((RED, PINK, YELLOW, PURPLE, WHITE, ORANGE, LAVENDER), (0.18, 0.16, 0.2, 0.14, 0.14, 0.1, 0.08)),
}

# Background palettes: class-independent.
_BG_BASES: tuple[Color, ...] = (
    (58, 96, 40), (86, 122, 52), (40, 64, 32), (112, 140, 70), (120, 96, 64), (84, 66, 44),
    (150, 180, 210), (110, 140, 180), (130, 130, 125), (70, 72, 70), (30, 36, 28), (170, 160, 130),
)
_BLOB_COLORS: tuple[Color, ...] = (
    (50, 100, 40), (90, 140, 60), (30, 60, 25), (130, 110, 70), (80, 60, 40), (160, 170, 150),
    (200, 190, 120), (210, 210, 200), (170, 90, 100), (150, 120, 170), (200, 150, 60), (140, 40, 40),
)


def _jitter(rng: np.random.Generator, c: Color, amount: float = 18.0) -> Color:
    j = rng.normal(0.0, amount, 3) + rng.normal(0.0, amount * 0.6)  # per-channel + brightness
    return tuple(float(v) for v in np.clip(np.asarray(c) + j, 0, 255))  # type: ignore[return-value]


def _shade(c: Color, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0.0, min(255.0, v * f))) for v in c)  # type: ignore[return-value]


def _pick(rng: np.random.Generator, colors: Sequence[Color], weights: Sequence[float]) -> Color:
    p = np.asarray(weights, dtype=float)
    return colors[int(rng.choice(len(colors), p=p / p.sum()))]


class _View:
    """Maps flower-local coordinates (unit = radius) to the canvas: tilt (foreshortening), spin, scale."""

    def __init__(self, cx: float, cy: float, radius: float, spin: float, squash: float) -> None:
        self.cx, self.cy, self.r = cx, cy, radius
        c, s = math.cos(spin), math.sin(spin)
        self.m = np.array([[c, -s], [s, c]]) @ np.diag([1.0, squash])

    def __call__(self, pts: np.ndarray) -> list:
        """(..., k, 2) local points -> flat canvas coordinate list(s) for `ImageDraw`."""
        p = (pts @ self.m.T) * self.r + (self.cx, self.cy)
        return p.reshape(*p.shape[:-2], -1).tolist()


def _ellipses(cx, cy, rx, ry, angle, n: int = 14) -> np.ndarray:
    """Polygons of k ellipses, shape (k, n, 2); every argument is a scalar or a length-k array."""
    cx, cy, rx, ry, angle = (np.atleast_1d(np.asarray(a, dtype=float))[:, None] for a in (cx, cy, rx, ry, angle))
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack(np.broadcast_arrays(cx + c * x - s * y, cy + s * x + c * y), axis=-1)


def _petals(r0, r1, width, angle, pointed: float, n: int = 9) -> np.ndarray:
    """Polygons of k petals from radius r0 to r1 along `angle`, shape (k, 2n, 2).

    `pointed` goes from a rounded tip (0) to a sharp one (1).
    """
    r0, r1, width, angle = (np.atleast_1d(np.asarray(a, dtype=float))[:, None] for a in (r0, r1, width, angle))
    t = np.linspace(0.0, 1.0, n)
    half = width * (np.sin(np.pi * t) ** (0.5 + pointed) * (1.0 - pointed * t**2 * 0.6))
    along = r0 + (r1 - r0) * t
    half, along = np.broadcast_arrays(half, along)
    side = np.concatenate([half, -half[:, ::-1]], axis=1)
    along = np.concatenate([along, along[:, ::-1]], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * along - s * side, s * along + c * side], axis=-1)


def _fill(d: ImageDraw.ImageDraw, polys: list, color: Color, factors, outline=None, width: int = 1) -> None:
    """Fill each polygon with `color` times its brightness factor (one factor, or one per polygon)."""
    for poly, f in zip(polys, np.broadcast_to(np.asarray(factors, dtype=float), (len(polys),))):
        d.polygon(poly, fill=_shade(color, f), outline=outline, width=width)


def _line_width(v: _View, frac: float) -> int:
    return max(1, round(v.r * frac))


#: Difficulty knobs, calibrated so that a small CNN needs a few epochs (see the module docstring).
#: (low, high) pairs are uniform ranges or [low, high) counts; single values are probabilities.
_K: dict[str, tuple] = {
    "blobs": (3, 8),  # out-of-focus background blobs, [low, high)
    "grass": (0, 6),  # grass strokes behind the flowers
    "leaves": (0, 3),  # loose leaves behind the flowers
    "noise": (2.0, 9.0),  # sensor noise sigma, 0-255 scale
    "extra": (0.65, 0.25, 0.1),  # P(1, 2, 3 flowers)
    "radius": (0.38, 0.55),  # main flower radius, fraction of the image side
    "spread": (0.1,),  # flower centres within 0.5 +- spread of the image side
    "crop": (0.1,),  # P(main flower centred near the border)
    "occlude": (0.2,),  # P(leaves / grass in front of the flowers)
}

# --------------------------------------------------------------------------- flowers


def _daisy(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, color: Color) -> None:
    """12-26 separate long thin petals with gaps, round a domed yellow disc with a dark rim."""
    n = int(rng.integers(12, 22))
    phase = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.68, 0.82)
    width = rng.uniform(0.06, 0.09)
    for layer in range(2 if rng.random() < 0.3 else 1):
        a = phase + (np.arange(n) + 0.5 * layer) * 2 * math.pi / n + rng.normal(0, 0.04, n)
        ln = (length - 0.12 * layer) * rng.uniform(0.9, 1.06, n)
        polys = _petals(0.15, 0.15 + ln, width * rng.uniform(0.85, 1.15, n), a, 0.05)
        _fill(d, v(polys), color, rng.uniform(0.88, 1.04, n) - 0.12 * layer, _shade(color, 0.7))
    centre = _jitter(rng, _pick(rng, (YELLOW, GOLD), (0.7, 0.3)), 10)
    rc = rng.uniform(0.22, 0.3)
    _fill(d, v(_ellipses(0, 0, rc, rc, 0, 18)), centre, 1.0, _shade(centre, 0.4), _line_width(v, 0.045))
    k = int(rng.integers(8, 16))  # disc texture
    a, rr = rng.uniform(0, 2 * math.pi, k), rc * np.sqrt(rng.random(k)) * 0.75
    _fill(d, v(_ellipses(rr * np.cos(a), rr * np.sin(a), 0.03, 0.03, 0, 6)), centre, 0.7)


def _dandelion(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, color: Color) -> None:
    """A dense pom-pom of very many tiny spiky rays (fine radial stripes), or a seed puffball."""
    if rng.random() < 0.25:  # seed puffball: a pale translucent sphere of filaments with tiny tufts
        grey = _jitter(rng, (228, 228, 222), 10)
        _fill(d, v(_ellipses(0, 0, 0.95, 0.95, 0, 24)), grey, 0.55)
        k = int(rng.integers(90, 150))
        a, ln = rng.uniform(0, 2 * math.pi, k), rng.uniform(0.7, 1.0, k)
        tips = np.stack([ln * np.cos(a), ln * np.sin(a)], axis=1)
        lw = _line_width(v, 0.02)
        for seg, f in zip(v(np.stack([np.zeros_like(tips), tips], axis=1)), rng.uniform(0.8, 1.05, k)):
            d.line(seg, fill=_shade(grey, f), width=lw)
        _fill(d, v(_ellipses(tips[:, 0], tips[:, 1], 0.035, 0.035, 0, 6)), grey, 1.08)
        _fill(d, v(_ellipses(0, 0, 0.1, 0.1, 0, 10)), BROWN, 1.2)
        return
    _fill(d, v(_ellipses(0, 0, 0.85, 0.85, 0, 24)), color, 0.5)  # dense head: no gaps to the background
    layers = int(rng.integers(4, 6))
    for layer in range(layers):  # outer, longer rays first; inner rays shorter
        n = int(rng.integers(70, 110) * (1.0 - 0.4 * layer / layers))
        r1 = (1.0 - 0.75 * layer / layers) * rng.uniform(0.82, 1.05, n)
        polys = _petals(r1 * 0.3, r1, rng.uniform(0.02, 0.035, n), rng.uniform(0, 2 * math.pi, n), 1.0, 4)
        _fill(d, v(polys), color, np.where(np.arange(n) % 2 == 0, 1.05, 0.72) - 0.05 * layer)
    _fill(d, v(_ellipses(0, 0, 0.1, 0.1, 0, 10)), color, 0.6)


def _rose(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, color: Color) -> None:
    """An outer ring of big rounded petals, then an inward spiral of overlapping petals with dark edges."""
    outer = int(rng.integers(5, 8))
    phase = rng.uniform(0, 2 * math.pi)
    edge = _line_width(v, 0.03)
    a = phase + np.arange(outer) * 2 * math.pi / outer + rng.normal(0, 0.1, outer)
    r = rng.uniform(0.42, 0.52, outer)
    polys = _ellipses(0.5 * np.cos(a), 0.5 * np.sin(a), r, r * 0.9, a, 16)
    _fill(d, v(polys), color, rng.uniform(0.7, 0.85, outer), _shade(color, 0.4), edge)
    m = int(rng.integers(12, 20))
    k = np.arange(m)
    t = k / m
    a = phase + k * 2.4
    dist, r = 0.42 * (1.0 - t), 0.48 * (1.0 - 0.75 * t)
    polys = _ellipses(dist * np.cos(a), dist * np.sin(a), r, r * 0.8, a + 1.2, 16)
    _fill(d, v(polys), color, 0.82 + 0.25 * ((k % 2) - 0.5) + 0.2 * t, _shade(color, 0.35), edge)
    s = np.arange(11)
    spiral = 0.012 * s[:, None] * np.stack([np.cos(phase + s * 0.9), np.sin(phase + s * 0.9)], axis=1)
    d.line(v(spiral), fill=_shade(color, 0.35), width=edge)


def _sunflower(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, color: Color) -> None:
    """Two rings of large pointed petals round a big dark-brown disc of seed florets."""
    n = int(rng.integers(16, 30))
    phase = rng.uniform(0, 2 * math.pi)
    rc = rng.uniform(0.36, 0.5)
    for layer in range(2):
        a = phase + (np.arange(n) + 0.5 * layer) * 2 * math.pi / n + rng.normal(0, 0.06, n)
        tip = rng.uniform(0.88, 1.05, n) - 0.08 * layer
        polys = _petals(rc * 0.8, tip, rng.uniform(0.1, 0.15, n) * (1.5 - rc), a, 0.85)
        _fill(d, v(polys), color, rng.uniform(0.85, 1.03, n) - 0.15 * layer)
    disc = _jitter(rng, _pick(rng, (DARKBROWN, BROWN, (70, 60, 25)), (0.6, 0.3, 0.1)), 8)
    _fill(d, v(_ellipses(0, 0, [rc, rc * 0.55], [rc, rc * 0.55], 0, 24)), disc, [1.0, 0.75])
    s = np.arange(int(rng.integers(25, 45)))  # seed florets on a Fibonacci spiral
    rr, a = rc * 0.92 * np.sqrt((s + 1) / 45), s * 2.39996
    _fill(d, v(_ellipses(rr * np.cos(a), rr * np.sin(a), 0.025, 0.025, 0, 5)), disc, 1.5)


def _tulip(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, color: Color) -> None:
    """A cup of 3-6 tall rounded petals seen from the side (local y grows downwards; cup in [-0.9, 0.5])."""
    n = int(rng.integers(3, 7))
    width = rng.uniform(0.5, 0.68)
    top = rng.uniform(-0.95, -0.75)
    pointed = rng.uniform(0.0, 0.6)
    back = n // 2
    edge = _line_width(v, 0.025)
    for k in range(n):  # back petals first (darker, taller), then front petals
        front = k >= back
        slot = (k - back) / max(1, n - back - 1) if front else k / max(1, back - 1)
        x = (slot - 0.5) * width * (0.9 if front else 0.7)
        pw = width * rng.uniform(0.45, 0.6) / (1.0 if n < 5 else 1.2)
        tp = top + (0.12 if front else 0.0) + rng.normal(0, 0.04)
        pts = _petals(0.0, 0.5 - tp, pw, -math.pi / 2, pointed, 10) + (x, 0.5)
        f = rng.uniform(0.9, 1.05) if front else rng.uniform(0.65, 0.8)
        _fill(d, v(pts), color, f)
        if front:  # a soft crease down the middle of the petal
            d.line(v(np.array([[x, 0.45], [x, tp + 0.25]])), fill=_shade(color, f * 0.8), width=edge)
    base = _ellipses(0, 0.3, width * 0.55, 0.22, 0, 16)[0]  # rounded bottom joining the petals
    _fill(d, v(base[None, base[:, 1] >= 0.28]), color, 0.85)


_DRAW = {"daisy": _daisy, "dandelion": _dandelion, "roses": _rose, "sunflowers": _sunflower, "tulips": _tulip}


def _stem(d: ImageDraw.ImageDraw, rng: np.random.Generator, v: _View, side_view: bool) -> None:
    green = _jitter(rng, GREEN, 15)
    x0, y0, x1, y1 = v(np.array([[0.0, 0.5 if side_view else 0.0], [rng.normal(0, 0.3), 4.0]]))
    d.line([x0, y0, x1, y1], fill=_shade(green, 0.9), width=max(2, round(v.r * 0.08)))
    k = int(rng.integers(0, 3))  # a leaf or two along the stem
    if k == 0:
        return
    t = rng.uniform(0.3, 0.8, k)
    a = -math.pi / 2 + np.where(rng.random(k) < 0.5, 1, -1) * rng.uniform(0.3, 0.8, k)
    leaves = _petals(0.0, v.r * rng.uniform(0.8, 1.6, k), v.r * 0.15, a, 0.8, 8)
    leaves += np.stack([x0 + (x1 - x0) * t, y0 + (y1 - y0) * t], axis=1)[:, None, :]
    _fill(d, leaves.reshape(k, -1).tolist(), green, rng.uniform(0.8, 1.1, k))


# --------------------------------------------------------------------------- background and clutter


def _background(rng: np.random.Generator, w: int) -> Image.Image:
    """Out-of-focus gradient and blobs, drawn at a quarter of the canvas size and blurred, then grass and leaves."""
    lo = max(8, w // 4)
    c0 = np.asarray(_jitter(rng, _BG_BASES[int(rng.integers(len(_BG_BASES)))], 20), dtype=np.float32)
    c1 = np.asarray(_jitter(rng, _BG_BASES[int(rng.integers(len(_BG_BASES)))], 20), dtype=np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, lo, dtype=np.float32)
    t = np.clip(0.5 + ramp[None, :] * math.cos(a) + ramp[:, None] * math.sin(a), 0, 1)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    k = int(rng.integers(*_K["blobs"]))
    colors = rng.integers(len(_BLOB_COLORS), size=k)
    xy, rxy = rng.uniform(-0.1, 1.1, (k, 2)) * lo, rng.uniform(0.04, 0.25, (k, 2)) * lo
    blobs = _ellipses(xy[:, 0], xy[:, 1], rxy[:, 0], rxy[:, 1], rng.uniform(0, math.pi, k), 16)
    for poly, ci in zip(blobs.reshape(k, -1).tolist(), colors):
        d.polygon(poly, fill=_shade(_jitter(rng, _BLOB_COLORS[ci], 20), 1.0))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * lo / 64)).resize((w, w), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    _grass(d, rng, w, int(rng.integers(*_K["grass"])))
    _leaves(d, rng, w, int(rng.integers(*_K["leaves"])))
    return img


def _grass(d: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, n: int) -> None:
    x, y0 = rng.uniform(0, w, n), w * rng.uniform(0.7, 1.1, n)
    ln, a = w * rng.uniform(0.15, 0.6, n), -math.pi / 2 + rng.normal(0, 0.3, n)
    widths = np.maximum(1, rng.integers(1, 4, n) * w // 128)
    segs = np.stack([x, y0, x + ln * np.cos(a), y0 + ln * np.sin(a)], axis=1).tolist()
    for seg, lw in zip(segs, widths):
        d.line(seg, fill=_shade(_jitter(rng, (70, 130, 50), 25), 1.0), width=int(lw))


def _leaves(d: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, n: int) -> None:
    if n == 0:
        return
    xy, ln = rng.uniform(-0.1, 1.1, (n, 2)) * w, w * rng.uniform(0.12, 0.35, n)
    polys = _petals(0.0, ln, ln * rng.uniform(0.15, 0.3, n), rng.uniform(0, 2 * math.pi, n), 0.7, 8) + xy[:, None, :]
    for poly in polys.reshape(n, -1).tolist():
        c = _jitter(rng, GREEN, 20)
        f = rng.uniform(0.7, 1.2)
        d.polygon(poly, fill=_shade(c, f), outline=_shade(c, 0.6 * f))


def _lighting(rng: np.random.Generator, img: Image.Image) -> np.ndarray:
    """Brightness gradient, contrast, white balance and sensor noise."""
    a = np.asarray(img, dtype=np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, a.shape[0], dtype=np.float32)
    grad = 1.0 + rng.uniform(0.0, 0.6) * (ramp[None, :] * math.cos(ang) + ramp[:, None] * math.sin(ang))
    contrast = rng.uniform(0.7, 1.2)
    mean = a.mean()
    a = ((a - mean) * contrast + mean) * (rng.uniform(0.7, 1.25) * grad)[..., None]
    a *= rng.uniform(0.9, 1.1, 3).astype(np.float32)  # white balance
    a += rng.standard_normal(a.shape, dtype=np.float32) * rng.uniform(*_K["noise"])
    return np.clip(a, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- one image


def render(class_name: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Draw one `size` x `size` RGB image of `class_name` (one of `FLOWER_CLASSES`) from `rng`."""
    if class_name not in _DRAW:
        raise FlowerdistError(f"no synthetic flower class {class_name!r}: use one of {', '.join(FLOWER_CLASSES)}")
    w = size * _SS
    img = _background(rng, w)
    d = ImageDraw.Draw(img)
    side = class_name == "tulips"
    n_flowers = 1 + int(rng.choice(3, p=_K["extra"]))
    main_r = rng.uniform(*_K["radius"]) * w
    flowers = []
    for k in range(n_flowers):
        r = main_r if k == 0 else main_r * rng.uniform(0.45, 0.8)
        if k == 0 and rng.random() < _K["crop"][0]:  # cropped at the border
            cx, cy = rng.choice([-1, 1]) * rng.uniform(0.3, 0.45) * w + w / 2, rng.uniform(0.2, 0.8) * w
            if rng.random() < 0.5:
                cx, cy = cy, cx
        else:
            cx, cy = (0.5 + rng.uniform(-1, 1, 2) * _K["spread"][0]) * w
        flowers.append((r, cx, cy))
    flowers.sort()  # smaller (farther) flowers first
    petals = _PETALS[class_name]
    base_color = _pick(rng, *petals)
    for r, cx, cy in flowers:
        color = _jitter(rng, base_color if rng.random() < 0.7 else _pick(rng, *petals), 16)
        if side:
            v = _View(cx, cy, r, rng.normal(0, 0.35), 1.0)
        else:
            v = _View(cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.0))
        if rng.random() < (0.95 if side else 0.3):
            _stem(d, rng, v if side else _View(cx, cy, r, rng.normal(0, 0.3), 1.0), side)
        _DRAW[class_name](d, rng, v, color)
    if rng.random() < _K["occlude"][0]:  # occlusion in front of the flowers
        _leaves(d, rng, w, int(rng.integers(1, 3)))
        _grass(d, rng, w, int(rng.integers(0, 8)))
    img = img.reduce(_SS)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return Image.fromarray(_lighting(rng, img), "RGB")


def _image_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, class_index, index])


def _write_range(args: tuple[str, int, int, int, int, int]) -> int:
    tmp, class_index, start, stop, size, seed = args
    name = FLOWER_CLASSES[class_index]
    folder = Path(tmp) / name
    for i in range(start, stop):
        img = render(name, _image_rng(seed, class_index, i), size)
        img.save(folder / f"{name}_{i:05d}.jpg", "JPEG", quality=_JPEG_QUALITY)
    return stop - start


def generate(out: str | Path, per_class: int = 200, size: int = 128, seed: int = 0, workers: int = 1) -> Path:
    """Write `per_class` JPEGs of `size` px for each flower class under `out`; return `out`.

    Written atomically: into a hidden sibling folder, renamed to `out` only when complete.
    Raises `FlowerdistError` when `out` already exists and is not empty, or an argument is invalid.
    """
    out = Path(out)
    if per_class < 1:
        raise FlowerdistError(f"per_class={per_class} makes no images: pass --per-class 1 or more")
    if size < 16:
        raise FlowerdistError(f"size={size} px is too small to draw flowers: pass --size 16 or more")
    if seed < 0:
        raise FlowerdistError(f"seed={seed} is negative: pass a --seed of 0 or more")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FlowerdistError(f"{out} already exists: choose another --out or delete it")
    with atomic_dir(out) as tmp:
        for name in FLOWER_CLASSES:
            (tmp / name).mkdir(parents=True)
        step = max(1, math.ceil(per_class / 4))
        jobs = [
            (str(tmp), ci, s, min(per_class, s + step), size, seed)
            for ci in range(len(FLOWER_CLASSES))
            for s in range(0, per_class, step)
        ]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_range, jobs))
        else:
            for job in jobs:
                _write_range(job)
    return out
