"""The synthetic mini-RadImageNet: one image per (modality, anatomy, pathology, index), labelled
like the paper's pretraining data; and its contact sheet for figures."""
from __future__ import annotations

import numpy as np
import torch

from ..records import ImageSet
from .canvas import SOFT, Canvas, image_rng, make_canvas
from .render import render, to_uint8
from .scenes import COMBINATIONS, PATHOLOGIES, SCENES, US_WINDOWS, add_pathology


def anatomy_canvas(modality: str, anatomy: str, size: int, rng) -> Canvas:
    """The canvas of one anatomy: ultrasound looks through a small window under the probe."""
    if modality == "US":
        centre, zoom = US_WINDOWS.get(anatomy, ((0.0, 0.0), 1.8))
        return make_canvas(size, rng, zoom=zoom, centre=centre, rotate_deg=6.0, background=SOFT)
    return make_canvas(size, rng)


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
    for modality, anatomy in combinations:
        for pathology in pathologies:
            leaf = f"{modality}/{anatomy}/{pathology}"
            for i in range(images_per_leaf):
                rng = image_rng(seed, leaf, i)
                images.append(to_uint8(make_image(modality, anatomy, pathology, size, rng)))
                fields.append({"modality": modality, "anatomy": anatomy})
                leaves.append(leaf)
    tensor = torch.from_numpy(np.stack(images))[:, None]
    return ImageSet(tensor, fields, leaves)


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
