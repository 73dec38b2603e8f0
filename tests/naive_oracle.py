"""A second, independent oracle of the loss: the formula, one anchor at a time.

Written from README.md "Semantics" in plain Python over image-major rows (the reference,
`modan_ext.reference`, is vectorised over view-major rows), float64, differentiable through torch
ops and slow: keep M small. It checks the reference itself, the op's per-row statistics
(tests/test_custom_op.py) and which anchors the reduction counts (tests/test_properties.py).
"""
from __future__ import annotations

import math

import torch


def label_sim(labels, i: int, j: int, weighting: str) -> float:
    """Label similarity of images i and j (README.md, "Semantics"), in Python arithmetic."""
    if labels is None:
        return 1.0 if i == j else 0.0
    if labels.dim() == 1:
        return 1.0 if int(labels[i]) == int(labels[j]) else 0.0
    yi = set(torch.nonzero(labels[i] != 0).flatten().tolist())
    yj = set(torch.nonzero(labels[j] != 0).flatten().tolist())
    inter, ni, nj = len(yi & yj), len(yi), len(yj)
    if weighting in ("jaccard", "binary"):
        den = ni + nj - inter
        return inter / den if den else 0.0
    if weighting == "dice":
        return 2 * inter / (ni + nj) if ni + nj else 0.0
    if weighting == "cosine":
        return inter / math.sqrt(ni * nj) if ni * nj else 0.0
    if weighting == "overlap":
        return inter / min(ni, nj) if min(ni, nj) else 0.0
    raise ValueError(weighting)


def naive_loss(features: torch.Tensor, labels=None, *, temperature=0.07, base_temperature=0.07,
               threshold=0.3, normalization="count", contrast_mode="all", reduction="mean",
               weighting="jaccard", **_):
    """The loss straight from the formula: rows image-major, one anchor at a time, float64.
    Differentiable (torch ops), slow: keep M small."""
    z = features.double()
    flat = z.dim() == 2
    if flat:
        z = z[:, None]
    B, V, D = z.shape
    rows = z.reshape(B * V, D)
    M = B * V
    sims = [[label_sim(labels, i, j, weighting) for j in range(B)] for i in range(B)]
    per_row, counted = [], []
    for a in range(M):
        i = a // V
        if contrast_mode == "one" and a % V != 0:
            continue
        positives = []  # (b, weight)
        for b in range(M):
            j = b // V
            if b == a:
                continue
            if i == j:
                positives.append((b, 1.0))
            elif sims[i][j] >= threshold and sims[i][j] > 0:
                positives.append((b, 1.0 if weighting == "binary" else sims[i][j]))
        if not positives:
            per_row.append(rows.new_zeros(()) * rows.sum() * 0)
            counted.append(False)
            continue
        logits = rows @ rows[a] / temperature
        others = torch.cat([logits[:a], logits[a + 1:]])
        lse = torch.logsumexp(others, 0)
        total = sum(w * (logits[b] - lse) for b, w in positives)
        norm = len(positives) if normalization == "count" else sum(w for _, w in positives)
        per_row.append(-(temperature / base_temperature) * total / norm)
        counted.append(True)
    per = torch.stack(per_row)
    if reduction == "none":
        if flat or contrast_mode == "one":
            return per
        return per.view(B, V)
    if reduction == "sum":
        return per.sum()
    n = sum(counted)
    return per.sum() / max(n, 1)


def naive_fn(features, labels=None, **options):
    return naive_loss(features, labels, **options)


def anchors_with_positive(features: torch.Tensor, labels, *, threshold=0.3, contrast_mode="all",
                          weighting="jaccard", **_) -> torch.Tensor:
    """Bool mask, shaped like reduction="none"'s output: which anchors have >= 1 positive."""
    flat = features.dim() == 2
    B = features.shape[0]
    V = 1 if flat else features.shape[1]
    out = torch.zeros(B, V, dtype=torch.bool)
    for i in range(B):
        other_image = any(
            j != i and label_sim(labels, i, j, weighting) >= threshold
            and label_sim(labels, i, j, weighting) > 0 for j in range(B))
        out[i, :] = other_image or V > 1
    if flat:
        return out[:, 0]
    return out[:, 0] if contrast_mode == "one" else out
