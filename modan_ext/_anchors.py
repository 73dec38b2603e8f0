"""From validated inputs to the loss the user asked for: per-anchor losses with their "has a
positive" flags from either backend, then the one reduction.

The one-process loss (loss.py) and the gathered loss (distributed.py) both come through here. The
anchors are the rows of the images [begin, begin + images) of a batch (the whole batch in one
process, a rank's own images of the gathered batch under gather_distributed); every row of the
batch is a contrast.
"""
from __future__ import annotations

import torch

from . import ops, reference
from ._validation import LearnableTemperatures
from .options import LossOptions


def anchor_losses(features: torch.Tensor, labels: torch.Tensor | None, opts: LossOptions,
                  backend: str, begin: int = 0, images: int | None = None,
                  learnable: LearnableTemperatures | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, counted) of the anchors of images [begin, begin + images) (default: to the end),
    both shaped like reduction "none" for those images: [b, V] ("all"), [b] ("one"), [b] for 2-D
    features. `backend`: "kernel", "triton" or "reference" (resolved). `learnable`: the
    temperatures that get a gradient."""
    images = features.shape[0] - begin if images is None else images
    if backend == "reference":  # O(M^2) over the whole batch, then this range
        compute_dtype = torch.promote_types(features.dtype, torch.float32)
        losses, counted = reference.anchor_losses(features, labels, opts, compute_dtype,
                                                  learnable)
        return losses[begin:begin + images], counted[begin:begin + images]
    views = features.shape[1] if features.dim() == 3 else 1
    row_loss, stats = ops.supcon_rows(features, labels, opts, begin * views,
                                      (begin + images) * views, backend=backend)
    counted = stats[:, ops.STATS["count"]] > 0
    if learnable is not None:
        row_loss = with_temperature_gradient(row_loss, stats, opts, learnable)
    if features.dim() == 2:
        return row_loss, counted
    if opts.contrast_mode == "one":  # image-major rows: view 0 of each image
        return row_loss[::views], counted[::views]
    return row_loss.view(images, views), counted.view(images, views)


def with_temperature_gradient(row_loss: torch.Tensor, stats: torch.Tensor, opts: LossOptions,
                              learnable: LearnableTemperatures) -> torch.Tensor:
    """The op's per-row losses, plus terms of value zero whose gradient is that of each row's
    loss with respect to the temperatures (the op takes them as plain floats), from the op's
    statistics (ARCHITECTURE.md, "The op contract"):
        ∂ℓ_a/∂T = omega_a / (T_base · norm_a) · entropy_a  for an anchor with a positive, else 0;
        ∂ℓ_a/∂T_base = −ℓ_a / T_base.
    A zero-valued term (T − T.detach()) · ∂ℓ_a/∂T is plain arithmetic to autograd,
    torch.compile and the distributed gather alike."""
    dtype = row_loss.dtype
    out = row_loss
    if learnable.temperature is not None:
        counted = stats[:, ops.STATS["count"]] > 0
        norm = torch.where(counted, stats[:, ops.STATS["norm"]], torch.ones_like(stats[:, 0]))
        slope = stats[:, ops.STATS["omega"]] * stats[:, ops.STATS["entropy"]] / (
            opts.base_temperature * norm)
        slope = torch.where(counted, slope, torch.zeros_like(slope))
        t = learnable.temperature
        out = out + (t - t.detach()).to(dtype) * slope.to(dtype)
    if learnable.base_temperature is not None:
        t_base = learnable.base_temperature
        out = out + (t_base - t_base.detach()).to(dtype) * (
            -row_loss.detach() / opts.base_temperature)
    return out


def reduce(losses: torch.Tensor, counted_total: torch.Tensor | None, reduction: str,
           scale: int = 1) -> torch.Tensor:
    """The user's reduction of per-anchor `losses`. "mean" divides by `counted_total`, the number
    of anchors with a positive in the whole problem (every rank's, when gathered), at least 1: a
    batch without positives gives 0 with a zero gradient. `scale` multiplies "sum" and "mean"
    (the world size under gather_distributed); "none" is never scaled."""
    if reduction == "none":
        return losses
    total = losses.sum()  # non-anchors are 0; NaN propagates under nan_policy="propagate"
    if scale != 1:
        total = total * scale
    if reduction == "sum":
        return total
    return total / counted_total.to(device=total.device, dtype=total.dtype).clamp_min(1)
