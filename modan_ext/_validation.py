"""Every user-facing check of the loss, in one place.

The reference and the kernel path both call `check_options` and `check_inputs`, so a bad input
gets the same exception whichever backend would have run.

Value checks (labels are 0/1, features are finite) need to look at the data. They run in eager
mode; inside `torch.compile` they would break the graph, so they are skipped there: labels are then
read as `label != 0` and non-finite features give a NaN loss (the kernels propagate NaN).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

WEIGHTINGS = ("jaccard", "dice", "cosine", "overlap", "binary")
NORMALIZATIONS = ("count", "weight")
CONTRAST_MODES = ("all", "one")
REDUCTIONS = ("mean", "sum", "none")
NAN_POLICIES = ("raise", "propagate")
BACKENDS = ("auto", "kernel", "reference", "triton")
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 0.07
    base_temperature: float = 0.07
    threshold: float = 0.3
    normalization: str = "count"
    contrast_mode: str = "all"
    reduction: str = "mean"
    weighting: str = "jaccard"
    nan_policy: str = "raise"


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _real(name: str, value) -> float:
    """A Python float from any real number (int, float, NumPy scalar, 0-d tensor)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def _positive_float(name: str, value) -> float:
    value = _real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return float(value)


def check_options(temperature=0.07, base_temperature=0.07, threshold=0.3, normalization="count",
                  contrast_mode="all", reduction="mean", weighting="jaccard",
                  nan_policy="raise") -> LossOptions:
    threshold = _real("threshold", threshold)
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    return LossOptions(
        temperature=_positive_float("temperature", temperature),
        base_temperature=_positive_float("base_temperature", base_temperature),
        threshold=float(threshold),
        normalization=_choice("normalization", normalization, NORMALIZATIONS),
        contrast_mode=_choice("contrast_mode", contrast_mode, CONTRAST_MODES),
        reduction=_choice("reduction", reduction, REDUCTIONS),
        weighting=_choice("weighting", weighting, WEIGHTINGS),
        nan_policy=_choice("nan_policy", nan_policy, NAN_POLICIES),
    )


def check_backend(backend) -> str:
    return _choice("backend", backend, BACKENDS)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def _checking_values() -> bool:
    return not torch.compiler.is_compiling()


def check_features(features, opts: LossOptions) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(f"features must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64); got dtype {features.dtype}")
    if features.dim() not in (2, 3):
        raise ValueError("features must have shape [B, V, D] (images x views x dim) or [M, D]; "
                         f"got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"features is an empty batch: shape {tuple(features.shape)}")
    if any(s == 0 for s in features.shape[1:]):
        raise ValueError(f"features has a zero-sized view or feature dimension: "
                         f"shape {tuple(features.shape)}")
    if (opts.nan_policy == "raise" and _checking_values() and features.device.type != "meta"):
        bad = int((~torch.isfinite(features)).sum())
        if bad:
            raise ValueError(f"features contain {bad} non-finite value(s) (NaN or Inf); fix the "
                             "input, or pass nan_policy='propagate' to get a NaN loss instead")
    return features


def check_labels(labels, features: torch.Tensor) -> torch.Tensor | None:
    """Labels for the images of `features`: None, class ids [B], or multi-hot [B, L]."""
    images = features.shape[0]
    what = "images (features.shape[0])" if features.dim() == 3 else "rows (features.shape[0])"
    if labels is None:
        if features.dim() == 2:
            raise ValueError("labels=None needs features of shape [B, V, D]: with 2-D features "
                             "nothing says which rows are views of one image (pass labels, or "
                             "features as [B, V, D] for SimCLR)")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None; got {type(labels).__name__}")
    if labels.device != features.device:
        raise ValueError(f"labels are on device {labels.device} but features on "
                         f"{features.device}; put both on the same device")
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError("1-D labels are integer class ids and must have an integer dtype; got "
                            f"{labels.dtype} (for a single multi-hot column use shape [B, 1])")
    elif labels.dim() == 2:
        if labels.dtype.is_complex:
            raise TypeError(f"labels must be bool, integer or float 0/1; got {labels.dtype}")
        if labels.shape[1] == 0:
            raise ValueError(f"multi-hot labels have no columns: shape {tuple(labels.shape)}")
        if _checking_values() and labels.device.type != "meta" and labels.dtype != torch.bool:
            bad = int(((labels != 0) & (labels != 1)).sum())
            if bad:
                hint = (" (integer class ids go in a 1-D tensor of shape [B])"
                        if labels.shape[1] == 1 else "")
                raise ValueError(f"multi-hot labels must be 0 or 1; found {bad} other "
                                 f"value(s){hint}")
    else:
        raise ValueError("labels must be class ids [B] or multi-hot [B, L]; got shape "
                         f"{tuple(labels.shape)}")
    if labels.shape[0] != images:
        raise ValueError(f"labels have {labels.shape[0]} rows but features have {images} {what}")
    return labels


def check_inputs(features, labels, opts: LossOptions):
    features = check_features(features, opts)
    return features, check_labels(labels, features)
