"""Downstream tasks in the RadImageNet repository's layout: fixed folds as
``<task>/dataframe/[<prefix>_]{train,val,test}_fold<k>.csv``, loaded once into memory."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..images import load_grayscale
from ..records import DownstreamTask, MetadataReadError, resolve_image_path
from .table import csv_rows

POSITIVE_WORDS = ("yes", "malignant", "1", "true", "positive", "abnormal", "tear")
NEGATIVE_WORDS = ("no", "benign", "0", "false", "negative", "normal", "intact")


@dataclass
class FoldFiles:
    """One fold of a downstream task: image paths and 0/1 targets per split."""

    train: tuple[list[str], np.ndarray]
    val: tuple[list[str], np.ndarray]
    test: tuple[list[str], np.ndarray]


def _read_fold_csv(path: Path, root: Path, positive, negative, must_exist):
    def check(header):
        if len(header) < 2:
            raise MetadataReadError(f"{path}: expected a header with a path column and a label "
                                    f"column (e.g. 'filename,label'); got {header}")

    paths, targets = [], []
    for number, row in csv_rows(path, check)[1]:
        if len(row) < 2:
            raise MetadataReadError(f"{path}, row {number}: expected 2 cells, got {row}")
        where = f"{path}, row {number}"
        word = row[1].strip().lower()
        if word in positive:
            target = 1
        elif word in negative:
            target = 0
        else:
            raise MetadataReadError(f"{where}: label {row[1]!r} is neither positive "
                                    f"{sorted(positive)} nor negative {sorted(negative)}")
        paths.append(resolve_image_path(row[0], root, where, must_exist))
        targets.append(target)
    return paths, np.asarray(targets, dtype=np.int64)


def read_fold_csvs(task_dir: str | os.PathLike, positive: Sequence[str] = POSITIVE_WORDS,
                   negative: Sequence[str] = NEGATIVE_WORDS,
                   must_exist: bool = True) -> list[FoldFiles]:
    """The fixed folds of a downstream task in the RadImageNet repository's layout:
    ``<task>/dataframe/[<prefix>_]{train,val,test}_fold<k>.csv`` with a path column first
    (``filename`` or ``img_dir``, relative to ``<task>/``) and a label column second (e.g.
    ``yes``/``no``, ``malignant``/``benign``)."""
    task_dir = Path(task_dir)
    frame_dir = task_dir / "dataframe" if (task_dir / "dataframe").is_dir() else task_dir
    pattern = re.compile(r"^(?:.*_)?(train|val|test)_fold(\d+)\.csv$")
    found: dict[int, dict[str, Path]] = {}
    for entry in sorted(frame_dir.iterdir()) if frame_dir.is_dir() else []:
        match = pattern.match(entry.name)
        if match:
            found.setdefault(int(match.group(2)), {})[match.group(1)] = entry
    if not found:
        raise MetadataReadError(f"no '*train_fold<k>.csv' files in {str(frame_dir)!r}")
    positive = {w.lower() for w in positive}
    negative = {w.lower() for w in negative}
    folds = []
    for k in sorted(found):
        splits = found[k]
        missing = [s for s in ("train", "val", "test") if s not in splits]
        if missing:
            raise MetadataReadError(f"{frame_dir}: fold {k} lacks its {missing} CSV(s)")
        folds.append(FoldFiles(*(_read_fold_csv(splits[s], task_dir, positive, negative,
                                                must_exist) for s in ("train", "val", "test"))))
    return folds


def load_downstream_task(task_dir: str | os.PathLike, size: int, name: str | None = None,
                         **fold_options) -> DownstreamTask:
    """A task folder in the RadImageNet repository format (see `read_fold_csvs`), loaded once:
    each image appears once in memory, and folds index into it."""
    folds = read_fold_csvs(task_dir, **fold_options)
    index: dict[str, int] = {}
    targets: list[int] = []
    fold_indices = []
    for fold in folds:
        triple = []
        for paths, split_targets in (fold.train, fold.val, fold.test):
            idx = []
            for path, target in zip(paths, split_targets):
                if path not in index:
                    index[path] = len(targets)
                    targets.append(int(target))
                elif targets[index[path]] != int(target):
                    raise MetadataReadError(f"{path}: labelled both {targets[index[path]]} and "
                                            f"{int(target)} in the fold CSVs of {task_dir}")
                idx.append(index[path])
            triple.append(np.asarray(idx, dtype=np.int64))
        fold_indices.append(tuple(triple))
    pixels = [load_grayscale(p, size) for p in index]
    images = torch.from_numpy(np.stack(pixels))[:, None]
    return DownstreamTask(name or Path(task_dir).name, images, np.asarray(targets, np.int64),
                          fold_indices)
