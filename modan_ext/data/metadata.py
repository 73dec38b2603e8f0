"""From image metadata to multi-hot label vectors, with a fixed vocabulary saved as JSON.

The paper's labels are modality (CT, MR, US) + anatomy (9 regions) = 12 columns, exactly two
set per image. A `LabelVocabulary` generalises that to any ordered list of fields (add "view",
"contrast", "vendor", ...). The vocabulary is fixed once and saved next to a checkpoint, so
column k means the same thing at training and at evaluation time, whatever data is read later.

Raw metadata is messy ("MRI", "HEAD", "CSPINE", missing tags), so each field has synonyms,
matching is case-insensitive, and what happens to an unknown or missing value is a policy the
user picks:

* ``"error"`` (default): raise `UnknownValueError`, naming the field, the value, the known values,
  and where the record came from (file, CSV row).
* ``"zeros"``: leave the field's columns at 0. The image still has its other labels; with Jaccard
  weights it then counts as partly similar to images that share those.
* ``"column"``: set a dedicated ``<field>:unknown`` column, so unknowns resemble each other.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
UNKNOWN_POLICIES = ("error", "zeros", "column")
UNKNOWN_VALUE = "unknown"

PAPER_MODALITIES = ("CT", "MR", "US")
PAPER_ANATOMIES = ("abd", "lung", "af", "brain", "hip", "knee", "shoulder", "spine", "thyroid")

# DICOM Modality (0008,0060) and BodyPartExamined (0018,0015) use defined terms; RadImageNet uses
# its own folder names. Both map onto the paper's vocabulary here. "abd" in RadImageNet covers
# abdomen and pelvis; "lung" is the chest CT folder; "af" is ankle/foot.
DEFAULT_SYNONYMS = {
    "modality": {"MRI": "MR", "ULTRASOUND": "US", "CT SCAN": "CT"},
    "anatomy": {
        "ABDOMEN": "abd", "PELVIS": "abd", "ABDOMENPELVIS": "abd", "ABDOMEN_PELVIS": "abd",
        "ABD_PELVIS": "abd", "LIVER": "abd", "KIDNEY": "abd",
        "CHEST": "lung", "THORAX": "lung", "LUNGS": "lung",
        "ANKLE": "af", "FOOT": "af", "ANKLE_FOOT": "af", "ANKLEFOOT": "af",
        "HEAD": "brain", "SKULL": "brain",
        "CSPINE": "spine", "TSPINE": "spine", "LSPINE": "spine", "SSPINE": "spine",
        "CTSPINE": "spine", "TLSPINE": "spine", "LSSPINE": "spine", "WHOLESPINE": "spine",
        "NECK": "thyroid", "THYROID GLAND": "thyroid",
    },
}


class UnknownValueError(ValueError):
    """A metadata value that the vocabulary does not know (or a missing one), under policy
    ``unknown="error"``."""


def _normalise_key(value: str) -> str:
    return " ".join(str(value).strip().split()).upper()


@dataclass(frozen=True)
class LabelVocabulary:
    """An ordered list of fields, each with an ordered list of values; one column per value.

    Args:
        fields: ``{field: [value, ...]}``, in column order (dict order is kept).
        synonyms: ``{field: {raw: value}}``; raw strings are matched case-insensitively.
        unknown: what an unknown or missing value does: "error", "zeros" or "column".
    """

    fields: Mapping[str, Sequence[str]]
    synonyms: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    unknown: str = "error"

    def __post_init__(self):
        if self.unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}; got {self.unknown!r}")
        if not self.fields:
            raise ValueError("a vocabulary needs at least one field")
        fields = {}
        for name, values in self.fields.items():
            if not isinstance(name, str) or not name or ":" in name:
                raise ValueError(f"field names must be non-empty strings without ':'; got {name!r}")
            if isinstance(values, str):
                raise TypeError(f"field {name!r}: values must be a list of strings, not a string")
            values = tuple(str(v) for v in values)
            if not values:
                raise ValueError(f"field {name!r} has no values")
            keys = [_normalise_key(v) for v in values]
            if len(set(keys)) != len(keys):
                raise ValueError(f"field {name!r} has duplicate values (case-insensitive): {values}")
            if self.unknown == "column" and UNKNOWN_VALUE.upper() in keys:
                raise ValueError(f"field {name!r} already has a value {UNKNOWN_VALUE!r}, which "
                                 "policy 'column' reserves")
            fields[name] = values
        for name, table in self.synonyms.items():
            if name not in fields:
                raise ValueError(f"synonyms given for field {name!r}, which the vocabulary lacks")
            known = {_normalise_key(v) for v in fields[name]}
            for raw, target in table.items():
                if _normalise_key(target) not in known:
                    raise ValueError(f"synonym {raw!r} -> {target!r} of field {name!r}: "
                                     f"{target!r} is not one of {fields[name]}")
        # frozen dataclass: normalised copies are set once, here
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "synonyms",
                           {k: {str(r): str(t) for r, t in v.items()} for k, v in self.synonyms.items()})

    # ---- layout -------------------------------------------------------------------------------
    def values_of(self, name: str) -> tuple[str, ...]:
        """The column values of field `name`, including ``unknown`` under policy "column"."""
        values = self.fields[name]
        return values + (UNKNOWN_VALUE,) if self.unknown == "column" else values

    @property
    def columns(self) -> list[str]:
        """Column names, ``"field:value"``, in order."""
        return [f"{name}:{value}" for name in self.fields for value in self.values_of(name)]

    @property
    def size(self) -> int:
        return len(self.columns)

    def field_slice(self, name: str) -> slice:
        """The columns of field `name`."""
        start = 0
        for other in self.fields:
            width = len(self.values_of(other))
            if other == name:
                return slice(start, start + width)
            start += width
        raise KeyError(f"no field {name!r}; fields: {list(self.fields)}")

    def with_field(self, name: str, values: Sequence[str],
                   synonyms: Mapping[str, str] | None = None) -> "LabelVocabulary":
        """A new vocabulary with one more field, appended after the existing columns."""
        if name in self.fields:
            raise ValueError(f"field {name!r} already exists")
        new_synonyms = dict(self.synonyms)
        if synonyms:
            new_synonyms[name] = dict(synonyms)
        return LabelVocabulary({**self.fields, name: list(values)}, new_synonyms, self.unknown)

    # ---- encoding -----------------------------------------------------------------------------
    def canonical(self, name: str, raw, where: str = "") -> list[str]:
        """The vocabulary values that raw value(s) `raw` of field `name` stand for.

        `raw` is a string, a list of strings (multi-valued field), or None / "" (missing).
        Returns [] when policy "zeros" drops an unknown value.
        """
        raws = list(raw) if isinstance(raw, (list, tuple, set, frozenset)) else [raw]
        lookup = {_normalise_key(v): v for v in self.fields[name]}
        lookup.update({_normalise_key(r): lookup[_normalise_key(t)]
                       for r, t in self.synonyms.get(name, {}).items()})
        out = []
        for value in raws:
            missing = value is None or (isinstance(value, float) and np.isnan(value)) or \
                str(value).strip() == ""
            hit = None if missing else lookup.get(_normalise_key(value))
            if hit is not None:
                out.append(hit)
                continue
            if self.unknown == "error":
                at = f" ({where})" if where else ""
                what = "missing value" if missing else f"unknown value {value!r}"
                raise UnknownValueError(
                    f"field {name!r}: {what}{at}; known values: {list(self.fields[name])}. "
                    f"Add a synonym, extend the vocabulary, or choose unknown='zeros' or 'column'")
            if self.unknown == "column":
                out.append(UNKNOWN_VALUE)
        return sorted(set(out), key=self.values_of(name).index)

    def encode(self, record: Mapping[str, object], where: str = "") -> np.ndarray:
        """One record ``{field: value}`` -> bool multi-hot vector of length `size`.

        A field absent from `record` counts as missing. Extra keys are ignored (a record may
        carry more metadata than the vocabulary uses).
        """
        vector = np.zeros(self.size, dtype=bool)
        for name in self.fields:
            columns = self.field_slice(name)
            values = self.values_of(name)
            for value in self.canonical(name, record.get(name), where):
                vector[columns.start + values.index(value)] = True
        return vector

    def encode_many(self, records: Iterable[Mapping[str, object]],
                    where: Sequence[str] | None = None) -> np.ndarray:
        """Records -> bool ``[N, size]``; `where[i]` names record i in error messages."""
        records = list(records)
        if where is not None and len(where) != len(records):
            raise ValueError(f"{len(where)} locations for {len(records)} records")
        rows = [self.encode(r, where[i] if where is not None else f"record {i}")
                for i, r in enumerate(records)]
        return np.stack(rows) if rows else np.zeros((0, self.size), dtype=bool)

    def decode(self, vector) -> dict[str, list[str]]:
        """Multi-hot vector -> ``{field: [values]}`` (the inverse of `encode` on canonical input)."""
        vector = np.asarray(vector).astype(bool).reshape(-1)
        if vector.shape[0] != self.size:
            raise ValueError(f"vector has {vector.shape[0]} entries; the vocabulary has {self.size}")
        return {name: [v for v, on in zip(self.values_of(name), vector[self.field_slice(name)]) if on]
                for name in self.fields}

    def field_index(self, multi_hot, name: str) -> np.ndarray:
        """Per row, the index of field `name`'s value (-1 when none is set): for colouring plots
        and per-field summaries."""
        block = np.asarray(multi_hot).astype(bool)[:, self.field_slice(name)]
        return np.where(block.any(1), block.argmax(1), -1)

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "modan_ext.LabelVocabulary", "version": FORMAT_VERSION,
                "fields": [{"name": n, "values": list(v)} for n, v in self.fields.items()],
                "synonyms": {n: dict(t) for n, t in self.synonyms.items()},
                "unknown": self.unknown}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LabelVocabulary":
        """The vocabulary `to_dict` wrote; a malformed one raises `ValueError` naming the entry."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a vocabulary is a JSON object; got {type(data).__name__}")
        if data.get("format") != "modan_ext.LabelVocabulary":
            raise ValueError("not a modan_ext label vocabulary (missing 'format' marker)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"vocabulary format version {data.get('version')} is not supported "
                             f"(this code reads version {FORMAT_VERSION})")
        entries = data.get("fields")
        if not isinstance(entries, list):
            raise ValueError("'fields' must be a list of {\"name\": ..., \"values\": [...]} objects")
        fields = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or \
                    not isinstance(entry.get("values"), list) or \
                    not all(isinstance(v, str) for v in entry["values"]):
                raise ValueError(f"fields[{i}] must be {{\"name\": string, \"values\": [strings]}}; "
                                 f"got {entry!r}")
            if entry["name"] in fields:
                raise ValueError(f"fields[{i}]: field {entry['name']!r} appears twice")
            fields[entry["name"]] = entry["values"]
        synonyms = data.get("synonyms", {})
        if not isinstance(synonyms, Mapping) or not all(
                isinstance(t, Mapping) and all(isinstance(r, str) and isinstance(v, str)
                                               for r, v in t.items()) for t in synonyms.values()):
            raise ValueError("'synonyms' must be {field: {raw string: value string}}")
        return cls(fields, synonyms, data.get("unknown", "error"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LabelVocabulary":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelVocabulary":
        """A vocabulary JSON file; a malformed one raises `ValueError` naming the file (and the
        line and column of a JSON syntax error)."""
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            return cls.from_json(data.decode("utf-8"))
        except (ValueError, TypeError) as exc:  # JSON syntax, UTF-8, structure, values
            raise ValueError(f"{path}: not a valid label vocabulary: {exc}") from exc


def paper_vocabulary(unknown: str = "error") -> LabelVocabulary:
    """The paper's 12 columns: modality [CT, MR, US] + anatomy [abd, lung, af, brain, hip, knee,
    shoulder, spine, thyroid], with synonyms for DICOM defined terms."""
    return LabelVocabulary({"modality": PAPER_MODALITIES, "anatomy": PAPER_ANATOMIES},
                           DEFAULT_SYNONYMS, unknown)
