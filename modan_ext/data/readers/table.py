"""Generic metadata CSVs: one image per row, a path column and one column per field; and the
checked CSV reading every CSV reader here uses (UTF-8 text, header, at least one row)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..records import ImageRecord, MetadataReadError, NoImagesError, resolve_image_path


def csv_text(path: str | os.PathLike) -> io.StringIO:
    """The text of a CSV file, decoded as UTF-8 (a byte-order mark is dropped), ready for the
    `csv` module; a file that is not UTF-8 raises naming it, the line and the byte."""
    path = Path(path)
    if not path.is_file():
        raise MetadataReadError(f"CSV file not found: {str(path)!r}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise MetadataReadError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} "
                                f"at offset {exc.start}); save the CSV as UTF-8") from None
    return io.StringIO(text, newline="")


def csv_rows(path: str | os.PathLike, header_check) -> tuple[list[str], list]:
    """(header, [(row_number, cells), ...]) of a CSV; `header_check(header)` raises if the header
    is not the expected one. Blank lines are skipped; no data row raises `NoImagesError`."""
    reader = csv.reader(csv_text(path))
    header = next(reader, None) or []
    header_check(header)
    rows = [(number, row) for number, row in enumerate(reader, start=2) if row]
    if not rows:
        raise NoImagesError(f"{path}: no images: the CSV has a header and no rows")
    return header, rows


def open_csv(path: str | os.PathLike, required: Sequence[str]):
    """Rows of a CSV as dicts, with the header checked; yields (row_number, row)."""
    def check(header):
        missing = [c for c in required if c not in header]
        if missing:
            raise MetadataReadError(f"{path}: missing column(s) {missing}; the header has {header}")

    header, rows = csv_rows(path, check)
    for number, cells in rows:
        if len(cells) > len(header):
            raise MetadataReadError(f"{path}, row {number}: more cells than header columns")
        yield number, dict(zip(header, cells + [""] * (len(header) - len(cells))))


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
