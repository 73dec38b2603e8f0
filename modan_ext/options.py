"""The loss's vocabulary: every option's allowed values and default, the feature dtypes, the kinds
of labels, and the integer codes the compiled op takes, each written once.

Codes: the op (csrc/supcon.cpp) takes `weighting`, `normalization` and `label_kind` as integers,
the values of the C++ enums `Weighting`, `Normalization` and `LabelKind` (csrc/supcon_pair.h).
The tables below are the only place where a name meets its number; the tuples of names are read
off them. tests/test_custom_op.py checks every code against the op's behaviour, so a table that
drifts from the C++ enums fails a test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHTING_CODES = {"jaccard": 0, "dice": 1, "cosine": 2, "overlap": 3, "binary": 4}
NORMALIZATION_CODES = {"count": 0, "weight": 1}
LABEL_KIND_CODES = {"multi_hot": 0, "class_ids": 1}

WEIGHTINGS = tuple(WEIGHTING_CODES)
NORMALIZATIONS = tuple(NORMALIZATION_CODES)
CONTRAST_MODES = ("all", "one")
REDUCTIONS = ("mean", "sum", "none")
NAN_POLICIES = ("raise", "propagate")
BACKENDS = ("auto", "kernel", "triton", "reference")
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What a user may pass as labels. "none" (SimCLR) reaches the op as class ids 0..B-1.
LABEL_KINDS = (*LABEL_KIND_CODES, "none")


@dataclass(frozen=True)
class LossOptions:
    """The options of one loss, validated (`_validation.check_options`); the defaults are the
    paper's."""
    temperature: float = 0.07
    base_temperature: float = 0.07
    threshold: float = 0.3
    normalization: str = "count"
    contrast_mode: str = "all"
    reduction: str = "mean"
    weighting: str = "jaccard"
    nan_policy: str = "raise"


DEFAULTS = LossOptions()
