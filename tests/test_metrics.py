"""Every metric against an independent computation: torchmetrics for ECE,
hand-computed small cases for the rest."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fairkd_utils import metrics as M


def test_ece_matches_torchmetrics_multiclass_calibration_error():
    from torchmetrics.classification import MulticlassCalibrationError

    gen = torch.Generator().manual_seed(0)
    for n_classes in (2, 3, 5):
        logits = 3 * torch.randn(500, n_classes, generator=gen)
        probs = logits.softmax(1)
        # confidences exactly on bin edges and at 1.0 exercise the binning rule
        probs[0] = torch.tensor([1.0] + [0.0] * (n_classes - 1))
        edge = 10 / 15
        probs[1] = torch.tensor([edge, 1 - edge] + [0.0] * (n_classes - 2))
        y = torch.randint(0, n_classes, (500,), generator=gen)
        ref = MulticlassCalibrationError(num_classes=n_classes, n_bins=15, norm="l1")(probs, y)
        assert M.ece(probs, y) == pytest.approx(float(ref), abs=1e-6)


def test_ece_by_hand_two_bins():
    # bin [0.5, 1): confidences 0.6 (right), 0.8 (wrong) -> |0.5 - 0.7| = 0.2
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    y = torch.tensor([0, 0])
    assert M.ece(probs, y, n_bins=2) == pytest.approx(0.2)


def test_nll_by_hand():
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]])
    y = np.array([0, 0, 1])
    expected = -(math.log(0.9) + math.log(0.25) + math.log(0.5)) / 3
    assert M.nll(probs, y) == pytest.approx(expected)


def test_nll_rejects_logits_with_a_clear_error():
    with pytest.raises(ValueError, match="softmax"):
        M.nll(torch.tensor([[3.0, -1.0]]), torch.tensor([0]))


def test_group_accuracy_worst_gap_and_averages_by_hand():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1])
    g = 2 * y + a                      # groups 0,0,0,1,2,2,3,3
    pred = torch.tensor([0, 0, 1, 0, 0, 1, 1, 0])
    acc = M.group_accuracy(pred, y, g, n_groups=4)
    np.testing.assert_allclose(acc, [2 / 3, 1.0, 0.5, 0.5])
    assert M.worst_group_acc(acc) == pytest.approx(0.5)
    assert M.group_gap(acc) == pytest.approx(0.5)
    assert M.avg_acc(pred, y) == pytest.approx(5 / 8)
    # train proportions 70/10/5/15 %: 0.7*2/3 + 0.1*1 + 0.05*0.5 + 0.15*0.5
    counts = torch.tensor([70, 10, 5, 15])
    assert M.train_weighted_acc(acc, counts) == pytest.approx(0.7 * 2 / 3 + 0.1 + 0.025 + 0.075)


def test_group_accuracy_of_probabilities_uses_the_argmax_and_marks_empty_groups_nan():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    acc = M.group_accuracy(probs, torch.tensor([0, 0]), torch.tensor([0, 0]), n_groups=3)
    assert acc[0] == pytest.approx(0.5) and np.isnan(acc[1:]).all()
    assert M.worst_group_acc(acc) == pytest.approx(0.5)
    assert M.train_weighted_acc(acc, [10, 5, 5]) == pytest.approx(0.5)


def test_metric_rows_give_one_row_per_group_plus_all_with_the_key_columns():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    y = torch.tensor([0, 1, 1, 1])
    g = torch.tensor([0, 2, 2, 3])
    names = ["g0", "g1", "g2", "g3"]
    rows = M.metric_rows(probs, y, g, names, dataset="synthetic", seed=0, model="student",
                         split="test")
    assert [r["group"] for r in rows] == [0, 1, 2, 3, "all"]
    assert all(r["dataset"] == "synthetic" and r["split"] == "test" for r in rows)
    by = {r["group"]: r for r in rows}
    assert by[1]["n"] == 0 and math.isnan(by[1]["acc"])
    assert by[2]["n"] == 2 and by[2]["acc"] == pytest.approx(0.5)
    assert by[2]["nll"] == pytest.approx(-(math.log(0.4) + math.log(0.8)) / 2)
    assert by["all"]["n"] == 4 and by["all"]["acc"] == pytest.approx(0.5)
    assert by["all"]["ece"] == pytest.approx(M.ece(probs, y))
    assert set(rows[0]) >= {"group_name", "n", "acc", "ece", "nll"}


def test_summarize_names_the_study_metrics():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    out = M.summarize(probs, torch.tensor([0, 0]), torch.tensor([0, 1]), 2, [3, 1])
    assert set(M.SUMMARY_METRICS) <= set(out)
    assert out["worst_group_acc"] == 0.0 and out["avg_acc"] == 0.5
    assert out["train_weighted_acc"] == pytest.approx(0.75)
    assert out["acc_g0"] == 1.0


# --------------------------------------------------------------------------- agreement of two weightings
def _kendall_tau_b_by_hand(a, b):
    """Tau-b from its definition: (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b))."""
    conc = disc = ties_a = ties_b = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            ties_a += da == 0
            ties_b += db == 0
            if da and db:
                conc += da == db
                disc += da != db
    n0 = n * (n - 1) / 2
    return (conc - disc) / math.sqrt((n0 - ties_a) * (n0 - ties_b))


def test_within_wrong_rank_corr_sees_a_reversal_the_all_instances_spearman_hides():
    from scipy.stats import spearmanr
    # 190 right instances at weight 1 in both; 10 wrong ones upweighted in reverse order
    right = np.ones(190)
    w_ref = np.concatenate([right, np.arange(2.0, 12.0)])
    w_other = np.concatenate([right, np.arange(11.0, 1.0, -1)])
    wrong = np.r_[np.zeros(190, bool), np.ones(10, bool)]
    assert spearmanr(w_ref, w_other).statistic > 0.9
    r = M.within_wrong_rank_corr(w_ref, w_other, wrong)
    assert r["spearman"] == pytest.approx(-1.0) and r["kendall"] == pytest.approx(-1.0)


def test_within_wrong_rank_corr_matches_scipy_and_kendall_tau_b_by_hand_with_ties():
    from scipy.stats import kendalltau, spearmanr
    rng = np.random.default_rng(0)
    w_ref = np.round(rng.exponential(size=60), 1)           # rounded: ties
    w_other = np.round(w_ref + rng.normal(scale=0.5, size=60), 1)
    wrong = rng.random(60) < 0.5
    r = M.within_wrong_rank_corr(torch.tensor(w_ref), w_other, torch.tensor(wrong))
    assert r["spearman"] == pytest.approx(spearmanr(w_ref[wrong], w_other[wrong]).statistic)
    assert r["kendall"] == pytest.approx(kendalltau(w_ref[wrong], w_other[wrong]).statistic)
    assert r["kendall"] == pytest.approx(_kendall_tau_b_by_hand(w_ref[wrong], w_other[wrong]))


def test_within_wrong_rank_corr_is_nan_for_fewer_than_two_or_constant_and_checks_lengths():
    w = np.array([1.0, 2.0, 3.0])
    for wrong in ([True, False, False], [False, False, False]):
        assert all(math.isnan(v) for v in M.within_wrong_rank_corr(w, w, wrong).values())
    assert math.isnan(M.within_wrong_rank_corr(w, np.ones(3), [True] * 3)["spearman"])
    with pytest.raises(ValueError, match="one entry per instance"):
        M.within_wrong_rank_corr(w, w[:2], [True] * 3)


def test_topk_overlap_by_hand_with_ties_broken_by_index():
    w_ref = np.array([5.0, 1.0, 4.0, 4.0, 0.0])       # top-2: 0, then 2 (ties 2/3 -> lower index)
    w_other = np.array([0.0, 9.0, 3.0, 3.0, 1.0])     # top-2: 1, then 2
    assert M.topk_overlap(w_ref, w_other, 2) == pytest.approx(0.5)
    assert M.topk_overlap(w_ref, w_other, 1) == 0.0
    assert M.topk_overlap(w_ref, w_other, 5) == 1.0
    assert M.topk_overlap(np.ones(4), np.ones(4), 2) == 1.0     # all tied: the same first two
    with pytest.raises(ValueError, match="k <= 5"):
        M.topk_overlap(w_ref, w_other, 6)


def test_group_weight_share_by_hand():
    w = torch.tensor([1.0, 3.0, 2.0, 2.0])
    share = M.group_weight_share(w, torch.tensor([0, 0, 2, 2]), 4)
    np.testing.assert_allclose(share, [0.5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"group in \[0, 2\)"):
        M.group_weight_share(w, [0, 1, 2, 0], 2)


def test_verdicts_state_each_contrast_in_words_with_its_interval():
    """The ranking (references left out, long names aligned) and the paired contrasts
    against dedier_both, including Laplace-KD at DeDiER's beta when its table is given."""
    def per_seed(values):
        return pd.DataFrame([{"method": m, "config_id": f"{m}-c", "seed": s, **{k: v[s] for k in M.SUMMARY_METRICS}}
                             for m, v in values.items() for s in range(3)])

    base = {"dedier_both": [0.50, 0.60, 0.70], "laplace_kd": [0.60, 0.70, 0.80],
            "group_balanced": [0.9, 0.9, 0.9], "laplace_kd_subset": [0.40, 0.50, 0.61]}
    summary = M.summary_table(per_seed(base))
    text = M.verdicts(summary, references=("group_balanced",))
    lines = text.splitlines()
    assert lines[1].split() == ["laplace_kd", "0.700", "±", "0.100"]
    assert [ln.index("0.") for ln in lines[1:4]] == [lines[1].index("0.")] * 3   # one column
    assert "group_balanced" not in "\n".join(lines[1:4])
    # +0.1 on every seed: the interval is a point, clear of zero
    assert "Laplace-KD - DeDiER (both terms), worst_group_acc, paired over 3 seeds: +0.100" in text
    assert text.endswith("laplace_kd is better than dedier_both here.")
    assert "at DeDiER's beta" not in text
    matched = M.summary_table(per_seed({"dedier_both": base["dedier_both"], "laplace_kd": [0.49, 0.62, 0.70]}),
                              baselines=("dedier_both",))
    text = M.verdicts(summary, references=("group_balanced",), matched=matched)
    last = text.splitlines()[-1]
    assert last.startswith("Laplace-KD at DeDiER's beta - DeDiER (both terms), worst_group_acc, paired over 3 seeds:")
    assert last.endswith("laplace_kd is not distinguishable from dedier_both here.")
