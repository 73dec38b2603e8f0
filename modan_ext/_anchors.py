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
from .options import LossOptions


def anchor_losses(features: torch.Tensor, labels: torch.Tensor | None, opts: LossOptions,
                  backend: str, begin: int = 0, images: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, counted) of the anchors of images [begin, begin + images) (default: to the end),
    both shaped like reduction "none" for those images: [b, V] ("all"), [b] ("one"), [b] for 2-D
    features. `backend`: "kernel", "triton" or "reference" (resolved)."""
    images = features.shape[0] - begin if images is None else images
    if backend == "reference":  # O(M^2) over the whole batch, then this range
        compute_dtype = torch.promote_types(features.dtype, torch.float32)
        losses, counted = reference.anchor_losses(features, labels, opts, compute_dtype)
        return losses[begin:begin + images], counted[begin:begin + images]
    views = features.shape[1] if features.dim() == 3 else 1
    row_loss, stats = ops.supcon_rows(features, labels, opts, begin * views,
                                      (begin + images) * views, backend=backend)
    counted = stats[:, 1] > 0  # stats: (lse, count, ...) per row
    if features.dim() == 2:
        return row_loss, counted
    if opts.contrast_mode == "one":  # image-major rows: view 0 of each image
        return row_loss[::views], counted[::views]
    return row_loss.view(images, views), counted.view(images, views)


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
