"""The exact threshold rule as a table: limits[n] = the largest similarity denominator ("key") for
which a pair sharing n labels is a positive.

`csrc/supcon_pair.h` decides `sim >= threshold` with sim computed in double from the popcounts
(n_and / (n_i + n_j - n_and) for Jaccard, ...). Rounding makes that differ from the exact rational
comparison exactly at the cases users write (Jaccard 1/5 with threshold 0.2: RN(1/5) == 0.2 but
1/5 < 0.2 as rationals), so a kernel must reproduce the double arithmetic, not the rational. For a
fixed numerator n, RN(num(n) / key) is non-increasing in the key (division and rounding are
monotone), so "positive" is "key <= limits[n]": one integer comparison per pair on the device,
with the table built here from the very double operations of supcon_pair.h.

| weighting        | num(n) | key (an integer of the pair)   | similarity        |
|------------------|--------|--------------------------------|-------------------|
| jaccard, binary  | n      | n_i + n_j - n  (the union)     | num / key         |
| dice             | 2n     | n_i + n_j                      | num / key         |
| overlap          | n      | min(n_i, n_j)                  | num / key         |
| cosine           | n      | n_i * n_j                      | num / sqrt(key)   |

The boundary is searched in a window of 5 keys around g = floor(num / threshold) (cosine:
floor((n / threshold)^2)): a positive key satisfies num / key >= threshold (1 - 2^-53), so
key <= (num / threshold)(1 + 2^-52) < floor + 2, and every key <= (num / threshold)(1 - 2^-52)
is a positive, so the boundary is >= floor - 1; g itself is within 1 of floor(num / threshold)
(one rounding). Cosine adds one more rounding (the sqrt) and squares the ratio; the same bound
holds while (n / threshold)^2 < 2^49, far beyond an int32 key. `tests/test_triton_labels.py`
checks the table against a brute-force search of every key.
"""
from __future__ import annotations

import math

import torch

from .labels import COSINE, DICE

DICE, COSINE = DICE.value, COSINE.value

WINDOW = 2  # keys g - 2 .. g + 2
MAX_COSINE_LABELS = 46340  # n_i * n_j must fit in int32


def similarity_rule(weighting: int, n: torch.Tensor, key: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """supcon_pair.h's decision `sim > 0 && sim >= threshold` for float64 tensors n (shared
    labels) and key, elementwise, in the same double operations."""
    num = 2 * n if weighting == DICE else n
    sim = num / (torch.sqrt(key) if weighting == COSINE else key)
    return (sim > 0) & (sim >= threshold)


def key_range(weighting: int, n: torch.Tensor, labels: int):
    """Smallest and largest key a pair sharing n labels can have (images of <= `labels`)."""
    if weighting == DICE:
        return 2 * n, torch.full_like(n, 2.0 * labels)
    if weighting == COSINE:
        return n * n, torch.full_like(n, float(labels) ** 2)
    return n, torch.full_like(n, float(labels))  # jaccard, binary, overlap


def positive_limits(weighting: int, threshold: float, words: int, device) -> torch.Tensor:
    """int32 [64 * words + 1]: limits[n] for n = 0 .. 64 * words shared labels; -1 (no key) when
    no pair sharing n labels is a positive, and for n = 0 (similarity 0 is never a positive)."""
    labels = 64 * words
    if weighting == COSINE and labels > MAX_COSINE_LABELS:
        raise RuntimeError(f"modan_ext (triton): the cosine weighting takes at most "
                           f"{MAX_COSINE_LABELS} label columns; got {words} words of 64")
    n = torch.arange(labels + 1, device=device, dtype=torch.float64)
    if math.isnan(threshold):  # `sim >= nan` is never true
        return torch.full_like(n, -1, dtype=torch.int32)
    lowest, highest = key_range(weighting, n, labels)
    num = 2 * n if weighting == DICE else n
    ratio = num / threshold if threshold > 0 else torch.full_like(n, float("inf"))
    guess = ratio * ratio if weighting == COSINE else ratio
    guess = torch.floor(torch.minimum(torch.maximum(guess, lowest - 1), highest))
    keys = guess[:, None] + torch.arange(-WINDOW, WINDOW + 1, device=device, dtype=torch.float64)
    inside = (keys >= lowest[:, None]) & (keys <= highest[:, None])
    positive = inside & similarity_rule(weighting, n[:, None], keys.clamp_min(1), threshold)
    limit = torch.where(positive, keys, torch.full_like(keys, -1.0)).amax(dim=1)
    limit[0] = -1
    return limit.to(torch.int32)
