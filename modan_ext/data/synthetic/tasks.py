"""Three synthetic binary downstream tasks like the paper's (ACL tear on knee MR, malignancy on
breast-like and on thyroid ultrasound), with fixed stratified folds."""
from __future__ import annotations

import numpy as np
import torch

from ..records import DownstreamTask
from .canvas import (BONE, CALCIFICATION, DENSE_LESION, FAT, FLUID, LESION, LIGAMENT, ORGAN, SOFT,
                     blob, capsule, ellipse, image_rng, irregular_harmonics, make_canvas)
from .render import render_mr, render_us, to_uint8
from .scenes import US_WINDOWS, scene_knee, scene_thyroid

TASKS = ("acl", "breast", "thyroid")

# Each image maker returns (image, target). The malignant/torn class differs by a few overlapping cues, so
# that neither an ideal model reaches AUC 1 nor a blind one gets anything: the point is whether
# pretraining helps to pick up a subtle signal from ~100-200 training images.

def _acl_image(size, rng, torn: bool):
    canvas = make_canvas(size, rng, rotate_deg=8.0)
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
    canvas = make_canvas(size, rng, rotate_deg=4.0, background=FAT)
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
    canvas = make_canvas(size, rng, zoom=zoom, centre=centre, rotate_deg=6.0, background=SOFT)
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
    images = [to_uint8(np.clip(maker(size, image_rng(seed, f"task/{name}", i), bool(t)), 0, 1))
              for i, t in enumerate(targets)]
    tensor = torch.from_numpy(np.stack(images))[:, None]
    return DownstreamTask(name, tensor, targets,
                          stratified_folds(targets, folds, image_rng(seed, f"folds/{name}", 0)))


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
