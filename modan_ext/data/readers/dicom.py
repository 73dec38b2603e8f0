"""DICOM headers (optional extra ``pydicom``): modality and body part as metadata fields, without
decoding pixel data (`modan_ext.data.images` does that).

A file is DICOM by its content, the "DICM" marker of a DICOM Part 10 file, not by its name:
exports name files by UID (``1.2.840.113619.2.55.3.604688.320``) or give them no extension. In a
folder, files without the marker are skipped and counted in one log line (notes, thumbnails,
checksums sit beside the images), except files named ``*.dcm``/``*.dicom``, which must be DICOM;
the DICOMDIR index is skipped. Every DICOM file must hold its pixel data, complete: a truncated
file raises, naming it, instead of giving a record without tags.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from ..images import import_pydicom, is_dicom
from ..records import ImageRecord, MetadataReadError, NoImagesError, files_under

DICOM_TAGS = {"modality": (0x0008, 0x0060), "anatomy": (0x0018, 0x0015)}
DICOM_SUFFIXES = (".dcm", ".dicom")  # a file named so must be DICOM
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory (DICOMDIR): an index
UNDEFINED_LENGTH = 0xFFFFFFFF                  # encapsulated (compressed) pixel data
DEFER_BYTES = 1024  # values above this size are not loaded while reading the header


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(DICOM files, other files) under `folder`, sorted, each checked to stay inside it."""
    dicom, other = [], []
    for full, _, _ in files_under(folder):
        if is_dicom(full):
            dicom.append(full)
        elif full.suffix.lower() in DICOM_SUFFIXES:
            raise MetadataReadError(f"{full}: not a readable DICOM file (no 'DICM' marker at byte "
                                    "128: not DICOM, or a dataset without its Part 10 file header)")
        else:
            other.append(full)
    return dicom, other


def _read_header(pydicom, path: Path):
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises several types for broken input
        raise MetadataReadError(f"{path}: not a readable DICOM file "
                                f"({type(exc).__name__}: {exc})") from exc


def _is_directory(dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == DIRECTORY_SOP_CLASS


def _check_pixel_data(dataset, path: Path) -> None:
    """The pixel data must be there and, when its length is given, fit in the file: pydicom
    stops quietly at the end of a truncated file, keeping only the elements before it."""
    keyword = next((k for k in PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        sop = getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", None)
        kind = f"SOP class {getattr(sop, 'name', sop)!r}" if sop else "no SOP class"
        raise MetadataReadError(f"{path}: no pixel data: a truncated file, or a DICOM object "
                                f"that is not an image ({kind}, {len(dataset)} elements read); "
                                "remove it from the data")
    element = dataset.get_item(keyword, keep_deferred=True)
    length, start = getattr(element, "length", None), getattr(element, "value_tell", None)
    size = path.stat().st_size
    if length not in (None, UNDEFINED_LENGTH) and start is not None and start + length > size:
        raise MetadataReadError(f"{path}: truncated: its pixel data needs {length} bytes from "
                                f"byte {start}, the file ends at byte {size}")


def _fields(dataset, tags: Mapping[str, tuple[int, int]]) -> dict:
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
    return fields


def _examples(paths: list[Path], folder: Path, shown: int = 3) -> str:
    names = sorted(p.relative_to(folder).as_posix() for p in paths)[:shown]
    return ", ".join(names) + (", ..." if len(paths) > shown else "")


def read_dicom_headers(paths: Iterable[str | os.PathLike] | str | os.PathLike,
                       tags: Mapping[str, tuple[int, int]] = DICOM_TAGS,
                       log=None) -> list[ImageRecord]:
    """Fields from DICOM headers: by default ``modality`` from Modality (0008,0060) and
    ``anatomy`` from BodyPartExamined (0018,0015); a missing or empty tag gives None (the
    vocabulary's unknown policy decides what that means).

    `paths` is a file, a folder (searched recursively; see the module's docstring for what is
    skipped, which `log` reports), or a list of files, each of which must be DICOM. Pixel data is
    checked to be present and complete, not decoded. A folder without DICOM images raises
    `NoImagesError`.
    """
    pydicom = import_pydicom()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for given in map(Path, paths):
        if given.is_dir():
            files, other = _folder_files(given)
        elif given.is_file():
            files, other = [given], []
        else:
            raise MetadataReadError(f"DICOM file not found: {str(given)!r}")
        found = []
        for path in files:
            dataset = _read_header(pydicom, path)
            if given.is_dir() and _is_directory(dataset):
                other.append(path)  # DICOMDIR: an index of the files, not an image
                continue
            _check_pixel_data(dataset, path)
            found.append(ImageRecord(str(path.resolve()), _fields(dataset, tags), None, str(path)))
        if given.is_dir():
            if not found:
                held = f"{len(other)} other files: {_examples(other, given)}" if other else \
                    "no files at all"
                raise NoImagesError(f"{given}: no images: no DICOM files in it ({held})")
            if other and log is not None:
                log(f"{given}: skipped {len(other)} files that are not DICOM images (no 'DICM' "
                    f"marker at byte 128, or the DICOMDIR index): {_examples(other, given)}")
        records += found
    return records
