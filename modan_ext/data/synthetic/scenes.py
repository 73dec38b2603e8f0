"""Anatomy scenes: each paints one body region's tissue map on a canvas, with per-image random
shape; and the generic pretraining findings (a mass, a fluid collection)."""
from __future__ import annotations

import numpy as np

from .canvas import (AIR, BONE, FAT, FLUID, LESION, LIGAMENT, ORGAN, SOFT, Canvas, box, capsule,
                     ellipse)

COMBINATIONS = (("CT", "abd"), ("CT", "lung"),
                ("MR", "abd"), ("MR", "af"), ("MR", "brain"), ("MR", "hip"), ("MR", "knee"),
                ("MR", "shoulder"), ("MR", "spine"),
                ("US", "abd"), ("US", "thyroid"))
PATHOLOGIES = ("normal", "mass", "fluid")

# Each scene draws one anatomy on a canvas; `j` jitters a parameter by a relative amount.

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
