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

from .options import (BACKENDS, CONTRAST_MODES, DEFAULTS, FEATURE_DTYPES, NAN_POLICIES,
                      NORMALIZATIONS, REDUCTIONS, WEIGHTINGS, LossOptions)


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


_TENSOR_OPTION_IN_GRAPH = ("modan_ext: an option given as a tensor is read as a Python float (the "
                           "fused op takes floats); a compiled graph cannot hold its value. Pass "
                           "a float, or leave the loss call outside fullgraph compilation")


def _tensor_value(value: torch.Tensor):
    if torch.compiler.is_compiling():
        # A graph break that says why (fullgraph=True reports it); the value is then read
        # eagerly. torch._dynamo is imported here, not at the top: `import modan_ext` should not
        # pay for it (it brings triton), and while compiling it is already loaded.
        from torch._dynamo import graph_break
        graph_break(msg=_TENSOR_OPTION_IN_GRAPH)
    return value.item()


def _real(name: str, value) -> float:
    """A Python float from any real number (int, float, NumPy scalar, 0-d tensor)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = _tensor_value(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def _positive_float(name: str, value) -> float:
    value = _real(name, value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float option is a
    # symbolic value, which comparisons accept (as guards) and math.isfinite does not.
    if not 0 < value < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return float(value)


@dataclass(frozen=True, eq=False)
class LearnableTemperatures:
    """The temperature and base temperature as given, where they are tensors that require grad
    (None otherwise): the loss gives them a gradient (`_anchors`, `reference`)."""
    temperature: torch.Tensor | None = None
    base_temperature: torch.Tensor | None = None


def learnable_temperatures(temperature, base_temperature) -> LearnableTemperatures | None:
    """Which of the (already checked) temperatures need a gradient; None when neither does."""
    def learnable(value):
        return value if isinstance(value, torch.Tensor) and value.requires_grad else None
    t, t_base = learnable(temperature), learnable(base_temperature)
    return None if t is None and t_base is None else LearnableTemperatures(t, t_base)


def check_options(*, temperature=DEFAULTS.temperature,
                  base_temperature=DEFAULTS.base_temperature, threshold=DEFAULTS.threshold,
                  normalization=DEFAULTS.normalization, contrast_mode=DEFAULTS.contrast_mode,
                  reduction=DEFAULTS.reduction, weighting=DEFAULTS.weighting,
                  nan_policy=DEFAULTS.nan_policy) -> LossOptions:
    threshold = _real("threshold", threshold)
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    return LossOptions(
        temperature=_positive_float("temperature", temperature),
        base_temperature=_positive_float("base_temperature", base_temperature),
        threshold=threshold,
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
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in FEATURE_DTYPES)
        raise TypeError(f"features must be a floating tensor ({names}); got dtype "
                        f"{features.dtype}")
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


def label_kind(labels: torch.Tensor | None) -> str:
    """Which of `options.LABEL_KINDS` validated labels are."""
    if labels is None:
        return "none"
    return "class_ids" if labels.dim() == 1 else "multi_hot"


def check_inputs(features, labels, opts: LossOptions):
    features = check_features(features, opts)
    return features, check_labels(labels, features)
