"""Generic metadata CSVs: one image per row, a path column and one column per field; and the
checked CSV row reader every CSV reader here uses."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..records import ImageRecord, MetadataReadError, resolve_image_path


def open_csv(path: str | os.PathLike, required: Sequence[str]):
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
    for number, row in open_csv(csv_path, required):
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
