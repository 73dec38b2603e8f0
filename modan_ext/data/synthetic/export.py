"""The synthetic data written in the real formats (a RadImageNet tree, fold CSVs), so that the
readers can be exercised end to end."""
from __future__ import annotations

import os
from pathlib import Path

from ..images import save_png
from ..records import DownstreamTask, ImageSet


def export_radimagenet_tree(image_set: ImageSet, root: str | os.PathLike) -> None:
    """Write a pretraining set as ``root/<MOD>/<ANATOMY>/<PATHOLOGY>/*.png`` (US:
    ``root/US/<anatomy>_<pathology>/*.png``, one level shallower, as in RadImageNet)."""
    root = Path(root)
    for i, (image, leaf) in enumerate(zip(image_set.images, image_set.leaves)):
        modality, anatomy, pathology = leaf.split("/")
        folder = root / "US" / f"{anatomy}_{pathology}" if modality == "US" else \
            root / modality / anatomy / pathology
        save_png(image[0].numpy(), folder / f"{i:06d}.png")


def export_downstream_task(task: DownstreamTask, task_dir: str | os.PathLike) -> None:
    """Write a task as ``images/*.png`` + ``dataframe/<name>_{train,val,test}_fold<k>.csv``
    (columns ``filename,label``; labels ``malignant``/``benign`` or ``yes``/``no``)."""
    task_dir = Path(task_dir)
    words = ("no", "yes") if task.name == "acl" else ("benign", "malignant")
    names = [f"images/{task.name}_{i:05d}.png" for i in range(len(task.targets))]
    for i, image in enumerate(task.images):
        save_png(image[0].numpy(), task_dir / names[i])
    frames = task_dir / "dataframe"
    frames.mkdir(parents=True, exist_ok=True)
    for k, splits in enumerate(task.folds, start=1):
        for split, indices in zip(("train", "val", "test"), splits):
            with open(frames / f"{task.name}_{split}_fold{k}.csv", "w", encoding="utf-8") as fh:
                fh.write("filename,label\n")
                for i in indices:
                    fh.write(f"{names[i]},{words[int(task.targets[i])]}\n")
