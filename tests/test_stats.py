"""AUC and the Wilcoxon signed-rank test, on toy cases with known answers and against the exact
values (rational AUC, the permutation distribution of W+)."""
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from modan_ext.training import stats as ev


def test_auc_known_values():
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert ev.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert ev.roc_auc([0, 1], [0.5, 0.5]) == 0.5                       # a tie counts half
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75     # sklearn's doc example
    # positives 3, 2, 2 vs negatives 1, 2: 4 wins + 2 ties of 6 pairs
    assert ev.roc_auc([1, 0, 1, 0, 1], [3, 1, 2, 2, 2]) == pytest.approx(5 / 6)


def test_auc_rejects_one_class_and_nan():
    with pytest.raises(ValueError, match="both classes"):
        ev.roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        ev.roc_auc([0, 1], [0.1, float("nan")])


def test_tied_differences_share_their_average_rank():
    # |d| = [10, 20, 20, 5] ranks [2, 3.5, 3.5, 1]: W+ = 2 + 3.5 + 1
    assert ev.wilcoxon_signed_rank([10, 20, -20, 5]).statistic == 6.5


def test_wilcoxon_exact_small_cases():
    # all 5 differences positive: W+ = 15 is the largest of 2^5 equally likely sums
    r = ev.wilcoxon_signed_rank([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], "greater")
    assert (r.statistic, r.n, r.method) == (15.0, 5, "exact") and r.p_value == pytest.approx(1 / 32)
    assert ev.wilcoxon_signed_rank([1, 2, 3, 4, 5], alternative="less").p_value == 1.0
    # d = [1, -2, 3]: W+ = 4; sums of subsets of {1,2,3} that are >= 4: {1,3},{2,3},{1,2,3} -> 3/8
    assert ev.wilcoxon_signed_rank([1, -2, 3]).p_value == pytest.approx(3 / 8)
    # W+ takes 0,1,2,3,3,4,5,6: P(W+ <= 4) = 6/8, two-sided = 2 * min(3/8, 6/8)
    assert ev.wilcoxon_signed_rank([1, -2, 3], alternative="two-sided").p_value == pytest.approx(0.75)
    # zeros are dropped; nothing left -> p = 1
    assert ev.wilcoxon_signed_rank([0.0, 0.0]).p_value == 1.0


def test_wilcoxon_with_ties_is_the_exact_permutation_distribution():
    # |d| = [1, 1, 2]: ranks 1.5, 1.5, 3; d = [+1, +1, -2] gives W+ = 3.
    # The 8 sign patterns give W+ in {0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6}: P(W+ >= 3) = 5/8
    assert ev.wilcoxon_signed_rank([1, 1, -2]).p_value == pytest.approx(5 / 8)


def test_wilcoxon_normal_approximation_agrees_with_exact_for_moderate_n():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1, 22)
    exact = ev.wilcoxon_signed_rank(d, exact_max_n=25).p_value
    approx = ev.wilcoxon_signed_rank(d, exact_max_n=0)
    assert approx.method == "normal" and math.isclose(exact, approx.p_value, abs_tol=0.01)


def test_wilcoxon_matches_scipy_without_ties():
    scipy_stats = stats
    rng = np.random.default_rng(1)
    for n in (4, 9, 15):
        x, y = rng.normal(0.2, 1, n), rng.normal(0, 1, n)
        for alternative in ("greater", "less", "two-sided"):
            ours = ev.wilcoxon_signed_rank(x, y, alternative).p_value
            theirs = scipy_stats.wilcoxon(x, y, alternative=alternative, method="exact").pvalue
            assert ours == pytest.approx(theirs, rel=1e-9)


def _exact_auc(targets, scores) -> float:
    pos, neg = scores[targets], scores[~targets]
    wins = sum(Fraction(int((p > neg).sum())) + Fraction(int((p == neg).sum()), 2) for p in pos)
    return float(wins / (len(pos) * len(neg)))


def test_auc_is_the_correctly_rounded_rank_sum_value():
    # Equal AUCs must compare equal: best-epoch selection keeps the first epoch on a tie.
    rng = np.random.default_rng(0)
    for i in range(300):
        n = int(rng.integers(4, 60))
        targets = rng.random(n) < rng.uniform(0.2, 0.8)
        if targets.all() or not targets.any():
            continue
        scores = rng.normal(size=n).astype(np.float32).astype(np.float64)
        if i % 2:
            scores = np.round(scores, 1)  # ties
        assert ev.roc_auc(targets, scores) == _exact_auc(targets, scores)


def test_wilcoxon_with_ties_equals_scipys_exact_permutation_distribution():
    # scipy enumerates all 2^n sign patterns here (its "exact" method is not exact with ties)
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(60):
        d = rng.integers(-4, 6, int(rng.integers(3, 10))).astype(float)
        nonzero = d[d != 0]
        if len(nonzero) < 2 or len(np.unique(np.abs(nonzero))) == len(nonzero):
            continue
        for alternative in ("greater", "less", "two-sided"):
            ours = ev.wilcoxon_signed_rank(d, alternative=alternative)
            theirs = stats.wilcoxon(nonzero, alternative=alternative,
                                    method=stats.PermutationMethod(n_resamples=2 ** len(nonzero)))
            assert ours.method == "exact" and ours.p_value == pytest.approx(theirs.pvalue, rel=1e-12)
            checked += 1
    assert checked > 50


def test_wilcoxon_exact_paths_agree_where_both_apply():
    # without ties, scipy's exact distribution and the tie-aware one are the same distribution
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 12, 25):
        d = rng.normal(0.3, 1, n)
        ranks = stats.rankdata(np.abs(d))
        w_plus = float(ranks[d > 0].sum())
        for alternative in ("greater", "less", "two-sided"):
            assert ev.wilcoxon_signed_rank(d, alternative=alternative).p_value == pytest.approx(
                ev._exact_p_with_ties(ranks, w_plus, alternative), rel=1e-12)


def test_wilcoxon_rejects_an_unknown_alternative():
    with pytest.raises(ValueError, match="alternative must be"):
        ev.wilcoxon_signed_rank([1, 2], alternative="bigger")
