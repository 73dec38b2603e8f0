"""AUC, Wilcoxon signed-rank and the table plumbing, on toy cases with known answers."""
import math

import numpy as np
import pytest
import torch

from modan_ext import evaluation as ev
from modan_ext.readers import DownstreamTask


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


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(ev.average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


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
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n in (4, 9, 15):
        x, y = rng.normal(0.2, 1, n), rng.normal(0, 1, n)
        for alternative in ("greater", "less", "two-sided"):
            ours = ev.wilcoxon_signed_rank(x, y, alternative).p_value
            theirs = scipy_stats.wilcoxon(x, y, alternative=alternative, method="exact").pvalue
            assert ours == pytest.approx(theirs, rel=1e-9)


def _rows(method_auc, baseline_auc):
    rows = []
    for model, base in (("modan", method_auc), ("scratch", baseline_auc)):
        for repeat in range(2):
            for fold in range(3):
                rows.append({"task": "acl", "protocol": "finetune", "model": model, "repeat": repeat,
                             "fold": fold, "auc": base + 0.01 * fold + 0.001 * repeat})
    return rows


def test_summary_table_and_files(tmp_path):
    rows = _rows(0.8, 0.7)
    summary = ev.summarise(rows, method="modan", unit="fold")
    cell = {s["model"]: s for s in summary}
    assert cell["modan"]["mean_auc"] == pytest.approx(0.8105, abs=1e-4)
    assert cell["scratch"]["p_method_greater"] == pytest.approx(1 / 64, abs=1e-6)  # 6 positive pairs
    by_repeat = {s["model"]: s for s in ev.summarise(rows, "modan", unit="repeat")}
    assert by_repeat["scratch"]["p_method_greater"] == pytest.approx(1 / 4, abs=1e-6)
    written = ev.write_results(rows, tmp_path, "modan", ["modan", "scratch"], log=lambda *_: None)
    assert "| modan | **0.810 ± " in written["table"] and "modan > scratch" in written["table"]
    for name in ("fold_aucs.csv", "summary.csv", "table.md"):
        assert (tmp_path / name).is_file()


def test_linear_probe_on_a_separable_toy_task_reaches_auc_one():
    rng = np.random.default_rng(0)
    targets = np.array([0, 1] * 20)
    features = torch.from_numpy(rng.normal(size=(40, 8)) + 3 * targets[:, None]).float()
    task = DownstreamTask("toy", torch.zeros(40, 1, 4, 4, dtype=torch.uint8), targets, [])
    fold = (np.arange(24), np.arange(24, 32), np.arange(32, 40))
    cfg = ev.ProtocolConfig(probe_epochs=60, probe_eval_every=10, probe_lr=1e-2)
    result = ev.linear_probe_fold(features, task, fold, cfg, seed=0)
    assert result["auc"] == 1.0 and result["best_epoch"] in range(10, 61, 10)
