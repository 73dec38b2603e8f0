"""`JaccardSupConLoss` and `jaccard_supcon_loss`: the public entry points and the backend choice."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

from . import distributed, ops, triton_backend
from ._anchors import anchor_losses, reduce
from ._validation import (LearnableTemperatures, check_backend, check_flag, check_inputs,
                          check_options, learnable_temperatures)
from .options import DEFAULTS, LossOptions

# Checks the loss options and says which temperatures get a gradient. Called where a bad option
# raises on every rank under gather_distributed (distributed.gathered_loss), not before.
OptionsCheck = Callable[[], "tuple[LossOptions, LearnableTemperatures | None]"]


def resolve_backend(backend: str, device) -> str:
    """The backend that will run on `device`: "triton", "kernel" or "reference". "auto" on CUDA
    prefers the Triton kernels (README, "GPU backends": their every line has run, under Triton's
    interpreter), then the compiled CUDA kernel, then the reference."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        reason = triton_backend.unavailable_reason(str(device))
        if reason is None:
            return "triton"
        if backend == "triton":
            raise RuntimeError(f"backend='triton' cannot serve {device}: {reason}")
    if ops.kernel_available(device):
        return "kernel"
    if backend == "kernel":
        raise RuntimeError(f"backend='kernel' but no compiled kernel serves {device} "
                           f"({ops.missing_kernel_reason(device)})")
    if device.type != "meta":
        _warn_fallback_once(device)
    return "reference"


_warned = False


def _warn_fallback_once(device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"modan_ext: no compiled kernel for {device} "
                      f"({ops.missing_kernel_reason(device)}); using the PyTorch "
                      "reference, which needs O(M^2) memory. Build the extension for speed.",
                      RuntimeWarning, stacklevel=3)


def _autocast_off(features):
    """The loss accumulates in float32 at least: autocast must not run its products in half."""
    device_type = getattr(getattr(features, "device", None), "type", None)
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _loss(features, labels, options: OptionsCheck, backend: str,
          gather_distributed: bool = False) -> torch.Tensor:
    with _autocast_off(features):
        if gather_distributed and distributed.is_active():
            return distributed.gathered_loss(features, labels, options,
                                             lambda device: resolve_backend(backend, device))
        opts, learnable = options()
        features, labels = check_inputs(features, labels, opts)
        losses, counted = anchor_losses(features, labels, opts,
                                        resolve_backend(backend, features.device),
                                        learnable=learnable)
        return reduce(losses, counted.sum(), opts.reduction)


