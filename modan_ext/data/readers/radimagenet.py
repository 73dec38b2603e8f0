"""RadImageNet's own layouts: the folder tree ``<MOD>/<ANATOMY>/<PATHOLOGY>/*`` (ultrasound one
level shallower, ``US/<label>/*``) and its split CSVs ``RadiologyAI_{train,val,test}.csv``."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

from ..records import (ImageRecord, MetadataReadError, NoImagesError, files_under,
                       resolve_image_path)
from .table import open_csv

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
    Files are listed in sorted order, so the result is the same on every machine. Folder
    symlinks are not followed; a file symlink must resolve inside `root`."""
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
        for full, relative, path in files_under(root, modality_dir,
                                                lambda name: name.lower().endswith(extensions)):
            fields, leaf = parse_radimagenet_path(relative, str(full), us_anatomy_map, us_fallback)
            records.append(ImageRecord(path, fields, leaf, str(full)))
    if not records:
        raise NoImagesError(f"{root}: no images: no files with extensions {extensions} under "
                            f"its {', '.join(d.name for d in modality_dirs)} folders")
    return records


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
    for number, row in open_csv(csv_path, ("filename", "label")):
        where = f"{csv_path}, row {number}"
        path = resolve_image_path(row["filename"], root, where, must_exist)
        fields, leaf = parse_radimagenet_path(row["filename"], where, us_anatomy_map, us_fallback)
        records.append(ImageRecord(path, fields, (row["label"] or "").strip() or leaf, where))
    return records
