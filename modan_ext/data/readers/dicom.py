"""DICOM headers (optional extra ``pydicom``): modality and body part as metadata fields, without
touching pixel data (`modan_ext.data.images` reads the pixels)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..images import import_pydicom
from ..records import ImageRecord, MetadataReadError

DICOM_TAGS = {"modality": (0x0008, 0x0060), "anatomy": (0x0018, 0x0015)}


def read_dicom_headers(paths: Iterable[str | os.PathLike] | str | os.PathLike,
                       tags: Mapping[str, tuple[int, int]] = DICOM_TAGS,
                       extensions: Sequence[str] = (".dcm", ".dicom", "")) -> list[ImageRecord]:
    """Fields from DICOM headers: by default ``modality`` from Modality (0008,0060) and
    ``anatomy`` from BodyPartExamined (0018,0015); a missing or empty tag gives None (the
    vocabulary's unknown policy decides what that means).

    `paths` is a file, a folder (searched recursively for `extensions`; "" means files without
    an extension), or a list of files. Pixel data is not read.
    """
    pydicom = import_pydicom()
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