def jaccard_supcon_loss(features, labels=None, *, temperature=DEFAULTS.temperature,
                        base_temperature=DEFAULTS.base_temperature, threshold=DEFAULTS.threshold,
                        normalization=DEFAULTS.normalization,
                        contrast_mode=DEFAULTS.contrast_mode, reduction=DEFAULTS.reduction,
                        weighting=DEFAULTS.weighting, nan_policy=DEFAULTS.nan_policy,
                        backend="auto", gather_distributed=False) -> torch.Tensor:
    """Jaccard-weighted multi-label supervised contrastive loss (ModAn-MulSupCon, Eq. 3).

    Args:
        features: ``[B, V, D]`` (B images x V augmented views, SupContrast's convention) or
            ``[M, D]`` (one row per sample). Used as given: L2-normalise them first, as in
            SupContrast (e.g. ``F.normalize(x, dim=-1)``).
        labels: multi-hot ``[B, L]`` (bool, integer or float 0/1; ``[M, L]`` with 2-D features),
            integer class ids ``[B]`` (then the loss is SupCon), or None with 3-D features
            (SimCLR: only the other views of an image are its positives).
        temperature, base_temperature: T and T_base; the loss is scaled by T / T_base. Either
            may be a 0-d tensor; one that requires grad gets its gradient (a learnable
            temperature), on every backend. The fused op takes T as a float: inside
            torch.compile a tensor is read outside the graph (fullgraph=True refuses it).
        threshold: another image is a positive when its label similarity is >= threshold and > 0.
            The other views of the same image are always positives with weight 1.
        normalization: "count" divides an anchor's weighted sum by its number of positives
            (paper); "weight" by the sum of its weights (a soft-target cross-entropy).
        contrast_mode: "all" (every row is an anchor) or "one" (only view 0 of each image).
        reduction: "mean" over anchors with at least one positive (0, with a zero gradient, when
            there is none), "sum", or "none" (per-anchor losses: ``[B, V]``, ``[B]`` for "one",
            ``[M]`` for 2-D features; 0 for an anchor without positives).
        weighting: label similarity: "jaccard" (default), "dice", "cosine", "overlap", or
            "binary" (weight 1 for every positive, positives by Jaccard >= threshold).
        nan_policy: "raise" (ValueError on NaN/Inf features, in eager mode) or "propagate"
            (a NaN loss). Inside torch.compile the check cannot run; NaN propagates.
        backend: "auto" (on CUDA the Triton kernels, else the compiled kernel for the features'
            device, else the reference with one warning), "kernel" (the compiled C++/CUDA
            kernel), "triton", or "reference".
        gather_distributed: under torch.distributed with more than one rank, gather features and
            labels from every rank (uneven batch sizes allowed) and compute this rank's anchors
            against the whole gathered batch; the loss is scaled so that the mean of the ranks'
            losses, and DDP's average of the gradients, are those of one process on the
            concatenated batch ("none": this rank's own per-anchor losses, unscaled). Every rank
            must call the loss. Without an initialised process group, or with one rank, the same
            as False. See `modan_ext.distributed`.

    Returns:
        float32 for float32/float16/bfloat16 features (also under torch.autocast), float64 for
        float64.
    """
    def options():
        opts = check_options(temperature=temperature, base_temperature=base_temperature,
                             threshold=threshold, normalization=normalization,
                             contrast_mode=contrast_mode, reduction=reduction,
                             weighting=weighting, nan_policy=nan_policy)
        return opts, learnable_temperatures(temperature, base_temperature)
    return _loss(features, labels, options, backend,
                 check_flag("gather_distributed", gather_distributed))


class JaccardSupConLoss(nn.Module):
    """Module form of :func:`jaccard_supcon_loss`; ``forward(features, labels=None)``.

    A temperature or base temperature given as a 0-d tensor is kept by reference and read at
    every call (an ``nn.Parameter`` is registered as this module's parameter), so a learnable
    temperature is used at its current value and gets its gradient."""

    _TENSOR_OPTIONS = ("temperature", "base_temperature")

    def __init__(self, temperature=DEFAULTS.temperature,
                 base_temperature=DEFAULTS.base_temperature, threshold=DEFAULTS.threshold,
                 normalization=DEFAULTS.normalization, contrast_mode=DEFAULTS.contrast_mode,
                 reduction=DEFAULTS.reduction, weighting=DEFAULTS.weighting,
                 nan_policy=DEFAULTS.nan_policy, backend="auto", gather_distributed=False):
        super().__init__()
        self.options = check_options(
            temperature=temperature, base_temperature=base_temperature, threshold=threshold,
            normalization=normalization, contrast_mode=contrast_mode, reduction=reduction,
            weighting=weighting, nan_policy=nan_policy)
        self.backend = check_backend(backend)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        given = dict(temperature=temperature, base_temperature=base_temperature)
        self._tensor_options = tuple(name for name in self._TENSOR_OPTIONS
                                     if isinstance(given[name], torch.Tensor))
        for name in self._tensor_options:
            setattr(self, name, given[name])

    def backend_for(self, device) -> str:
        """Which backend runs for inputs on `device`: "triton", "kernel" or "reference"."""
        return resolve_backend(self.backend, device)

    def _options(self):
        if not self._tensor_options:
            return self.options, None
        current = {name: getattr(self, name) for name in self._tensor_options}
        opts = check_options(**{**self.options.__dict__, **current})
        return opts, learnable_temperatures(getattr(self, "temperature", None),
                                            getattr(self, "base_temperature", None))

    def forward(self, features, labels=None):
        return _loss(features, labels, self._options, self.backend, self.gather_distributed)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.__dict__.items()
                           if k not in self._tensor_options)
        tensors = "".join(f", {name}=<tensor>" for name in self._tensor_options)
        return (f"{fields}{tensors}, backend={self.backend!r}, "
                f"gather_distributed={self.gather_distributed}")
