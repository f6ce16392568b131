"""Procedural captioned scenes and the zoo's styles, rendered with numpy.

A scene is one shape of one colour at one position and size. Shapes are drawn
from signed distance functions (positive inside), which makes fills, outlines
and glows one-liners and keeps every style a pure function of the scene.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
# Centre of each position as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.29, 0.29),
    "top right": (0.71, 0.29),
    "bottom left": (0.29, 0.71),
    "bottom right": (0.71, 0.71),
    "center": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 0.15, "large": 0.25}  # radius / side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str
    dx: float = 0.0  # jitter, in fractions of the side
    dy: float = 0.0
    dr: float = 0.0

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.position)


def all_combos() -> list[tuple[str, str, str]]:
    return list(itertools.product(SHAPES, COLOURS, POSITIONS))


def split_combos(seed: int, held_out: int = 12) -> tuple[list, list]:
    """Hold out (shape, colour, position) combos that training never shows.

    Every shape, colour and position still appears in the train split, so the
    held-out captions test composition, not unseen words.
    """
    rng = np.random.default_rng(seed)
    combos = all_combos()
    for _ in range(1000):
        idx = rng.permutation(len(combos))
        test = [combos[i] for i in idx[:held_out]]
        train = [combos[i] for i in idx[held_out:]]
        if all({c[k] for c in train} == {c[k] for c in combos} for k in range(3)):
            return train, test
    raise RuntimeError("could not split combos with full coverage")


def sample_scenes(combos: list, n: int, rng: np.random.Generator) -> list[Scene]:
    out = []
    for _ in range(n):
        shape, colour, position = combos[rng.integers(len(combos))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        dx, dy = rng.uniform(-0.04, 0.04, size=2)
        dr = rng.uniform(-0.02, 0.02)
        out.append(Scene(shape, colour, position, size, float(dx), float(dy), float(dr)))
    return out


def _sdf(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance to the shape's edge, in pixels, positive inside."""
    cx, cy = POSITIONS[scene.position]
    side = xs.shape[-1] if xs.ndim else IMAGE_SIZE
    cx, cy = (cx + scene.dx) * IMAGE_SIZE, (cy + scene.dy) * IMAGE_SIZE
    r = (SIZES[scene.size] + scene.dr) * IMAGE_SIZE
    px, py = xs - cx, ys - cy
    del side
    if scene.shape == "circle":
        return r - np.hypot(px, py)
    if scene.shape == "square":
        return 0.85 * r - np.maximum(np.abs(px), np.abs(py))
    if scene.shape == "triangle":
        # Upward equilateral triangle (image y grows downwards); circumradius 1.2 r.
        R = 1.2 * r
        d_base = R / 2 - py
        d_left = R / 2 - (-0.866 * px - 0.5 * py)
        d_right = R / 2 - (0.866 * px - 0.5 * py)
        return np.minimum(d_base, np.minimum(d_left, d_right)) * 1.0
    raise ValueError(f"unknown shape {scene.shape!r}")


def _grid(supersample: int) -> tuple[np.ndarray, np.ndarray]:
    n = IMAGE_SIZE * supersample
    coords = (np.arange(n) + 0.5) / supersample
    return np.meshgrid(coords, coords)


def _downsample(img: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return img
    h, w, c = img.shape
    return img.reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))


def _fill(bg: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return bg * (1 - m) + np.asarray(colour, np.float32) * m


def _plain(c, xs):
    return np.broadcast_to(np.asarray(c, np.float32), xs.shape + (3,)).copy()


def _base(scene, sdf, xs, ys):
    return _fill(_plain((0.93, 0.93, 0.93), xs), sdf > 0, COLOURS[scene.colour])


def _pastel(scene, sdf, xs, ys):
    c = 0.45 * np.asarray(COLOURS[scene.colour]) + 0.55
    return _fill(_plain((1.0, 0.93, 0.82), xs), sdf > 0, c)


def _neon(scene, sdf, xs, ys):
    # Filled, over-bright shape with a wide glow on black: distinct from every
    # other style even after the autoencoder's low-pass.
    c = np.asarray(COLOURS[scene.colour], np.float32)
    img = _plain((0.02, 0.02, 0.06), xs)
    glow = np.exp(-np.maximum(-sdf, 0) / 2.5)[..., None]
    img = img + 0.6 * glow * c
    return _fill(img, sdf > 0, np.minimum(c * 0.8 + 0.35, 1.0))


def _sepia(scene, sdf, xs, ys):
    base = _base(scene, sdf, xs, ys)
    lum = base @ np.asarray([0.3, 0.59, 0.11], np.float32)
    return np.stack([lum * 0.95 + 0.04, lum * 0.75 + 0.03, lum * 0.5 + 0.02], axis=-1)


def _blueprint(scene, sdf, xs, ys):
    img = _plain((0.10, 0.22, 0.55), xs)
    grid = ((xs % 8) < 0.6) | ((ys % 8) < 0.6)
    img = _fill(img, grid, (0.35, 0.5, 0.8))
    img = _fill(img, sdf > 0, COLOURS[scene.colour])
    return _fill(img, np.abs(sdf) < 1.0, (0.97, 0.97, 1.0))


def _stripes(scene, sdf, xs, ys):
    band = ((xs + ys) % 8) < 4
    img = _fill(_plain((0.98, 0.97, 0.9), xs), band, (0.45, 0.8, 0.75))
    img = _fill(img, sdf > 0, COLOURS[scene.colour])
    return _fill(img, np.abs(sdf) < 0.8, (0.08, 0.08, 0.08))


STYLES: dict[str, Callable] = {
    "base": _base,
    "pastel": _pastel,
    "neon": _neon,
    "sepia": _sepia,
    "blueprint": _blueprint,
    "stripes": _stripes,
}
TEACHER_STYLES = tuple(s for s in STYLES if s != "base")


def render(scene: Scene, style: str = "base", supersample: int = 4) -> np.ndarray:
    """Render one scene as float32 HxWx3 in [0, 1], anti-aliased by supersampling."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    xs, ys = _grid(supersample)
    img = STYLES[style](scene, _sdf(scene, xs, ys), xs, ys)
    return np.clip(_downsample(img.astype(np.float32), supersample), 0.0, 1.0)


def render_batch(scenes: list[Scene], style: str = "base", supersample: int = 4) -> np.ndarray:
    """Render scenes as float32 NxHxWx3 in [0, 1]."""
    return np.stack([render(s, style, supersample) for s in scenes])
