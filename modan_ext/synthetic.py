"""A deterministic, procedurally generated "mini-RadImageNet" and three downstream tasks.

This is SYNTHETIC data, made so the whole pipeline runs on a fresh machine with nothing
downloaded. It imitates the *structure* of the paper's data, not its content:

* each image is a map of tissue classes drawn from an anatomy-specific scene (head with skull
  and ventricles, knee with femur/tibia/patella, chest with lungs and ribs, ...), with per-image
  random pose, size and shape;
* a modality renders the map: CT with flat tissue values and sharp bone/air edges, MR with smooth
  edges, T1 or T2 contrast and a multiplicative bias field, US inside a fan-shaped sector with
  speckle, depth attenuation and acoustic shadows behind bone and air;
* the modality/anatomy pairs are RadImageNet's (CT: abd, lung; MR: abd, af, brain, hip, knee,
  shoulder, spine; US: abd, thyroid), and each pair has three "pathology" leaves (normal, mass,
  fluid), so the leaf classes play the role of RadImageNet's 165 classes.

Downstream binary tasks reuse the same renderers with a small lesion whose class signal is
subtle and overlapping (`make_downstream_task`): ACL tear on knee MR, malignancy on breast-like
US and on thyroid US, like the paper's three evaluations.

Every image is drawn from its own `numpy.random.Generator` seeded by (seed, set, index), so an
image does not depend on how many others are generated or in which order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .readers import DownstreamTask, ImageSet

COMBINATIONS = (("CT", "abd"), ("CT", "lung"),
                ("MR", "abd"), ("MR", "af"), ("MR", "brain"), ("MR", "hip"), ("MR", "knee"),
                ("MR", "shoulder"), ("MR", "spine"),
                ("US", "abd"), ("US", "thyroid"))
PATHOLOGIES = ("normal", "mass", "fluid")
TASKS = ("acl", "breast", "thyroid")

# tissue classes of a scene
AIR, SOFT, FAT, ORGAN, FLUID, BONE, LESION, LIGAMENT, CALCIFICATION, DENSE_LESION = range(10)
N_TISSUES = 10
OVERSAMPLE = 2  # scenes are drawn at 2x and averaged down: smooth edges without blur in CT

# ---- geometry ---------------------------------------------------------------------------------


@dataclass
class Canvas:
    """Scene coordinates of every pixel (x right, y down, about [-1, 1]) after the image's
    random pose, and the label map being painted."""

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray

    def paint(self, mask: np.ndarray, tissue: int) -> None:
        self.labels[mask] = tissue


def _canvas(size: int, rng, zoom: float = 1.0, centre=(0.0, 0.0), rotate_deg: float = 12.0,
            background: int = AIR) -> Canvas:
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


# ---- anatomy scenes ---------------------------------------------------------------------------
# Each draws one anatomy on a canvas; `j` jitters a parameter by a relative amount.

def _jitter(rng):
    return lambda value, rel=0.1: value * (1.0 + rng.uniform(-rel, rel))


def scene_abd(c, rng):
    j = _jitter(rng)
    c.paint(ellipse(c, 0, 0, j(0.88), j(0.66)), FAT)
    c.paint(ellipse(c, 0, 0, j(0.8), j(0.58)), SOFT)
    c.paint(ellipse(c, j(-0.33), j(-0.12), j(0.36), j(0.3), rng.uniform(-20, 20)), ORGAN)  # liver
    c.paint(ellipse(c, j(0.45), j(-0.15), j(0.15), j(0.11)), ORGAN)                        # spleen
    for side in (-1, 1):                                                                   # kidneys
        c.paint(ellipse(c, side * j(0.3), j(0.26), j(0.09), j(0.14), side * 20), ORGAN)
    for _ in range(rng.integers(3, 7)):                                                    # bowel
        c.paint(ellipse(c, rng.uniform(-0.2, 0.4), rng.uniform(-0.1, 0.25), j(0.06, 0.4),
                        j(0.05, 0.4)), AIR if rng.random() < 0.5 else FAT)
    c.paint(ellipse(c, j(0.07), j(0.18), j(0.05), j(0.05)), FLUID)                          # aorta
    c.paint(ellipse(c, 0, j(0.42), j(0.12), j(0.11)), BONE)                                 # vertebra
    c.paint(capsule(c, (0, 0.45), (0, j(0.6)), j(0.04)), BONE)


def scene_lung(c, rng):
    j = _jitter(rng)
    c.paint(ellipse(c, 0, 0, j(0.92), j(0.66)), FAT)
    c.paint(ellipse(c, 0, 0, j(0.86), j(0.6)), SOFT)
    for side in (-1, 1):
        c.paint(ellipse(c, side * j(0.4), j(-0.04), j(0.3), j(0.44), side * rng.uniform(-8, 8)), AIR)
    for _ in range(rng.integers(8, 16)):                                                   # vessels
        c.paint(ellipse(c, rng.choice([-1, 1]) * rng.uniform(0.2, 0.6), rng.uniform(-0.35, 0.3),
                        0.025, 0.025), SOFT)
    c.paint(ellipse(c, j(0.08), j(0.1), j(0.25), j(0.22)), ORGAN)                           # heart
    c.paint(ellipse(c, 0, j(0.46), j(0.11), j(0.1)), BONE)                                  # vertebra
    c.paint(ellipse(c, 0, j(-0.55), j(0.08), j(0.04)), BONE)                                # sternum
    for angle in np.linspace(0.25, np.pi - 0.25, 8):                                       # ribs
        for side in (-1, 1):
            c.paint(ellipse(c, side * 0.82 * np.cos(angle - np.pi / 2 + 0.3),
                            0.56 * np.sin(angle - np.pi / 2) + 0.02, 0.05, 0.035), BONE)


def scene_brain(c, rng):
    j = _jitter(rng)
    a, b = j(0.78), j(0.9)
    c.paint(ellipse(c, 0, 0, a, b), FAT)                                                   # scalp
    c.paint(ellipse(c, 0, 0, a - 0.05, b - 0.05), BONE)                                    # skull
    c.paint(ellipse(c, 0, 0, a - 0.11, b - 0.11), ORGAN)                                   # brain
    c.paint(box(c, 0, -0.45, 0.03, 0.5), FLUID)                                            # fissure
    tilt = rng.uniform(8, 22)
    for side in (-1, 1):
        c.paint(ellipse(c, side * j(0.11), j(-0.04), j(0.055), j(0.22), side * tilt), FLUID)
    for _ in range(rng.integers(4, 9)):                                                    # sulci
        t = rng.uniform(0, 2 * np.pi)
        c.paint(ellipse(c, (a - 0.2) * np.cos(t), (b - 0.2) * np.sin(t), 0.02, 0.08,
                        np.rad2deg(t)), FLUID)


def _long_bone(c, p0, p1, radius, marrow=True):
    c.paint(capsule(c, p0, p1, radius), BONE)
    if marrow:  # fatty marrow: bright on MR, grey on CT
        c.paint(capsule(c, p0, p1, radius * 0.65), FAT)


def scene_knee(c, rng, acl_tear: float | None = None, edema: bool = False):
    """Sagittal knee. `acl_tear`: None draws no separate ACL detail (pretraining), 0 an intact
    ACL, > 0 a tear with a gap of that fraction of its length."""
    j = _jitter(rng)
    c.paint(capsule(c, (0, -1.3), (0, 1.3), j(0.62)), FAT)
    c.paint(capsule(c, (0, -1.3), (0, 1.3), j(0.55)), SOFT)
    gap = j(0.14)
    _long_bone(c, (0, -1.3), (0.02, -gap - 0.25), j(0.3))                                 # femur
    c.paint(ellipse(c, 0.04, -gap - 0.2, j(0.34), j(0.22)), BONE)                          # condyle
    c.paint(ellipse(c, 0.04, -gap - 0.2, j(0.27), j(0.16)), FAT)
    _long_bone(c, (0.0, gap + 0.15), (0, 1.3), j(0.27))                                    # tibia
    c.paint(box(c, 0.0, gap + 0.1, j(0.62), 0.12), BONE)                                   # plateau
    c.paint(box(c, 0.02, 0, j(0.55), gap * 1.6), FLUID if edema else SOFT)                 # joint
    c.paint(ellipse(c, j(-0.45), j(-0.22), j(0.07), j(0.17), 10), BONE)                    # patella
    c.paint(capsule(c, (-0.46, 0.0), (-0.3, gap + 0.25), 0.035), LIGAMENT)                 # patellar t.
    if acl_tear is None:
        c.paint(capsule(c, (0.2, -gap - 0.05), (-0.12, gap + 0.05), 0.04), LIGAMENT)
        return
    # ACL through the notch: posterior femur (top right) to anterior tibia (bottom left)
    top, bottom = np.array([j(0.22), -gap - 0.12]), np.array([j(-0.14), gap + 0.1])
    c.paint(capsule(c, top, bottom, 0.11), FAT)                                            # notch fat
    width = j(0.045, 0.2)
    if acl_tear <= 0:
        c.paint(capsule(c, top, bottom, width), LIGAMENT)
        return
    middle = rng.uniform(0.35, 0.65)
    lo, hi = middle - acl_tear / 2, middle + acl_tear / 2
    c.paint(capsule(c, top, top + (bottom - top) * lo, width * 1.2), LIGAMENT)
    c.paint(capsule(c, top + (bottom - top) * hi, bottom, width * 1.2), LIGAMENT)
    centre = top + (bottom - top) * middle
    c.paint(ellipse(c, centre[0], centre[1], 0.06 + acl_tear * 0.2, 0.05), FLUID)          # edema


def scene_af(c, rng):
    j = _jitter(rng)
    c.paint(capsule(c, (-0.2, -1.3), (-0.2, 0.25), j(0.32)), SOFT)                          # leg
    c.paint(capsule(c, (-0.4, 0.38), (0.9, 0.5), j(0.24)), SOFT)                            # foot
    _long_bone(c, (-0.2, -1.3), (-0.2, j(0.0)), j(0.13))                                   # tibia
    c.paint(ellipse(c, -0.18, j(0.17), j(0.15), j(0.1)), BONE)                              # talus
    c.paint(ellipse(c, j(-0.42), j(0.42), j(0.2), j(0.12), 10), BONE)                       # calcaneus
    c.paint(ellipse(c, j(-0.42), j(0.42), j(0.14), j(0.07), 10), FAT)
    for k in range(3):                                                                     # metatarsals
        c.paint(capsule(c, (0.05 + 0.05 * k, 0.33 + 0.04 * k), (j(0.75), 0.42 + 0.03 * k), 0.035), BONE)
    c.paint(capsule(c, (-0.45, 0.3), (-0.3, -0.6), 0.03), LIGAMENT)                         # Achilles


def scene_hip(c, rng):
    j = _jitter(rng)
    c.paint(ellipse(c, 0, 0.1, j(0.98), j(0.8)), FAT)
    c.paint(ellipse(c, 0, 0.1, j(0.9), j(0.72)), SOFT)
    c.paint(ellipse(c, 0, j(0.12), j(0.17), j(0.12)), FLUID)                                # bladder
    c.paint(ellipse(c, 0, j(-0.35), j(0.12), j(0.2)), BONE)                                 # sacrum
    for side in (-1, 1):
        head = (side * j(0.45), j(0.05))
        c.paint(capsule(c, (side * 0.42, -0.15), (side * j(0.72), j(-0.62)), j(0.1)), BONE)   # ilium
        c.paint(ellipse(c, head[0], head[1] - 0.02, 0.2, 0.18), BONE)                         # acetabulum
        c.paint(ellipse(c, head[0], head[1], 0.165, 0.165), SOFT)                             # cartilage
        _long_bone(c, head, (side * j(0.62), 1.2), j(0.09))                                   # neck+shaft
        c.paint(ellipse(c, head[0], head[1], j(0.14), j(0.14)), BONE)                         # femoral head
        c.paint(ellipse(c, head[0], head[1], 0.09, 0.09), FAT)


def scene_shoulder(c, rng):
    j = _jitter(rng)
    c.paint(ellipse(c, 0.05, 0.1, j(0.95), j(0.85)), FAT)
    c.paint(ellipse(c, 0.05, 0.1, j(0.88), j(0.78)), SOFT)
    head = (j(0.18), j(0.08))
    _long_bone(c, head, (j(0.45), 1.2), j(0.17))                                           # humerus
    c.paint(ellipse(c, head[0], head[1], j(0.3), j(0.3)), BONE)
    c.paint(ellipse(c, head[0], head[1], 0.22, 0.22), FAT)
    c.paint(ellipse(c, j(-0.25), j(0.06), j(0.07), j(0.2)), BONE)                           # glenoid
    c.paint(capsule(c, (-0.35, -0.5), (j(0.42), j(-0.38)), j(0.06)), BONE)                  # acromion
    t = np.arctan2(c.y - head[1], c.x - head[0])
    r = np.hypot(c.x - head[0], c.y - head[1])
    c.paint((r > 0.31) & (r < 0.36) & (t < -0.4) & (t > -2.4), LIGAMENT)                    # cuff


def scene_spine(c, rng):
    j = _jitter(rng)
    bend = rng.uniform(-0.12, 0.12)
    xs = lambda y: bend * np.sin(np.pi * y)  # noqa: E731  (lordosis)
    c.paint(box(c, 0.1, 0, j(1.5), 2.4), SOFT)
    c.paint(box(c, 0.85, 0, 0.3, 2.4), FAT)
    count = rng.integers(5, 7)
    pitch = 2.1 / count
    for k in range(count):
        y = -1.05 + pitch * (k + 0.5)
        c.paint(box(c, -0.2 + xs(y), y, j(0.42), pitch * 0.72, bend * 30), BONE)             # body
        c.paint(box(c, -0.2 + xs(y), y, 0.3, pitch * 0.5, bend * 30), FAT)                   # marrow
        c.paint(box(c, -0.2 + xs(y), y + pitch / 2, 0.4, pitch * 0.26, bend * 30), ORGAN)    # disc
        c.paint(box(c, 0.42 + xs(y), y, 0.18, pitch * 0.45), BONE)                           # process
    c.paint(capsule(c, (0.12, -1.3), (0.12, 1.3), j(0.09)), FLUID)                           # canal
    c.paint(capsule(c, (0.12, -1.3), (0.12, 0.7), j(0.045)), ORGAN)                          # cord


def scene_thyroid(c, rng, nodule=None):
    j = _jitter(rng)
    c.paint(ellipse(c, 0, 0, j(0.85), j(0.72)), FAT)
    c.paint(ellipse(c, 0, 0, j(0.8), j(0.66)), SOFT)
    c.paint(ellipse(c, 0, j(0.42), j(0.16), j(0.14)), BONE)                                 # vertebra
    for side in (-1, 1):
        c.paint(ellipse(c, side * j(0.46), j(-0.02), j(0.065), j(0.065)), FLUID)             # carotid
        c.paint(ellipse(c, side * j(0.6), j(-0.12), j(0.08), j(0.05)), FLUID)                # jugular
        c.paint(ellipse(c, side * j(0.26), j(-0.16), j(0.18), j(0.11), side * 25), ORGAN)    # lobe
    c.paint(box(c, 0, j(-0.3), 0.3, 0.07), ORGAN)                                          # isthmus
    c.paint(ellipse(c, 0, j(-0.08), j(0.14), j(0.14)), LIGAMENT)                            # cartilage
    c.paint(ellipse(c, 0, -0.08, 0.1, 0.1), AIR)                                           # trachea


SCENES = {"abd": scene_abd, "lung": scene_lung, "brain": scene_brain, "knee": scene_knee,
          "af": scene_af, "hip": scene_hip, "shoulder": scene_shoulder, "spine": scene_spine,
          "thyroid": scene_thyroid}

# Ultrasound shows a small window under the probe: where each anatomy is looked at, and zoom.
US_WINDOWS = {"abd": ((-0.3, -0.15), 2.2), "thyroid": ((-0.2, -0.2), 1.9)}


# ---- pretraining pathologies ------------------------------------------------------------------

def add_pathology(c: Canvas, rng, pathology: str) -> None:
    """A generic finding inside the body: a round mass or a fluid collection (pretraining
    leaves; the downstream tasks' irregular-margin lesions are deliberately not among them)."""
    if pathology == "normal":
        return
    inside = np.argwhere(c.labels != AIR)
    if len(inside) == 0:
        return
    row, col = inside[rng.integers(len(inside))]
    x, y = c.x[row, col], c.y[row, col]
    if pathology == "mass":
        c.paint(ellipse(c, x, y, rng.uniform(0.1, 0.18), rng.uniform(0.1, 0.18),
                        rng.uniform(0, 180)) & (c.labels != AIR), LESION)
    elif pathology == "fluid":
        c.paint(ellipse(c, x, y, rng.uniform(0.14, 0.28), rng.uniform(0.07, 0.12),
                        rng.uniform(0, 180)) & (c.labels != AIR), FLUID)
    else:
        raise ValueError(f"unknown pathology {pathology!r}; known: {PATHOLOGIES}")


# ---- modality renderers -----------------------------------------------------------------------

@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian smoothing matrix: blur(img) = G @ img @ G.T (edges renormalised)."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    idx = np.arange(n)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def blur(image: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    sigma_x = sigma_y if sigma_x is None else sigma_x
    n_y, n_x = image.shape
    return _blur_matrix(n_y, round(float(sigma_y), 2)) @ image @ _blur_matrix(n_x, round(float(sigma_x), 2)).T


def downsample(image: np.ndarray) -> np.ndarray:
    n = image.shape[0] // OVERSAMPLE
    return image.reshape(n, OVERSAMPLE, n, OVERSAMPLE).mean(axis=(1, 3))


#                      AIR   SOFT  FAT   ORGAN FLUID BONE  LESION LIG  CALC  DENSE
# (a mass enhances on CT and is bright on MR, so that the pathology leaves are visible at all)
CT_VALUES = np.array([0.00, 0.45, 0.28, 0.52, 0.38, 0.95, 0.72, 0.50, 1.00, 0.72], dtype=np.float32)
MR_T1 = np.array([0.03, 0.40, 0.85, 0.50, 0.15, 0.08, 0.68, 0.06, 0.05, 0.68], dtype=np.float32)
MR_T2 = np.array([0.03, 0.35, 0.60, 0.45, 0.92, 0.08, 0.80, 0.06, 0.05, 0.80], dtype=np.float32)
US_ECHO = np.array([0.90, 0.55, 0.35, 0.65, 0.03, 1.00, 0.22, 0.85, 1.00, 0.22], dtype=np.float32)
# how much each tissue attenuates the beam per unit depth (bone and air: a shadow behind them)
US_ATTENUATION = np.array([6.0, 0.25, 0.3, 0.25, 0.02, 6.0, 0.5, 0.3, 4.0, 2.5], dtype=np.float32)


def render_ct(labels: np.ndarray, rng) -> np.ndarray:
    values = CT_VALUES + rng.normal(0, 0.015, size=N_TISSUES).astype(np.float32)
    image = values[labels]
    image = image + rng.normal(0, rng.uniform(0.01, 0.03), size=image.shape)
    return downsample(image)


def render_mr(labels: np.ndarray, rng, weighting: str | None = None) -> np.ndarray:
    weighting = weighting or ("T1" if rng.random() < 0.5 else "T2")
    table = MR_T1 if weighting == "T1" else MR_T2
    image = (table + rng.normal(0, 0.03, size=N_TISSUES).astype(np.float32))[labels]
    image = blur(image, rng.uniform(1.0, 2.0))  # smooth tissue boundaries
    n = image.shape[0]
    coords = np.linspace(-1, 1, n, dtype=np.float32)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    b = rng.normal(0, 0.25, size=4)
    image = image * np.exp(b[0] * gx + b[1] * gy + b[2] * gx * gy - abs(b[3]) * (gx ** 2 + gy ** 2))
    sigma = rng.uniform(0.015, 0.04)  # Rician noise: magnitude of a complex signal
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return downsample(image)


def render_us(labels: np.ndarray, rng) -> np.ndarray:
    n = labels.shape[0]
    echo = (US_ECHO + rng.normal(0, 0.04, size=N_TISSUES).astype(np.float32))[labels]
    # attenuation accumulates with depth (down the image): shadows behind bone, air, calcium
    loss = np.cumsum(US_ATTENUATION[labels], axis=0) / n
    shadow = np.exp(-loss * rng.uniform(1.5, 2.5))
    # bright interface where the beam first meets bone or air
    strong = np.isin(labels, (BONE, AIR, CALCIFICATION)).astype(np.float32)
    first = np.clip(strong - np.vstack([np.zeros((1, n), np.float32), strong[:-1]]), 0, 1)
    echo = echo * (1 - 0.6 * strong) + 0.9 * first
    # speckle: magnitude of smoothed complex noise, stretched sideways (lateral resolution)
    noise = rng.normal(size=(2, n, n)).astype(np.float32)
    sx, sy = rng.uniform(1.6, 2.6), rng.uniform(0.7, 1.1)
    speckle = np.hypot(blur(noise[0], sy, sx), blur(noise[1], sy, sx))
    speckle /= speckle.mean() + 1e-6
    # partly averaged speckle (compounding): organ boundaries stay visible at small sizes
    image = blur(echo * shadow, 0.8) * (0.45 + 0.55 * speckle)
    # fan-shaped sector with its apex above the image; depth-dependent gain
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    apex_y, half_angle = -0.18 * n, np.deg2rad(rng.uniform(30, 38))
    dx, dy = cols - n / 2, rows - apex_y
    radius, angle = np.hypot(dx, dy), np.arctan2(dx, dy)
    fan = (np.abs(angle) <= half_angle) & (radius >= 0.25 * n) & (radius <= 1.12 * n)
    gain = np.exp(-rng.uniform(0.2, 0.6) * rows / n)
    image = np.where(fan, np.log1p(3 * image * gain) / np.log1p(3 * 1.5), 0.0)
    return downsample(image.astype(np.float32))


def render(modality: str, labels: np.ndarray, rng) -> np.ndarray:
    image = {"CT": render_ct, "MR": render_mr, "US": render_us}[modality](labels, rng)
    return np.clip(image, 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# ---- image sets -------------------------------------------------------------------------------

def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    key = [ord(ch) for ch in stream]
    return np.random.default_rng([seed, index, *key])


def anatomy_canvas(modality: str, anatomy: str, size: int, rng) -> Canvas:
    if modality == "US":
        centre, zoom = US_WINDOWS.get(anatomy, ((0.0, 0.0), 1.8))
        return _canvas(size, rng, zoom=zoom, centre=centre, rotate_deg=6.0, background=SOFT)
    return _canvas(size, rng)


def make_image(modality: str, anatomy: str, pathology: str, size: int, rng) -> np.ndarray:
    """One synthetic image, float32 [size, size] in [0, 1]."""
    canvas = anatomy_canvas(modality, anatomy, size, rng)
    SCENES[anatomy](canvas, rng)
    add_pathology(canvas, rng, pathology)
    return render(modality, canvas.labels, rng)


def make_pretraining_set(images_per_leaf: int = 30, size: int = 40, seed: int = 0,
                         combinations=COMBINATIONS, pathologies=PATHOLOGIES) -> ImageSet:
    """The synthetic mini-RadImageNet: `images_per_leaf` images for each modality/anatomy pair
    and pathology (the defaults: 11 x 3 leaves x 30 = 990 images), labels as in the paper."""
    images, fields, leaves = [], [], []
    for combo_index, (modality, anatomy) in enumerate(combinations):
        for pathology in pathologies:
            leaf = f"{modality}/{anatomy}/{pathology}"
            for i in range(images_per_leaf):
                rng = _rng(seed, leaf, i)
                images.append(to_uint8(make_image(modality, anatomy, pathology, size, rng)))
                fields.append({"modality": modality, "anatomy": anatomy})
                leaves.append(leaf)
    tensor = torch.from_numpy(np.stack(images))[:, None]
    return ImageSet(tensor, fields, leaves)


# ---- downstream tasks -------------------------------------------------------------------------
# Each returns (image, target). The malignant/torn class differs by a few overlapping cues, so
# that neither an ideal model reaches AUC 1 nor a blind one gets anything: the point is whether
# pretraining helps to pick up a subtle signal from ~100-200 training images.

def _acl_image(size, rng, torn: bool):
    canvas = _canvas(size, rng, rotate_deg=8.0)
    tear = rng.uniform(0.12, 0.4) if torn else 0.0
    scene_knee(canvas, rng, acl_tear=tear, edema=rng.random() < (0.55 if torn else 0.3))
    if not torn and rng.random() < 0.3:  # mucoid degeneration: bright patch, no gap (a mimic)
        canvas.paint(ellipse(canvas, 0.04, 0.0, 0.06, 0.04) & (canvas.labels == LIGAMENT), FLUID)
    return render_mr(canvas.labels, rng)


def _lesion_shape(rng, malignant: bool):
    """Radius, aspect (height/width), harmonics of a breast/thyroid lesion."""
    if malignant:
        aspect = rng.uniform(0.75, 1.35)                    # often taller than wide
        harmonics = irregular_harmonics(rng, rng.uniform(0.06, 0.28), high=rng.random() < 0.7)
    else:
        aspect = rng.uniform(0.5, 1.0)                      # wider than tall
        harmonics = irregular_harmonics(rng, rng.uniform(0.0, 0.12), high=rng.random() < 0.25)
    return rng.uniform(0.16, 0.27), aspect, harmonics


def _breast_image(size, rng, malignant: bool):
    canvas = _canvas(size, rng, rotate_deg=4.0, background=FAT)
    c = canvas
    skin = rng.uniform(-0.95, -0.85)
    c.paint(c.y < skin, SOFT)
    c.paint(np.abs(c.y - skin) < 0.025, LIGAMENT)                                       # skin line
    gland_top, gland_bottom = rng.uniform(-0.6, -0.35), rng.uniform(0.25, 0.45)
    wave = 0.06 * np.sin(3 * c.x + rng.uniform(0, 6))
    c.paint((c.y > gland_top + wave) & (c.y < gland_bottom + wave), ORGAN)               # gland
    for _ in range(rng.integers(3, 6)):                                                  # Cooper lig.
        x0 = rng.uniform(-0.8, 0.8)
        c.paint(capsule(c, (x0, skin), (x0 + rng.uniform(-0.3, 0.3), gland_top + 0.1), 0.012), LIGAMENT)
    c.paint(c.y > gland_bottom + 0.12 + wave, SOFT)                                      # pectoralis
    for x0 in (rng.uniform(-0.7, -0.2), rng.uniform(0.2, 0.7)):                          # ribs
        c.paint(ellipse(c, x0, rng.uniform(0.85, 0.95), 0.16, 0.08), BONE)
    cx, cy = rng.uniform(-0.35, 0.35), rng.uniform(-0.2, 0.15)
    radius, aspect, harmonics = _lesion_shape(rng, malignant)
    lesion = blob(c, cx, cy, radius, aspect, rng.uniform(-15, 15), harmonics)
    c.paint(lesion, LESION)
    if rng.random() < (0.55 if malignant else 0.2):      # dense stroma: posterior acoustic shadow
        c.paint(lesion, DENSE_LESION)
    elif rng.random() < (0.15 if malignant else 0.5):    # cyst-like centre: posterior enhancement
        c.paint(blob(c, cx, cy, radius * 0.6, aspect, 0, ()) & lesion, FLUID)
    return render_us(c.labels, rng)


def _thyroid_image(size, rng, malignant: bool):
    centre, zoom = US_WINDOWS["thyroid"]
    canvas = _canvas(size, rng, zoom=zoom, centre=centre, rotate_deg=6.0, background=SOFT)
    scene_thyroid(canvas, rng)
    cx, cy = centre[0] + rng.uniform(-0.08, 0.08), centre[1] + rng.uniform(-0.05, 0.05)
    radius, aspect, harmonics = _lesion_shape(rng, malignant)
    radius *= 0.7
    lesion = blob(canvas, cx, cy, radius, aspect, rng.uniform(-15, 15), harmonics)
    canvas.paint(lesion, LESION)
    if not malignant and rng.random() < 0.5:                                            # cystic part
        canvas.paint(blob(canvas, cx, cy, radius * 0.55, 1.0, 0, ()) & lesion, FLUID)
    if rng.random() < (0.45 if malignant else 0.1):                                     # microcalc.
        for _ in range(rng.integers(2, 5)):
            px, py = cx + rng.uniform(-0.6, 0.6) * radius, cy + rng.uniform(-0.6, 0.6) * radius
            canvas.paint(ellipse(canvas, px, py, 0.012, 0.012) & lesion, CALCIFICATION)
    return render_us(canvas.labels, rng)


TASK_MAKERS = {"acl": (_acl_image, 0.4), "breast": (_breast_image, 0.35),
               "thyroid": (_thyroid_image, 0.6)}
PAPER_TASK_SIZES = {"acl": 1021, "breast": 779, "thyroid": 349}  # MRNet, BUSI, thyroid sets


def make_downstream_task(name: str, n_images: int = 200, size: int = 40, seed: int = 0,
                         folds: int = 5) -> DownstreamTask:
    """A synthetic binary task ("acl", "breast", "thyroid") with fixed stratified folds
    (train / val / test = 3 / 1 / 1 parts, like the RadImageNet repository's fold CSVs)."""
    if name not in TASK_MAKERS:
        raise ValueError(f"unknown task {name!r}; known: {TASKS}")
    maker, prevalence = TASK_MAKERS[name]
    n_positive = int(round(n_images * prevalence))
    targets = np.array([1] * n_positive + [0] * (n_images - n_positive), dtype=np.int64)
    images = [to_uint8(np.clip(maker(size, _rng(seed, f"task/{name}", i), bool(t)), 0, 1))
              for i, t in enumerate(targets)]
    tensor = torch.from_numpy(np.stack(images))[:, None]
    return DownstreamTask(name, tensor, targets,
                          stratified_folds(targets, folds, _rng(seed, f"folds/{name}", 0)))


def stratified_folds(targets: np.ndarray, k: int, rng) -> list[tuple[np.ndarray, ...]]:
    """k folds of (train, val, test) indices: test = part i, val = part i+1, train = the rest;
    each part has the class balance of the whole."""
    if k < 3:
        raise ValueError("need at least 3 folds (train, val and test parts)")
    part = np.empty(len(targets), dtype=np.int64)
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        members = members[rng.permutation(len(members))]
        part[members] = np.arange(len(members)) % k
    out = []
    for i in range(k):
        test, val = np.flatnonzero(part == i), np.flatnonzero(part == (i + 1) % k)
        train = np.flatnonzero((part != i) & (part != (i + 1) % k))
        out.append((train, val, test))
    return out


# ---- export in the real formats (so the readers can be exercised end to end) ------------------

def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def export_radimagenet_tree(image_set: ImageSet, root: str | os.PathLike) -> None:
    """Write a pretraining set as ``root/<MOD>/<ANATOMY>/<PATHOLOGY>/*.png`` (US:
    ``root/US/<anatomy>_<pathology>/*.png``, one level shallower, as in RadImageNet)."""
    root = Path(root)
    for i, (image, leaf) in enumerate(zip(image_set.images, image_set.leaves)):
        modality, anatomy, pathology = leaf.split("/")
        folder = root / "US" / f"{anatomy}_{pathology}" if modality == "US" else \
            root / modality / anatomy / pathology
        _save_png(image[0].numpy(), folder / f"{i:06d}.png")


def export_downstream_task(task: DownstreamTask, task_dir: str | os.PathLike) -> None:
    """Write a task as ``images/*.png`` + ``dataframe/<name>_{train,val,test}_fold<k>.csv``
    (columns ``filename,label``; labels ``malignant``/``benign`` or ``yes``/``no``)."""
    task_dir = Path(task_dir)
    words = ("no", "yes") if task.name == "acl" else ("benign", "malignant")
    names = [f"images/{task.name}_{i:05d}.png" for i in range(len(task.targets))]
    for i, image in enumerate(task.images):
        _save_png(image[0].numpy(), task_dir / names[i])
    frames = task_dir / "dataframe"
    frames.mkdir(parents=True, exist_ok=True)
    for k, splits in enumerate(task.folds, start=1):
        for split, indices in zip(("train", "val", "test"), splits):
            with open(frames / f"{task.name}_{split}_fold{k}.csv", "w", encoding="utf-8") as fh:
                fh.write("filename,label\n")
                for i in indices:
                    fh.write(f"{names[i]},{words[int(task.targets[i])]}\n")


def contact_sheet(image_set: ImageSet) -> np.ndarray:
    """uint8 mosaic for README figures: one column per modality/anatomy pair (in `COMBINATIONS`
    order), one row per pathology, the first image of each leaf."""
    first = {}
    for image, leaf in zip(image_set.images, image_set.leaves):
        first.setdefault(leaf, image[0].numpy())
    blank = np.zeros_like(next(iter(first.values())))
    rows = [np.concatenate([first.get(f"{m}/{a}/{p}", blank) for m, a in COMBINATIONS], 1)
            for p in PATHOLOGIES]
    return np.concatenate(rows, 0)
