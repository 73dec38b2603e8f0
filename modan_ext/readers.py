"""Readers that turn image collections into `ImageRecord`s: a path plus metadata fields.

Sources: a RadImageNet folder tree, RadImageNet's split CSVs, a generic CSV with named columns,
DICOM headers (optional `pydicom`), and downstream fold CSVs in the RadImageNet repository's
format. Readers only *read*: paths are checked (relative paths must stay inside their root, files
must exist), CSVs are parsed as text, DICOM files are parsed by pydicom without touching pixel
data. Every error names the file and, for CSVs, the row (1-based, the header is row 1).

The records carry raw strings; `modan_ext.metadata.LabelVocabulary` turns them into labels.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RADIMAGENET_MODALITIES = ("CT", "MR", "US")

# RadImageNet's ultrasound folders are `US/<label>/`, without an anatomy level. Its US labels are
# abdominal/pelvic organs plus thyroid; this maps them to the paper's anatomy values. The match
# is on the whole label, then on its first word ("thyroid_nodule" -> "thyroid").
DEFAULT_US_ANATOMY = {
    "thyroid": "thyroid", "abd": "abd", "abdomen": "abd",
    **{organ: "abd" for organ in (
        "liver", "kidney", "spleen", "pancreas", "gb", "gallbladder", "bladder", "ovary",
        "uterus", "aorta", "ivc", "bowel", "cirrhosis", "portal", "adrenal", "prostate")},
}


class MetadataReadError(ValueError):
    """A record that cannot be read: the message names the file (and CSV row)."""


@dataclass
class ImageRecord:
    """One image: where it is, its metadata fields, its leaf class, and where that came from."""

    path: str
    fields: dict = field(default_factory=dict)
    leaf: str | None = None  # finest class (RadImageNet's MOD/ANATOMY/PATHOLOGY), for SupCon
    source: str = ""         # "file.csv, row 7" or the file itself: for error messages


# ---- paths ------------------------------------------------------------------------------------

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


# ---- RadImageNet ------------------------------------------------------------------------------

def us_anatomy(label: str, mapping: Mapping[str, str] = DEFAULT_US_ANATOMY,
               fallback: str | None = None, where: str = "") -> str:
    """Anatomy of a RadImageNet ultrasound label (the folder name under `US/`)."""
    key = label.strip().lower()
    if key in mapping:
        return mapping[key]
    first = re.split(r"[_\-\s]+", key)[0]
    if first in mapping:
        return mapping[first]
    if fallback is not None:
        return fallback
    raise MetadataReadError(f"{where}: ultrasound label {label!r} has no anatomy mapping; pass "
                            f"us_anatomy={{'{key}': ...}} or us_fallback='abd' (known: "
                            f"{sorted(mapping)})")


def parse_radimagenet_path(relative: str, where: str, us_mapping=DEFAULT_US_ANATOMY,
                           us_fallback: str | None = None) -> tuple[dict, str]:
    """Fields and leaf class from a path like ``[...]/CT/abd/<pathology>/x.png`` or
    ``[...]/US/<label>/x.png`` (anything before the modality folder, e.g. ``radiology_ai/``,
    is skipped)."""
    parts = [p for p in re.split(r"[\\/]+", relative) if p not in ("", ".")]
    starts = [i for i, p in enumerate(parts[:-1]) if p.upper() in RADIMAGENET_MODALITIES]
    if not starts:
        raise MetadataReadError(f"{where}: no modality folder (one of {RADIMAGENET_MODALITIES}) in "
                                f"path {relative!r}")
    parts = parts[starts[0]:]
    modality = parts[0].upper()
    if modality == "US":
        if len(parts) != 3:
            raise MetadataReadError(f"{where}: ultrasound images must be at US/<label>/<file>; got "
                                    f"{relative!r}")
        label = parts[1]
        anatomy = us_anatomy(label, us_mapping, us_fallback, where)
        return {"modality": modality, "anatomy": anatomy}, f"US/{label}"
    if len(parts) != 4:
        raise MetadataReadError(f"{where}: {modality} images must be at "
                                f"{modality}/<anatomy>/<pathology>/<file>; got {relative!r}")
    return ({"modality": modality, "anatomy": parts[1]},
            f"{modality}/{parts[1]}/{parts[2]}")


def read_radimagenet_tree(root: str | os.PathLike, us_anatomy_map=DEFAULT_US_ANATOMY,
                          us_fallback: str | None = None,
                          extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageRecord]:
    """Every image under a RadImageNet-style tree ``root/<MOD>/<ANATOMY>/<PATHOLOGY>/*`` (US:
    ``root/US/<label>/*``). `root` may also be the folder that contains ``radiology_ai``.
    Files are listed in sorted order, so the result is the same on every machine."""
    root = Path(root)
    if not root.is_dir():
        raise MetadataReadError(f"{str(root)!r} is not a folder")
    if not any((root / m).is_dir() for m in RADIMAGENET_MODALITIES) and (root / "radiology_ai").is_dir():
        root = root / "radiology_ai"
    modality_dirs = [root / m for m in RADIMAGENET_MODALITIES if (root / m).is_dir()]
    if not modality_dirs:
        raise MetadataReadError(f"{str(root)!r} has none of the folders {RADIMAGENET_MODALITIES}")
    extensions = tuple(e.lower() for e in extensions)
    records = []
    for modality_dir in modality_dirs:
        for dirpath, dirnames, filenames in os.walk(modality_dir, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.lower().endswith(extensions):
                    continue
                full = Path(dirpath) / name
                relative = full.relative_to(root).as_posix()
                fields, leaf = parse_radimagenet_path(relative, str(full), us_anatomy_map,
                                                      us_fallback)
                records.append(ImageRecord(str(full.resolve()), fields, leaf, str(full)))
    if not records:
        raise MetadataReadError(f"no images with extensions {extensions} under {str(root)!r}")
    return records


def _open_csv(path: str | os.PathLike, required: Sequence[str]):
    """Rows of a CSV as dicts, with the header checked; yields (row_number, row)."""
    path = Path(path)
    if not path.is_file():
        raise MetadataReadError(f"CSV file not found: {str(path)!r}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise MetadataReadError(f"{path}: missing column(s) {missing}; the header has {header}")
        for number, row in enumerate(reader, start=2):
            if None in row:  # more cells than header columns
                raise MetadataReadError(f"{path}, row {number}: more cells than header columns")
            yield number, row


def read_radimagenet_split_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                               us_anatomy_map=DEFAULT_US_ANATOMY, us_fallback: str | None = None,
                               must_exist: bool = True) -> list[ImageRecord]:
    """RadImageNet's ``RadiologyAI_{train,val,test}.csv`` (columns ``filename,label``).

    Filenames are relative to `image_root` (default: the CSV's folder), e.g.
    ``radiology_ai/MR/knee/acl_pathology/x.png``; fields come from the path, the leaf class
    from the ``label`` column.
    """
    root = Path(image_root) if image_root is not None else Path(csv_path).parent
    records = []
    for number, row in _open_csv(csv_path, ("filename", "label")):
        where = f"{csv_path}, row {number}"
        path = resolve_image_path(row["filename"], root, where, must_exist)
        fields, leaf = parse_radimagenet_path(row["filename"], where, us_anatomy_map, us_fallback)
        records.append(ImageRecord(path, fields, (row["label"] or "").strip() or leaf, where))
    return records


def read_metadata_csv(csv_path: str | os.PathLike, path_column: str = "path",
                      field_columns: Mapping[str, str] | None = None,
                      leaf_column: str | None = None, image_root: str | os.PathLike | None = None,
                      must_exist: bool = True) -> list[ImageRecord]:
    """A generic CSV: one image per row, a path column and one column per metadata field.

    Args:
        field_columns: ``{field: column}``; default ``{"modality": "modality", "anatomy":
            "anatomy"}``. Several values in one cell are separated by ``|``.
        leaf_column: optional column with a fine class (used by the SupCon baseline).
        image_root: paths are relative to it (default: the CSV's folder).
    """
    field_columns = dict(field_columns or {"modality": "modality", "anatomy": "anatomy"})
    root = Path(image_root) if image_root is not None else Path(csv_path).parent
    required = [path_column, *field_columns.values()] + ([leaf_column] if leaf_column else [])
    records = []
    for number, row in _open_csv(csv_path, required):
        where = f"{csv_path}, row {number}"
        path = resolve_image_path(row[path_column], root, where, must_exist)
        fields = {}
        for name, column in field_columns.items():
            cell = (row[column] or "").strip()
            values = [v.strip() for v in cell.split("|") if v.strip()]
            fields[name] = None if not values else values[0] if len(values) == 1 else values
        leaf = None
        if leaf_column:
            leaf = (row[leaf_column] or "").strip() or None
        records.append(ImageRecord(path, fields, leaf, where))
    return records


# ---- DICOM ------------------------------------------------------------------------------------

DICOM_TAGS = {"modality": (0x0008, 0x0060), "anatomy": (0x0018, 0x0015)}


def _import_pydicom():
    try:
        import pydicom
    except ImportError as exc:  # optional extra
        raise ImportError("reading DICOM headers needs pydicom: pip install 'modan_ext[dicom]'") \
            from exc
    return pydicom


def read_dicom_headers(paths: Iterable[str | os.PathLike] | str | os.PathLike,
                       tags: Mapping[str, tuple[int, int]] = DICOM_TAGS,
                       extensions: Sequence[str] = (".dcm", ".dicom", "")) -> list[ImageRecord]:
    """Fields from DICOM headers: by default ``modality`` from Modality (0008,0060) and
    ``anatomy`` from BodyPartExamined (0018,0015); a missing or empty tag gives None (the
    vocabulary's unknown policy decides what that means).

    `paths` is a file, a folder (searched recursively for `extensions`; "" means files without
    an extension), or a list of files. Pixel data is not read.
    """
    pydicom = _import_pydicom()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames.sort()
                files += [Path(dirpath) / n for n in sorted(filenames)
                          if Path(n).suffix.lower() in extensions]
        else:
            files.append(p)
    records = []
    for path in files:
        if not path.is_file():
            raise MetadataReadError(f"DICOM file not found: {str(path)!r}")
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for non-DICOM input
            raise MetadataReadError(f"{path}: not a readable DICOM file "
                                    f"({type(exc).__name__}: {exc})") from exc
        fields = {}
        for name, tag in tags.items():
            element = dataset.get(tag)
            value = None if element is None else element.value
            if value is None or isinstance(value, str):
                fields[name] = value.strip() if value else None
            elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                fields[name] = [str(v).strip() for v in value if str(v).strip()] or None
            else:
                fields[name] = str(value).strip() or None
        records.append(ImageRecord(str(path.resolve()), fields, None, str(path)))
    return records


# ---- downstream folds (RadImageNet repository format) -----------------------------------------

POSITIVE_WORDS = ("yes", "malignant", "1", "true", "positive", "abnormal", "tear")
NEGATIVE_WORDS = ("no", "benign", "0", "false", "negative", "normal", "intact")


@dataclass
class FoldFiles:
    """One fold of a downstream task: image paths and 0/1 targets per split."""

    train: tuple[list[str], np.ndarray]
    val: tuple[list[str], np.ndarray]
    test: tuple[list[str], np.ndarray]


def _read_fold_csv(path: Path, root: Path, positive, negative, must_exist):
    paths, targets = [], []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise MetadataReadError(f"{path}: expected a header with a path column and a label "
                                    f"column (e.g. 'filename,label'); got {header}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
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


# ---- pixels -----------------------------------------------------------------------------------

def load_grayscale(path: str, size: int) -> np.ndarray:
    """An image file as uint8 ``[size, size]`` (grayscale, resized with antialiasing). DICOM
    files are read with pydicom and windowed to their min/max."""
    if path.lower().endswith((".dcm", ".dicom")):
        pixels = _import_pydicom().dcmread(path).pixel_array.astype(np.float32)
        if pixels.ndim == 3:  # multi-frame or RGB: first frame / mean channel
            pixels = pixels.mean(-1) if pixels.shape[-1] in (3, 4) else pixels[0]
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / max(high - low, 1e-6) * 255.0
        from PIL import Image
        image = Image.fromarray(pixels.astype(np.uint8))
    else:
        from PIL import Image
        with Image.open(path) as handle:
            image = handle.convert("L")
    image = image.resize((size, size), resample=Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


# ---- in-memory data sets (what the pipeline consumes) -----------------------------------------

@dataclass
class ImageSet:
    """Pretraining images in memory: uint8 ``[N, 1, H, W]``, one fields dict and one leaf class
    per image. In memory on purpose: the paper's 16k images at 224 px take 0.8 GB as uint8."""

    images: "torch.Tensor"
    fields: list
    leaves: list

    def __len__(self) -> int:
        return len(self.fields)


@dataclass
class DownstreamTask:
    """A binary task: uint8 images ``[N, 1, H, W]``, 0/1 targets ``[N]``, and fixed folds, each
    a (train, val, test) triple of index arrays into the images."""

    name: str
    images: "torch.Tensor"
    targets: np.ndarray
    folds: list


def load_image_set(records: Sequence[ImageRecord], size: int) -> ImageSet:
    """Load the pixels of `records` (grayscale, `size` x `size`)."""
    import torch
    pixels = [load_grayscale(r.path, size) for r in records]
    images = torch.from_numpy(np.stack(pixels))[:, None] if pixels else \
        torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return ImageSet(images, [dict(r.fields) for r in records],
                    [r.leaf if r.leaf is not None else "/".join(str(v) for v in r.fields.values())
                     for r in records])


def load_downstream_task(task_dir: str | os.PathLike, size: int, name: str | None = None,
                         **fold_options) -> DownstreamTask:
    """A task folder in the RadImageNet repository format (see `read_fold_csvs`), loaded once:
    each image appears once in memory, and folds index into it."""
    import torch
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


def read_any(source: str | os.PathLike, path_column: str = "path",
             field_columns: Mapping[str, str] | None = None, leaf_column: str | None = None,
             us_fallback: str | None = None) -> list[ImageRecord]:
    """Records from whatever `source` is: a RadImageNet tree (a folder with CT/MR/US or
    radiology_ai/), a folder of DICOM files, a RadImageNet split CSV (header ``filename,label``)
    or a generic CSV (`path_column`, `field_columns`, `leaf_column`)."""
    source = Path(source)
    if source.is_dir():
        if any((source / m).is_dir() for m in RADIMAGENET_MODALITIES) or (source / "radiology_ai").is_dir():
            return read_radimagenet_tree(source, us_fallback=us_fallback)
        return read_dicom_headers(source)
    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        if header[:2] == ["filename", "label"] and field_columns is None:
            return read_radimagenet_split_csv(source, us_fallback=us_fallback)
        return read_metadata_csv(source, path_column, field_columns, leaf_column)
    if source.is_file():
        return read_dicom_headers(source)
    raise MetadataReadError(f"{str(source)!r}: not a folder, CSV or DICOM file")
