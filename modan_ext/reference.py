"""The loss in plain PyTorch, written to be read: the oracle of the tests and the fallback when no
compiled kernel exists. It materialises every M x M matrix, so keep M small.

It follows SupContrast's layout (views concatenated view-major: row v*B + b) on purpose: the
kernels use the image-major layout, so a layout slip in either shows up as a test failure. It
reduces the per-anchor losses itself, too: it is the oracle of the shared reduction
(`_anchors.reduce`) as well. Semantics: README.md, "Semantics"; ARCHITECTURE.md, "The op
contract".
"""
from __future__ import annotations

import torch

from ._validation import (LearnableTemperatures, check_inputs, check_options,
                          learnable_temperatures)
from .options import DEFAULTS, LossOptions


def label_similarity(labels: torch.Tensor | None, images: int, weighting: str,
                     device: torch.device) -> torch.Tensor:
    """[B, B] similarity of the images' label sets (0 where a denominator is 0), in float64
    whatever the features' dtype: `sim >= threshold` is decided on it, as the kernels decide it
    (a Jaccard of exactly 0.3 is below a threshold of 0.30000001, which float32 would round to
    the same number as 0.3)."""
    dtype = torch.float64
    if labels is None:  # SimCLR: an image is similar only to itself
        return torch.eye(images, dtype=dtype, device=device)
    if labels.dim() == 1:  # class ids: SupCon
        return (labels[:, None] == labels[None, :]).to(dtype)
    y = (labels != 0).to(dtype)
    inter = y @ y.T
    n = y.sum(1)
    if weighting == "dice":
        denom = n[:, None] + n[None, :]
        inter = 2 * inter
    elif weighting == "cosine":
        denom = torch.sqrt(n[:, None] * n[None, :])
    elif weighting == "overlap":
        denom = torch.minimum(n[:, None], n[None, :])
    else:  # jaccard; binary thresholds the Jaccard similarity
        denom = n[:, None] + n[None, :] - inter
    return torch.where(denom > 0, inter / denom.clamp_min(1), torch.zeros_like(inter))


def positive_weights(sim: torch.Tensor, threshold: float, weighting: str) -> torch.Tensor:
    """[B, B] weight of image j as a positive of image i (0: not a positive)."""
    positive = (sim >= threshold) & (sim > 0)
    weight = torch.ones_like(sim) if weighting == "binary" else sim
    weight = torch.where(positive, weight, torch.zeros_like(sim))
    # The other views of the same image are always positives, with weight 1.
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return torch.where(eye, torch.ones_like(sim), weight)


def anchor_losses(features: torch.Tensor, labels: torch.Tensor | None, opts: LossOptions,
                  compute_dtype: torch.dtype, learnable: LearnableTemperatures | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-anchor losses, "has a positive" flags) of validated inputs, both shaped like
    reduction "none": [B, V] ("all"), [B] ("one"), [M] (2-D features). Losses in
    `compute_dtype`, 0 for an anchor without positives. The temperatures in `learnable` enter
    the arithmetic as the tensors they are, so autograd gives them their gradient."""
    temperature, base_temperature = opts.temperature, opts.base_temperature
    if learnable is not None and learnable.temperature is not None:
        temperature = learnable.temperature.to(compute_dtype)
    if learnable is not None and learnable.base_temperature is not None:
        base_temperature = learnable.base_temperature.to(compute_dtype)
    z = features.to(compute_dtype)
    if z.dim() == 2:
        z = z[:, None, :]
    images, views, _ = z.shape
    contrast = torch.cat(torch.unbind(z, dim=1), dim=0)  # [V*B, D], row v*B + b
    rows = contrast.shape[0]
    image_of_row = torch.arange(images, device=z.device).repeat(views)

    image_weight = positive_weights(label_similarity(labels, images, opts.weighting, z.device),
                                    opts.threshold, opts.weighting).to(compute_dtype)
    not_self = ~torch.eye(rows, dtype=torch.bool, device=z.device)
    weight = image_weight[image_of_row][:, image_of_row] * not_self
    positive = (weight > 0) & not_self

    logits = contrast @ contrast.T / temperature
    lse = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    if rows == 1:  # no other row: nothing to contrast with (and no positive)
        lse = torch.zeros_like(lse)
    log_prob = logits - lse[:, None]
    count = positive.sum(1).to(compute_dtype)
    omega = weight.sum(1)
    norm = count if opts.normalization == "count" else omega
    weighted = torch.where(positive, weight * log_prob, torch.zeros_like(log_prob)).sum(1)
    norm = torch.where(count > 0, norm, torch.ones_like(norm))  # no 0/0, not even in backward
    row_loss = -(temperature / base_temperature) * weighted / norm
    row_loss = torch.where(count > 0, row_loss, torch.zeros_like(row_loss))
    if opts.nan_policy == "propagate":
        row_loss = row_loss + 0 * contrast.sum()  # any non-finite feature makes every entry NaN

    # view-major rows -> [B, V]; "one" keeps view 0, which comes first
    losses, counted = row_loss.view(views, images).T, (count > 0).view(views, images).T
    if features.dim() == 2 or opts.contrast_mode == "one":
        return losses[:, 0], counted[:, 0]
    return losses, counted


def jaccard_supcon_loss_reference(features, labels=None, *, temperature=DEFAULTS.temperature,
                                  base_temperature=DEFAULTS.base_temperature,
                                  threshold=DEFAULTS.threshold,
                                  normalization=DEFAULTS.normalization,
                                  contrast_mode=DEFAULTS.contrast_mode,
                                  reduction=DEFAULTS.reduction, weighting=DEFAULTS.weighting,
                                  nan_policy=DEFAULTS.nan_policy, compute_dtype=torch.float64):
    """Reference implementation of `modan_ext.jaccard_supcon_loss` (same arguments).

    Computes in `compute_dtype` (float64 by default) and returns the features' dtype
    (float32 for half inputs). A temperature given as a tensor that requires grad gets its
    gradient through autograd.
    """
    opts = check_options(temperature=temperature, base_temperature=base_temperature,
                         threshold=threshold, normalization=normalization,
                         contrast_mode=contrast_mode, reduction=reduction, weighting=weighting,
                         nan_policy=nan_policy)
    features, labels = check_inputs(features, labels, opts)
    out_dtype = torch.promote_types(features.dtype, torch.float32)
    losses, counted = anchor_losses(features, labels, opts, compute_dtype,
                                    learnable_temperatures(temperature, base_temperature))
    if opts.reduction == "none":
        return losses.to(out_dtype)
    total = losses.sum()
    if opts.reduction == "sum":
        return total.to(out_dtype)
    return (total / counted.sum().clamp_min(1)).to(out_dtype)
