"""The Triton backend's label arithmetic: the SWAR popcount, and the threshold table, which must
decide every pair exactly as csrc/supcon_pair.h does (`sim >= threshold` with sim computed in
double from the popcounts), ties such as Jaccard 1/5 against threshold 0.2 included."""
from __future__ import annotations

import triton_setup  # noqa: F401  (first: decides where the kernels run)

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton")  # the table's module shares the label codes with the kernels

from modan_ext.triton_backend.thresholds import positive_limits  # noqa: E402
from triton_setup import DEVICE, requires_device  # noqa: E402

WEIGHTINGS = {"jaccard": 0, "dice": 1, "cosine": 2, "overlap": 3, "binary": 4}
TIES = [0.0, 1e-3, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 5 / 6, 1.0,
        0.30000000000000004, 0.29999999999999993, 0.2 + 2 ** -55]


def double_rule(weighting: str, n: int, n_i: int, n_j: int, threshold: float) -> bool:
    """supcon_pair.h, transcribed: label_similarity in double, then positive_weight > 0."""
    if n == 0:
        sim = 0.0
    elif weighting == "dice":
        sim = float(2 * n) / float(n_i + n_j)
    elif weighting == "cosine":
        sim = float(n) / math.sqrt(float(n_i) * float(n_j))
    elif weighting == "overlap":
        sim = float(n) / float(min(n_i, n_j))
    else:
        sim = float(n) / float(n_i + n_j - n)
    return not (not (sim > 0.0) or sim < threshold)


def brute_force_limits(weighting: str, threshold: float, labels: int) -> np.ndarray:
    """limits[n] by trying every key (numpy float64: IEEE division and sqrt, like C++)."""
    out = np.full(labels + 1, -1, dtype=np.int64)
    for n in range(1, labels + 1):
        if weighting == "dice":
            keys = np.arange(2 * n, 2 * labels + 1, dtype=np.float64)
            sim = (2.0 * n) / keys
        elif weighting == "cosine":
            keys = np.arange(n * n, labels * labels + 1, dtype=np.float64)
            sim = n / np.sqrt(keys)
        else:
            keys = np.arange(n, labels + 1, dtype=np.float64)
            sim = n / keys
        ok = (sim > 0) & (sim >= threshold)
        if ok.any():
            out[n] = int(keys[ok].max())
    return out


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("words", [1, 2])
def test_limits_match_brute_force(weighting, words):
    """The windowed search of thresholds.py finds the exact boundary for every n and threshold
    (the ties, random thresholds, and those a raw op may pass: > 1, < 0, NaN)."""
    rng = np.random.default_rng(words)
    thresholds = TIES + list(rng.uniform(0, 1, 12)) + [1.5, -0.1, float("nan")]
    for threshold in thresholds:
        got = positive_limits(WEIGHTINGS[weighting], threshold, words, "cpu").numpy()
        expected = brute_force_limits(weighting, threshold, 64 * words)
        bad = np.nonzero(got != expected)[0]
        assert bad.size == 0, (f"{weighting} threshold {threshold!r}: n = {bad[:5]}: "
                               f"{got[bad[:5]]} != {expected[bad[:5]]}")


@pytest.mark.parametrize("weighting", ["jaccard", "dice", "overlap"])
def test_limits_match_brute_force_many_words(weighting):
    for threshold in TIES:
        got = positive_limits(WEIGHTINGS[weighting], threshold, 5, "cpu").numpy()
        assert np.array_equal(got, brute_force_limits(weighting, threshold, 320)), threshold


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_table_decides_every_pair_like_supcon_pair(weighting):
    """Every (n_i, n_j, n) with up to 24 labels: `key <= limits[n]` (the kernels' test) equals the
    transcribed double rule of supcon_pair.h, for every tie threshold."""
    for threshold in TIES:
        limits = positive_limits(WEIGHTINGS[weighting], threshold, 1, "cpu").tolist()
        for n_i in range(0, 25):
            for n_j in range(0, 25):
                for n in range(0, min(n_i, n_j) + 1):
                    key = {"dice": n_i + n_j, "cosine": n_i * n_j,
                           "overlap": min(n_i, n_j)}.get(weighting, n_i + n_j - n)
                    table = n > 0 and key <= limits[n]
                    assert table == double_rule(weighting, n, n_i, n_j, threshold), \
                        (weighting, threshold, n_i, n_j, n)


def test_ties_that_rational_arithmetic_would_get_wrong():
    """Jaccard 1/5 against threshold 0.2 (and 1/10 vs 0.1, 2/5 vs 0.4, 4/5 vs 0.8) is a positive
    in double, where RN(1/5) == 0.2, although 1/5 < 0.2 as exact rationals (0.2 is stored a
    little above 1/5): an exact integer rule would reject it."""
    from fractions import Fraction
    for n, key, threshold in ((1, 5, 0.2), (1, 10, 0.1), (2, 5, 0.4), (4, 5, 0.8)):
        assert Fraction(n, key) < Fraction(threshold)
        assert double_rule("jaccard", n, key, n, threshold)
        assert int(positive_limits(0, threshold, 1, "cpu")[n]) >= key


def test_cosine_refuses_too_many_labels():
    with pytest.raises(RuntimeError, match="cosine weighting takes at most"):
        positive_limits(2, 0.3, 1000, "cpu")


# ---- the SWAR popcount on the device -------------------------------------------------------------

if triton_setup.HAVE_TRITON:
    import triton
    import triton.language as tl

    from modan_ext.triton_backend.labels import popcount64

    @triton.jit
    def _popcount_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0)
        tl.store(out_ptr + i, popcount64(x), mask=i < n)


@requires_device
def test_popcount64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2**63, 2**63 - 1, (1000,), generator=gen, dtype=torch.int64)
    x[:6] = torch.tensor([0, -1, 1, -2**63, 2**63 - 1, 0x5555555555555555])
    out = torch.empty(1000, dtype=torch.int32)
    x, out = x.to(DEVICE), out.to(DEVICE)
    _popcount_kernel[(triton.cdiv(1000, 256),)](x, out, 1000, BLOCK=256)
    expected = [bin(v & (2**64 - 1)).count("1") for v in x.cpu().tolist()]
    assert out.cpu().tolist() == expected
