"""The study's tables: AUROC, per-seed metrics, intervals and paired differences,
each against a computation written out by hand."""

import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from fairkd_utils import experiment, plots


def test_auroc_equals_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(scores[labels], scores[~labels])]
    assert experiment.auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert experiment.auroc(-scores, labels) == pytest.approx(1 - np.mean(pairs))  # no flipping
    assert math.isnan(experiment.auroc(scores, np.zeros(60, bool)))


def test_minority_groups_are_the_small_training_groups():
    assert experiment.minority_groups([3498, 184, 56, 1057]) == [1, 2]
    assert experiment.minority_groups([71629, 66874, 22880, 1387]) == [3]


def _metrics_table():
    rows = []
    accs = {("kd", 0): [0.9, 0.5, 0.4, 0.8], ("kd", 1): [0.9, 0.6, 0.5, 0.8],
            ("dedier", 0): [0.8, 0.7, 0.6, 0.8], ("dedier", 1): [0.85, 0.6, 0.7, 0.8]}
    for (method, seed), acc in accs.items():
        for g, a in enumerate(acc):
            rows.append(dict(model="student", split="test", predictive="map", method=method,
                             config_id="c", seed=seed, group=g, group_name=f"g{g}", acc=a, ece=0.1))
        rows.append(dict(model="student", split="test", predictive="map", method=method,
                         config_id="c", seed=seed, group="all", group_name="all",
                         acc=float(np.mean(acc)), ece=0.05))
    groups = pd.DataFrame({"split": "train", "group": range(4), "group_name": [f"g{g}" for g in range(4)],
                           "n": [70, 10, 5, 15]})
    return pd.DataFrame(rows), groups


def test_per_seed_metrics_by_hand():
    metrics, groups = _metrics_table()
    ps = experiment.per_seed_metrics(metrics, groups).set_index(["method", "seed"])
    row = ps.loc[("kd", 0)]
    assert row.worst_group_acc == 0.4
    assert row.group_gap == pytest.approx(0.5)
    assert row.train_weighted_acc == pytest.approx((70 * 0.9 + 10 * 0.5 + 5 * 0.4 + 15 * 0.8) / 100)
    assert row.avg_acc == pytest.approx(np.mean([0.9, 0.5, 0.4, 0.8]))
    assert row.ece == 0.05


def test_summary_interval_is_student_t_and_differences_are_paired():
    metrics, groups = _metrics_table()
    ps = experiment.per_seed_metrics(metrics, groups)
    s = experiment.summary_table(ps).set_index(["method", "metric"])
    wga = s.loc[("dedier", "worst_group_acc")]
    assert wga["mean"] == pytest.approx(0.6) and wga["std"] == pytest.approx(0.0)
    kd = s.loc[("kd", "worst_group_acc")]
    sd = np.std([0.4, 0.5], ddof=1)
    half = 12.706204736 * sd / math.sqrt(2)  # t_{0.975, 1}
    assert (kd.ci95_lo, kd.ci95_hi) == pytest.approx((0.45 - half, 0.45 + half))
    # paired: dedier - kd per seed = (0.2, 0.1)
    assert wga["diff_vs_kd_mean"] == pytest.approx(0.15)
    assert wga["diff_vs_kd_std"] == pytest.approx(np.std([0.2, 0.1], ddof=1))
    d = experiment.paired_differences(ps)
    assert sorted(d["diff"].round(6)) == [0.1, 0.2]


def test_savefig_is_byte_stable(tmp_path):
    def draw():
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 2], label="x")
        ax.legend()
        return fig
    plots.savefig(draw(), tmp_path / "a")
    first = {ext: (tmp_path / f"a.{ext}").read_bytes() for ext in ("png", "pdf")}
    plots.savefig(draw(), tmp_path / "a")
    assert {ext: (tmp_path / f"a.{ext}").read_bytes() for ext in ("png", "pdf")} == first


def test_config_ids_differ_between_methods_and_never_read_as_numbers(tmp_path):
    from fairkd_utils import losses, records

    ids = {losses.default_config(m).config_id for m in losses.DEFAULT_HPARAMS}
    assert len(ids) == len(losses.DEFAULT_HPARAMS)
    assert all(i[0].isalpha() for i in ids)
    records.write_record(tmp_path, "metrics", "x", [{"config_id": "0123", "id": "1e5", "acc": 1.0}])
    table = records.assemble(tmp_path, "metrics")
    assert table.config_id.tolist() == ["0123"] and table.id.tolist() == ["1e5"]


def test_summary_refuses_an_ambiguous_baseline():
    metrics, groups = _metrics_table()
    ps = experiment.per_seed_metrics(metrics, groups)
    ps = pd.concat([ps, ps[ps.method == "kd"].assign(config_id="other")])
    with pytest.raises(ValueError, match="kd has several configurations"):
        experiment.summary_table(ps)


def test_a_bad_hyperparameter_file_is_named(tmp_path, monkeypatch):
    run = experiment.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=experiment.get_profile("smoke"),
                         dataset="synthetic", data_root=None, seeds=[0], device="cpu")
    bad = tmp_path / "hparams.json"
    bad.write_text('{"synthetic-smoke": {"dedier": {"betta": 2}}}')
    monkeypatch.setattr(experiment, "HPARAMS_FILE", bad)
    with pytest.raises(ValueError, match="hparams.json: bad entry for 'dedier'"):
        experiment.method_config(run, "dedier")
    bad.write_text('{"synthetic-smoke": {"dedeir": {"beta": 2}}}')
    with pytest.raises(ValueError, match="unknown methods \\['dedeir'\\]"):
        experiment.method_config(run, "dedier")
    bad.write_text('{"synthetic-smoke": {"dedier": {"beta": 2.5}}}')
    assert experiment.method_config(run, "dedier").beta == 2.5
    assert experiment.method_config(run, "dedier").warmup_epochs == run.profile.warmup_epochs
