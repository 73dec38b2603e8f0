"""What readers return and what the pipeline consumes: image records (a path plus metadata
fields), in-memory image sets and downstream tasks; the error every reader raises; path checks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch


class MetadataReadError(ValueError):
    """A record that cannot be read: the message names the file (and CSV row)."""


class NoImagesError(MetadataReadError):
    """A source (folder, CSV) that lists no images: the message names it."""


class ImageReadError(MetadataReadError):
    """An image file whose pixels cannot be read: the message names it."""


@dataclass
class ImageRecord:
    """One image: where it is, its metadata fields, its leaf class, and where that came from."""

    path: str
    fields: dict = field(default_factory=dict)
    leaf: str | None = None  # finest class (RadImageNet's MOD/ANATOMY/PATHOLOGY), for SupCon
    source: str = ""         # "file.csv, row 7" or the file itself: for error messages


@dataclass
class ImageSet:
    """Pretraining images in memory: uint8 ``[N, 1, H, W]``, one fields dict and one leaf class
    per image. In memory on purpose: the paper's 16k images at 224 px take 0.8 GB as uint8."""

    images: torch.Tensor
    fields: list
    leaves: list

    def __len__(self) -> int:
        return len(self.fields)


@dataclass
class DownstreamTask:
    """A binary task: uint8 images ``[N, 1, H, W]``, 0/1 targets ``[N]``, and fixed folds, each
    a (train, val, test) triple of index arrays into the images."""

    name: str
    images: torch.Tensor
    targets: np.ndarray
    folds: list


def resolve_image_path(path: str, root: str | os.PathLike | None, where: str,
                       must_exist: bool = True) -> str:
    """`path` made absolute against `root`; it must stay inside `root` and (by default) exist.

    A relative path with `root=None` is taken relative to the current directory. An absolute path
    is accepted only when `root` is None: a list that pins a root should not reach outside it.
    """
    if not isinstance(path, str) or not path.strip():
        raise MetadataReadError(f"{where}: empty image path")
    if "\x00" in path:
        raise MetadataReadError(f"{where}: image path contains a NUL byte")
    candidate = Path(path.strip())
    if root is None:
        resolved = candidate.resolve()
    else:
        root_resolved = Path(root).resolve()
        if candidate.is_absolute():
            raise MetadataReadError(f"{where}: absolute path {path!r} where a path relative to "
                                    f"{str(root_resolved)!r} was expected")
        resolved = (root_resolved / candidate).resolve()
        if resolved != root_resolved and root_resolved not in resolved.parents:
            raise MetadataReadError(f"{where}: path {path!r} leaves the root folder "
                                    f"{str(root_resolved)!r}")
    if must_exist and not resolved.is_file():
        raise MetadataReadError(f"{where}: image file not found: {str(resolved)!r}")
    return str(resolved)


def files_under(root: str | os.PathLike, top: str | os.PathLike | None = None,
                keep: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[Path, str, str]]:
    """Every file under `top` (default: `root`) whose name `keep` accepts, in sorted order (the
    same on every machine), as (path as found, path relative to `root`, resolved path). Folder
    symlinks are not followed; a file symlink may point anywhere, so each file gets the containment
    check of CSV paths (`resolve_image_path`): one that leaves `root` raises."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root if top is None else top, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if keep(name):
                full = Path(dirpath) / name
                relative = full.relative_to(root).as_posix()
                yield full, relative, resolve_image_path(relative, root, str(full))
