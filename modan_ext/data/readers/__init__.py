"""Readers that turn image collections into `ImageRecord`s: a path plus metadata fields.

Sources: a RadImageNet folder tree and its split CSVs (`radimagenet`), a generic CSV with named
columns (`table`), DICOM headers (`dicom`, optional `pydicom`), and downstream fold CSVs in the
RadImageNet repository's format (`folds`). Readers only *read*: paths are checked (relative
paths must stay inside their root, files must exist), CSVs are parsed as text, DICOM files are
parsed by pydicom without decoding pixel data. Every error names the file and, for CSVs, the row
(1-based, the header is row 1); a source that lists no image raises `NoImagesError`.

The records carry raw strings; `modan_ext.data.metadata.LabelVocabulary` turns them into labels.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping

from ..records import ImageRecord, MetadataReadError, NoImagesError
from .dicom import DICOM_TAGS, read_dicom_headers
from .folds import FoldFiles, load_downstream_task, read_fold_csvs
from .radimagenet import (DEFAULT_US_ANATOMY, IMAGE_EXTENSIONS, RADIMAGENET_MODALITIES,
                          parse_radimagenet_path, read_radimagenet_split_csv,
                          read_radimagenet_tree, us_anatomy)
from .table import csv_text, read_metadata_csv

__all__ = ["DEFAULT_US_ANATOMY", "DICOM_TAGS", "FoldFiles", "IMAGE_EXTENSIONS",
           "RADIMAGENET_MODALITIES", "load_downstream_task", "parse_radimagenet_path", "read_any",
           "read_dicom_headers", "read_fold_csvs", "read_metadata_csv",
           "read_radimagenet_split_csv", "read_radimagenet_tree", "us_anatomy"]


def read_any(source: str | os.PathLike, path_column: str = "path",
             field_columns: Mapping[str, str] | None = None, leaf_column: str | None = None,
             us_fallback: str | None = None, log=None) -> list[ImageRecord]:
    """Records from whatever `source` is: a RadImageNet tree (a folder with CT/MR/US or
    radiology_ai/), a folder of DICOM files, a RadImageNet split CSV (header ``filename,label``)
    or a generic CSV (`path_column`, `field_columns`, `leaf_column`). A source without images
    raises `NoImagesError` naming it; `log` hears about files skipped in a DICOM folder."""
    source = Path(source)
    if source.is_dir():
        if any((source / m).is_dir() for m in RADIMAGENET_MODALITIES) or (source / "radiology_ai").is_dir():
            return read_radimagenet_tree(source, us_fallback=us_fallback)
        try:
            return read_dicom_headers(source, log=log)
        except NoImagesError as exc:
            raise NoImagesError(f"{exc}; nor is it a RadImageNet tree (no "
                                f"{'/, '.join(RADIMAGENET_MODALITIES)}/ or radiology_ai/ folder)") \
                from None
    if source.suffix.lower() == ".csv":
        header = next(csv.reader(csv_text(source)), [])
        if header[:2] == ["filename", "label"] and field_columns is None:
            return read_radimagenet_split_csv(source, us_fallback=us_fallback)
        return read_metadata_csv(source, path_column, field_columns, leaf_column)
    if source.is_file():
        return read_dicom_headers(source)
    raise MetadataReadError(f"{str(source)!r}: not a folder, CSV or DICOM file")
