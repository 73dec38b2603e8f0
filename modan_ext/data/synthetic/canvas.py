"""The canvas a synthetic image is drawn on: tissue codes, the per-image random generator and
pose, and the shapes that scenes paint (ellipses, rods, boxes, lobulated blobs)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# tissue classes of a scene
AIR, SOFT, FAT, ORGAN, FLUID, BONE, LESION, LIGAMENT, CALCIFICATION, DENSE_LESION = range(10)
N_TISSUES = 10
OVERSAMPLE = 2  # scenes are drawn at 2x and averaged down: smooth edges without blur in CT


@dataclass
class Canvas:
    """Scene coordinates of every pixel (x right, y down, about [-1, 1]) after the image's
    random pose, and the label map being painted."""

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray

    def paint(self, mask: np.ndarray, tissue: int) -> None:
        self.labels[mask] = tissue


def make_canvas(size: int, rng, zoom: float = 1.0, centre=(0.0, 0.0), rotate_deg: float = 12.0,
                background: int = AIR) -> Canvas:
    """An empty canvas of `size` x `size` pixels (drawn at OVERSAMPLE x), posed by `rng`: a small
    random rotation, scale and shift of the scene, then `zoom` towards `centre`."""
    n = size * OVERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    scale = rng.uniform(0.88, 1.12) / zoom
    shift = rng.normal(0.0, 0.04, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    x = (cos * gx - sin * gy) * scale + centre[0] + shift[0]
    y = (sin * gx + cos * gy) * scale + centre[1] + shift[1]
    return Canvas(x, y, np.full((n, n), background, dtype=np.int8))


def ellipse(c: Canvas, cx, cy, a, b, angle_deg=0.0) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    dx, dy = c.x - cx, c.y - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def capsule(c: Canvas, p0, p1, radius) -> np.ndarray:
    """Points within `radius` of the segment p0-p1 (a rod: bones, ligaments)."""
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((c.x - x0) * vx + (c.y - y0) * vy) / max(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
    return (c.x - x0 - t * vx) ** 2 + (c.y - y0 - t * vy) ** 2 <= radius ** 2


def box(c: Canvas, cx, cy, w, h, angle_deg=0.0) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    dx, dy = c.x - cx, c.y - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def blob(c: Canvas, cx, cy, radius, aspect=1.0, angle_deg=0.0, harmonics=()) -> np.ndarray:
    """A closed shape r(theta) = radius * (1 + sum a_k cos(k theta + phase_k)): a smooth oval
    with no harmonics, lobulated with low k, spiculated/irregular with high k. `aspect` > 1 is
    taller than wide."""
    t = np.deg2rad(angle_deg)
    dx, dy = c.x - cx, c.y - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = (-dx * np.sin(t) + dy * np.cos(t)) / aspect
    theta = np.arctan2(v, u)
    r = np.full_like(theta, radius)
    for k, amplitude, phase in harmonics:
        r = r + radius * amplitude * np.cos(k * theta + phase)
    return np.hypot(u, v) <= r


def irregular_harmonics(rng, amplitude: float, high: bool) -> list:
    """Margin harmonics: spread over high orders (spiculated) or low orders (lobulated)."""
    orders = rng.choice(np.arange(5, 12) if high else np.arange(2, 5), size=3, replace=False)
    weights = rng.dirichlet(np.ones(3))
    return [(int(k), amplitude * float(w), rng.uniform(0, 2 * np.pi)) for k, w in zip(orders, weights)]


def image_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of one image: a function of (seed, stream, index) only, so an image does not
    depend on how many others are drawn, or in which order."""
    key = [ord(ch) for ch in stream]
    return np.random.default_rng([seed, index, *key])
