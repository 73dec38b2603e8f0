"""Image files in and out: any image (or DICOM) file as a small grayscale uint8 array, a list of
records as an in-memory `ImageSet`, and a uint8 array written as PNG. Pillow and pydicom are
optional extras, imported when first needed. A file is DICOM by its content (the "DICM" marker
of DICOM Part 10 files), whatever its name: PACS exports often name files by their UID."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .records import ImageReadError, ImageRecord, ImageSet

DICOM_MARKER_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"


def import_pydicom():
    try:
        import pydicom
    except ImportError as exc:  # optional extra
        raise ImportError("reading DICOM files needs pydicom: pip install 'modan_ext[dicom]'") \
            from exc
    return pydicom


def is_dicom(path: str | Path) -> bool:
    """Whether the file holds the "DICM" marker of a DICOM Part 10 file at byte 128."""
    with open(path, "rb") as fh:
        fh.seek(DICOM_MARKER_OFFSET)
        return fh.read(4) == b"DICM"


def _dicom_pixels(path: str) -> np.ndarray:
    pixels = import_pydicom().dcmread(path).pixel_array.astype(np.float32)
    if pixels.ndim == 3:  # multi-frame or RGB: first frame / mean channel
        pixels = pixels.mean(-1) if pixels.shape[-1] in (3, 4) else pixels[0]
    low, high = float(pixels.min()), float(pixels.max())
    return ((pixels - low) / max(high - low, 1e-6) * 255.0).astype(np.uint8)


def load_grayscale(path: str, size: int) -> np.ndarray:
    """An image file as uint8 ``[size, size]`` (grayscale, resized with antialiasing). DICOM
    files (recognised by content) are read with pydicom and windowed to their min/max. A file
    that cannot be decoded raises `ImageReadError` naming it."""
    from PIL import Image  # optional extra: only loading real images needs it
    try:
        if is_dicom(path):
            image = Image.fromarray(_dicom_pixels(path))
        else:
            with Image.open(path) as handle:
                image = handle.convert("L")
        image = image.resize((size, size), resample=Image.BILINEAR, reducing_gap=2.0)
    except ImportError:
        raise
    except Exception as exc:  # PIL and pydicom raise many types (OSError, ValueError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise ImageReadError(f"{path}: cannot read the image's pixels "
                             f"({type(exc).__name__}: {reason})") from exc
    return np.asarray(image, dtype=np.uint8)


def load_image_set(records: Sequence[ImageRecord], size: int) -> ImageSet:
    """Load the pixels of `records` (grayscale, `size` x `size`); a failure names the record's
    source too (e.g. the CSV row that listed the file)."""
    pixels = []
    for record in records:
        try:
            pixels.append(load_grayscale(record.path, size))
        except ImageReadError as exc:
            if record.source and record.source != record.path:
                raise ImageReadError(f"{record.source}: {exc}") from exc
            raise
    images = torch.from_numpy(np.stack(pixels))[:, None] if pixels else \
        torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return ImageSet(images, [dict(r.fields) for r in records],
                    [r.leaf if r.leaf is not None else "/".join(str(v) for v in r.fields.values())
                     for r in records])


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """A uint8 array as a PNG file (nearest-neighbour upscaled by `scale`; folders created)."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if scale != 1:
        image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    image.save(path)
