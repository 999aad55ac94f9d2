"""The study's tables: AUROC, per-seed metrics, intervals and paired differences,
each against a computation written out by hand."""

import itertools
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import calibration  # noqa: E402  bench/calibration.py: the miniatures' calibration
from fairkd_utils import metrics as M
from fairkd_utils import build, hparams, metrics, palette, plots, profiles, rundir, students, sweep, synthetic_images


def test_auroc_equals_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(scores[labels], scores[~labels])]
    assert M.auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert M.auroc(-scores, labels) == pytest.approx(1 - np.mean(pairs))  # no flipping
    assert math.isnan(M.auroc(scores, np.zeros(60, bool)))


def test_minority_groups_are_the_shortcut_conflicting_training_groups():
    assert metrics.minority_groups([3498, 184, 56, 1057], 2) == [1, 2]  # Waterbirds
    assert metrics.minority_groups([71629, 66874, 22880, 1387], 2) == [3]  # CelebA: blond men
    # MultiNLI (group_DRO's train counts, g = 2y + a, contradiction/entailment/neutral x
    # negation): entailment and neutral with negation; contradiction with negation is
    # small but agrees with the shortcut.
    multinli = [57498, 11158, 67376, 1521, 66630, 1992]
    assert metrics.minority_groups(multinli, 2) == [3, 5]
    # dense check of the rule P(y | a) < P(y) / 2 on the same counts
    t = np.array(multinli, float).reshape(3, 2)
    rule = (t / t.sum(0)) < 0.5 * (t.sum(1, keepdims=True) / t.sum())
    assert list(np.flatnonzero(rule.ravel())) == [3, 5]
    # three attribute values (a folder dataset): read as 2 labels x 3 attributes, not as
    # 3 labels x 2 attributes
    three = [500, 400, 30, 20, 400, 500]
    assert metrics.minority_groups(three, 3) == [2, 3]
    assert metrics.minority_groups(three, 2) != [2, 3]


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
    ps = M.per_seed_metrics(metrics, groups).set_index(["method", "seed"])
    row = ps.loc[("kd", 0)]
    assert row.worst_group_acc == 0.4
    assert row.group_gap == pytest.approx(0.5)
    assert row.train_weighted_acc == pytest.approx((70 * 0.9 + 10 * 0.5 + 5 * 0.4 + 15 * 0.8) / 100)
    assert row.avg_acc == pytest.approx(np.mean([0.9, 0.5, 0.4, 0.8]))
    assert row.ece == 0.05


def test_summary_interval_is_student_t_and_differences_are_paired():
    metrics, groups = _metrics_table()
    ps = M.per_seed_metrics(metrics, groups)
    s = M.summary_table(ps).set_index(["method", "metric"])
    wga = s.loc[("dedier", "worst_group_acc")]
    assert wga["mean"] == pytest.approx(0.6) and wga["std"] == pytest.approx(0.0)
    kd = s.loc[("kd", "worst_group_acc")]
    sd = np.std([0.4, 0.5], ddof=1)
    half = 12.706204736 * sd / math.sqrt(2)  # t_{0.975, 1}
    assert (kd.ci95_lo, kd.ci95_hi) == pytest.approx((0.45 - half, 0.45 + half))
    # paired: dedier - kd per seed = (0.2, 0.1)
    assert wga["diff_vs_kd_mean"] == pytest.approx(0.15)
    assert wga["diff_vs_kd_std"] == pytest.approx(np.std([0.2, 0.1], ddof=1))
    d = M.paired_differences(ps)
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
    records.write_record(tmp_path, "predictions", "x", [{
        "id": "1e5", "split": "test", "group": 0, "y": 0, "seed": 0, "model": "student", "method": "kd",
        "config_id": "0123", "predictive": "map", "prob": 1.0, "margin": 1.0, "correct": True,
        "weight": None, "variance": None}])
    table = records.assemble(tmp_path, "predictions")
    assert table.config_id.tolist() == ["0123"] and table.id.tolist() == ["1e5"]


def test_summary_refuses_an_ambiguous_baseline():
    metrics, groups = _metrics_table()
    ps = M.per_seed_metrics(metrics, groups)
    ps = pd.concat([ps, ps[ps.method == "kd"].assign(config_id="other")])
    with pytest.raises(ValueError, match="kd has several configurations"):
        M.summary_table(ps)


def test_a_bad_hyperparameter_file_is_named(tmp_path, monkeypatch):
    run = rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profiles.get_profile("smoke"),
                         dataset="synthetic", data_root=None, seeds=[0], device="cpu")
    bad = tmp_path / "hparams.json"
    bad.write_text('{"synthetic-smoke": {"dedier": {"betta": 2}}}')
    monkeypatch.setattr(hparams, "HPARAMS_FILE", bad)
    with pytest.raises(ValueError, match="hparams.json.*: bad entry for 'dedier'"):
        hparams.method_config(run, "dedier")
    bad.write_text('{"synthetic-smoke": {"dedeir": {"beta": 2}}}')
    with pytest.raises(ValueError, match="unknown methods \\['dedeir'\\]"):
        hparams.method_config(run, "dedier")
    bad.write_text('{"synthetic-smoke": {"kd": {"lam": 0.5, "T": 2}, "dedier": {"beta": 2.5}}}')
    assert hparams.method_config(run, "dedier").beta == 2.5
    assert hparams.method_config(run, "dedier").warmup_epochs == run.profile.warmup_epochs



def test_summary_carries_paired_differences_against_kd_and_dedier_both():
    rows = []
    for seed, (kd, both, lap) in enumerate([(0.5, 0.6, 0.65), (0.4, 0.55, 0.5), (0.45, 0.5, 0.6)]):
        for method, v in (("kd", kd), ("dedier_both", both), ("laplace_kd", lap)):
            rows.append({"method": method, "config_id": "c" + method, "seed": seed, "worst_group_acc": v,
                         "avg_acc": 0.8, "train_weighted_acc": 0.9, "group_gap": 0.3, "ece": 0.1})
    s = M.summary_table(pd.DataFrame(rows))
    lap = s[(s.method == "laplace_kd") & (s.metric == "worst_group_acc")].iloc[0]
    diffs = np.array([0.65 - 0.6, 0.5 - 0.55, 0.6 - 0.5])
    assert lap.diff_vs_dedier_both_mean == pytest.approx(diffs.mean())
    assert lap.diff_vs_kd_mean == pytest.approx(np.mean([0.15, 0.1, 0.15]))
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)   # t(0.975, 2)
    assert lap.diff_vs_dedier_both_ci95_lo == pytest.approx(diffs.mean() - half)
    assert lap.paired_seeds_vs_dedier_both == 3
    both = s[(s.method == "dedier_both") & (s.metric == "worst_group_acc")].iloc[0]
    assert np.isnan(both.get("diff_vs_dedier_both_mean", np.nan))


def test_calibration_conditions_from_hand_made_metrics():
    from calibration import calibration_conditions

    per_seed = pd.DataFrame({"seed": [0, 1], "teacher_avg_acc": [0.92, 0.92], "teacher_wga": [0.8, 0.8],
                             "erm_wga": [0.1, 0.7], "exit_minority_wrong": [0.9, 0.4],
                             "exit_minority_margin_wrong": [0.7, 0.7], "gb_wga": [0.5, 0.8],
                             "kd_wga": [0.7, 0.78]})
    c = calibration_conditions(per_seed).set_index(["seed", "condition"])
    assert c.loc[(0, "b_erm_gap"), "value"] == pytest.approx(-0.7) and c.loc[(0, "b_erm_gap"), "passed"]
    assert not c.loc[(1, "b_erm_gap"), "passed"]                     # 0.7 > 0.8 - 0.15
    assert not c.loc[(1, "c_exit_wrong"), "passed"] and c.loc[(0, "c_exit_wrong"), "passed"]
    assert c.loc[(0, "d_gb_gain"), "passed"] and not c.loc[(1, "d_gb_gain"), "passed"]
    assert c.loc[(0, "e_kd_room"), "passed"] and not c.loc[(1, "e_kd_room"), "passed"]
    assert c.loc[("mean", "b_erm_gap"), "value"] == pytest.approx(0.4 - 0.8)
    assert c.loc[("mean", "a_teacher_wga"), "passed"]
    with pytest.raises(ValueError, match="kd_wga"):
        calibration_conditions(per_seed.drop(columns="kd_wga"))


def test_shortcut_margin_ceiling_by_hand():
    from calibration import shortcut_margin_ceiling

    # Waterbirds: landbird on water (184) reads water, P(water bird | water) = 1057 / 1241;
    # waterbird on land (56) reads land, P(land bird | land) = 3498 / 3554.
    water = 1057 / 1241 - 184 / 1241
    land = 3498 / 3554 - 56 / 3554
    assert shortcut_margin_ceiling((3498, 184, 56, 1057), 2, [1, 2]) == pytest.approx(
        (184 * water + 56 * land) / 240)
    # MultiNLI: both minority groups carry a negation; top two given a negation are
    # contradiction (11158) and neutral (1992) out of 14671.
    assert shortcut_margin_ceiling((57498, 11158, 67376, 1521, 66630, 1992), 2, [3, 5]) == \
        pytest.approx((11158 - 1992) / 14671)
    # three attribute values: only the minority group's own value counts
    counts = (6, 1, 1, 1, 6, 1)                     # y in {0, 1}, a in {0, 1, 2}
    assert shortcut_margin_ceiling(counts, 3, [1]) == pytest.approx((6 - 1) / 7)
    with pytest.raises(ValueError, match="minority"):
        shortcut_margin_ceiling(counts, 3, [])
    with pytest.raises(ValueError, match="minority"):            # an empty group is left out
        shortcut_margin_ceiling((5, 0, 3, 4), 2, [1])
    assert shortcut_margin_ceiling((5, 0, 3, 4), 2, [1, 2]) == pytest.approx((5 - 3) / 8)
    with pytest.raises(ValueError, match="two labels"):           # one label row only
        shortcut_margin_ceiling((5, 3), 2, [1])


def test_calibration_targets_scale_the_image_ones_by_multinlis_numbers():
    from fairkd_utils import multinli, synthetic_text

    assert calibration.calibration_targets(synthetic_images.WATERBIRDS_COUNTS["train"], 2, "synthetic") == \
        {"margin": 0.50, "gain": 0.20}
    t = calibration.calibration_targets(multinli.MULTINLI_COUNTS["train"], 2, "multinli")
    wb = (184 * (1057 - 184) / 1241 + 56 * (3498 - 56) / 3554) / 240
    assert t["margin"] == round(0.50 * (11158 - 1992) / 14671 / wb, 2) == 0.41
    assert t["gain"] == round(0.20 * (0.777 - 0.679) / (0.914 - 0.726), 2) == 0.10
    # the synthetic_text counts (MultiNLI's / 20) give the same targets to 0.01
    counts = synthetic_text.synthetic_text_counts("train", 1.0)
    assert calibration.calibration_targets(counts, 2, "synthetic_text")["margin"] == pytest.approx(t["margin"], abs=0.01)


def test_calibration_conditions_take_the_texts_targets():
    from calibration import calibration_conditions

    per_seed = pd.DataFrame({"seed": [0], "teacher_avg_acc": [0.92], "teacher_wga": [0.8],
                             "erm_wga": [0.1], "exit_minority_wrong": [0.9],
                             "exit_minority_margin_wrong": [0.45], "gb_wga": [0.25], "kd_wga": [0.5]})
    image = calibration_conditions(per_seed).set_index(["seed", "condition"])
    textual = calibration_conditions(per_seed, {"margin": 0.41, "gain": 0.10}).set_index(["seed", "condition"])
    for c in ("c_exit_margin", "d_gb_gain"):
        assert not image.loc[(0, c), "passed"] and textual.loc[(0, c), "passed"]
    assert textual.loc[(0, "c_exit_margin"), "target"] == ">= 0.41"
    assert image.loc[(0, "d_gb_gain"), "target"] == ">= 0.20"


def test_hyperparameters_share_kds_lam_and_t_and_refuse_them_elsewhere(tmp_path):
    run = rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profiles.get_profile("smoke"),
                         dataset="synthetic", data_root=None, seeds=[0], device="cpu",
                         hparams_file=str(tmp_path / "h.json"))
    (tmp_path / "h.json").write_text('{"synthetic-smoke": {"kd": {"lam": 0.9, "T": 4}, '
                                     '"dedier": {"beta": 3}, "dedier_both": {"beta": 2}, '
                                     '"laplace_kd": {"beta": 1, "score": "margin"}}}')
    cfgs = {m: hparams.method_config(run, m) for m in profiles.get_profile("smoke").methods}
    for m, c in cfgs.items():
        assert (c.lam, c.T) == ((0.9, 4.0) if m not in ("erm", "group_balanced_erm") else (0.0, 1.0)), m
    assert cfgs["shuffled"].beta == cfgs["dedier_both"].beta == 2 and cfgs["laplace_kd"].beta == 1
    (tmp_path / "h.json").write_text('{"synthetic-smoke": {"dedier": {"lam": 0.5}}}')
    with pytest.raises(ValueError, match="lam and T are kd's"):
        hparams.method_config(run, "dedier")
    (tmp_path / "h.json").write_text('{"synthetic-default": {}}')
    with pytest.raises(ValueError, match="no entry for 'synthetic-smoke'"):
        hparams.method_config(run, "kd")


def test_the_sweep_chooses_kds_lam_and_t_once_and_writes_every_field(tmp_path, monkeypatch):
    """The sweep's logic with training replaced by a known validation score: lam and T
    come from kd alone, beta per method at those, averaged over seeds; the file holds
    lam, T, beta and the score, and notebook 05's configurations read it back."""
    import json
    from types import SimpleNamespace

    from fairkd_utils import train

    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic", None, [0, 1], "cpu")
    run.splits()  # built once, as the sweep reads them
    score = {}

    def fake_student(run_, cfg, seed, teacher=None, ckpt_dir=None, progress=True):
        target = {"kd": 0.6 if (cfg.lam, cfg.T) == (0.9, 2.0) else 0.4}.get(cfg.method)
        if target is None:  # the smallest beta best for dedier_both, the largest for the others
            best = sweep.SWEEP_GRID["beta"][0 if cfg.method == "dedier_both" else -1]
            target = 0.7 if cfg.beta == best else 0.5
        score[cfg.config_id] = target + (0.05 if seed == 1 else 0.0)
        return SimpleNamespace(model=cfg.config_id, reused=False)

    monkeypatch.setattr(sweep, "train_student", fake_student)
    monkeypatch.setattr(train, "predict", _predict_share(score))
    table, chosen = sweep.sweep(run, [0, 1], teacher={"train": None})
    assert chosen["kd"] == {"lam": 0.9, "T": 2.0}
    low, high = sweep.SWEEP_GRID["beta"][0], sweep.SWEEP_GRID["beta"][-1]
    assert chosen["dedier_both"]["beta"] == low and chosen["dedier"]["beta"] == high
    assert chosen["laplace_kd"] == {"beta": high, "score": "margin"}
    assert set(table.seed) == {0, 1}
    assert (table[table.method != "kd"][["lam", "T"]] == [0.9, 2.0]).all().all()
    written = json.loads((run.run_dir / "sweep" / "hparams.json").read_text())["synthetic-smoke"]
    assert {k: v for k, v in written.items() if k != "_comment"} == chosen
    run.hparams_file = str(run.run_dir / "sweep" / "hparams.json")
    for m in ("dedier", "dedier_both", "laplace_kd", "shuffled", "group_balanced"):
        c = hparams.method_config(run, m)
        assert (c.lam, c.T) == (0.9, 2.0)
    assert hparams.method_config(run, "shuffled").beta == low


def test_an_invalid_hyperparameter_file_is_named(tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text('{"synthetic-smoke": {"kd": {"lam": 0.9,}}}')
    with pytest.raises(ValueError, match=r"h\.json' is not valid JSON"):
        hparams.read_hparams(bad)
    bad.write_bytes(b'{"synthetic-smoke": "\xff"}')
    with pytest.raises(ValueError, match=r"h\.json' is not valid JSON"):
        hparams.read_hparams(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        hparams.read_hparams(tmp_path / "nowhere.json")


# ---------------------------------------------------------------- the reviewer's baselines
def test_the_method_lists_carry_the_new_methods_and_default_keeps_its_own():
    extra = {"jtt", "dfr", "dedier_final"}
    assert extra <= set(profiles.METHODS) and extra <= set(palette.METHOD_ORDER)
    assert set(palette.METHOD_COLORS) == set(profiles.METHODS)
    assert "dfr" in plots.REFERENCES and not {"jtt", "dedier_final"} & set(plots.REFERENCES)
    for name in ("smoke", "default", "paper"):
        prof = profiles.get_profile(name)
        assert prof.methods == profiles.DEFAULT_METHODS and not extra & set(prof.methods)
        assert profiles.resolve_methods(prof) == prof.methods
        assert profiles.resolve_methods(prof, "extended") == prof.methods + profiles.EXTRA_METHODS
    assert profiles.resolve_methods(profiles.get_profile("smoke"), ["dfr"]) == ("dfr", "kd")
    with pytest.raises(ValueError, match="unknown method set"):
        profiles.resolve_methods(profiles.get_profile("smoke"), "everything")
    rows = [{"method": m, "config_id": "c" + m, "seed": s, "worst_group_acc": 0.5 + 0.01 * s,
             "avg_acc": 0.8, "train_weighted_acc": 0.9, "group_gap": 0.3, "ece": 0.1}
            for m in ("dfr", "jtt", "kd", "dedier_final", "dedier_both") for s in range(3)]
    s = M.summary_table(pd.DataFrame(rows))
    assert list(dict.fromkeys(s.method)) == ["kd", "dedier_both", "dedier_final", "jtt", "dfr"]
    assert s[s.method == "jtt"].paired_seeds_vs_dedier_both.iloc[0] == 3


def test_default_methods_keep_the_config_ids_of_the_reference_run():
    """Adding methods (and fields only they read) leaves every default method's
    configuration id, and so default's tables, as the committed reference run has them."""
    from pathlib import Path

    from fairkd_utils import losses

    ref = pd.read_csv(Path(rundir.REPO_ROOT) / "results/reference/synthetic-default/summary.csv",
                      dtype={"config_id": str})
    table = hparams.read_hparams(hparams.HPARAMS_FILE)["synthetic-default"]
    for method, cid in ref[["method", "config_id"]].drop_duplicates().values:
        cfg = losses.default_config(method, **hparams.hparams_for(table, method), warmup_epochs=3)
        assert cfg.config_id == cid, method


def test_jtt_and_dfr_take_kds_lam_and_t_and_their_own_fields(tmp_path):
    run = rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profiles.get_profile("smoke"),
                     dataset="synthetic", data_root=None, seeds=[0], device="cpu",
                     hparams_file=str(tmp_path / "h.json"))
    (tmp_path / "h.json").write_text('{"synthetic-smoke": {"kd": {"lam": 0.9, "T": 4}, '
                                     '"jtt": {"jtt_epochs": 1, "jtt_upweight": 50}, '
                                     '"dedier_final": {"beta": 4}, "dfr": {"dfr_penalty": "l2"}}}')
    jtt, dfr, final = (hparams.method_config(run, m) for m in ("jtt", "dfr", "dedier_final"))
    assert (jtt.lam, jtt.T, jtt.jtt_epochs, jtt.jtt_upweight) == (0.9, 4.0, 1, 50.0)
    assert (dfr.lam, dfr.T, dfr.dfr_penalty) == (0.9, 4.0, "l2")
    assert (final.lam, final.T, final.beta) == (0.9, 4.0, 4)
    base = students.base_config(run, dfr)       # DFR retrains exactly kd's student
    assert base == hparams.method_config(run, "kd")


def _tiny_run(tmp_path, **changes):
    import torch

    from fairkd_utils.data import GroupDataset

    names = ["y0 a0", "y0 a1", "y1 a0", "y1 a1"]

    def split(name, n, seed, size=16):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        a = (torch.rand(n, generator=gen) < 0.3).long()
        x = 0.8 * torch.randn(n, 3, size, size, generator=gen)
        x[:, 0] += (2 * y - 1).float()[:, None, None] * 0.4
        x[:, 1] += 0.8 * (2 * a - 1).float()[:, None, None]
        return GroupDataset("tiny", name, y, a, n_classes=2, n_attrs=2, group_names=names,
                            ids=[f"{name}{i}" for i in range(n)], x=x, image_size=size)

    profile = profiles.get_profile("smoke").replace(
        student_widths=(8, 16), student_blocks=(1, 1), image_size=16, student_epochs=3,
        warmup_epochs=2, batch_size=64, **changes)
    splits = {"train": split("train", 192, 0), "val": split("val", 64, 1), "test": split("test", 64, 2)}
    return rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profile, dataset="synthetic",
                      data_root=None, seeds=[0], device="cpu", _splits=splits)


def test_jtts_error_set_is_the_erm_trajectorys_training_mistakes_cached_and_shared(tmp_path):
    """The identification model is the ERM student after jtt_epochs epochs of its own
    schedule: its training mistakes (eval mode) are the error set; its state is cached
    as a warm-up checkpoint, and at jtt_epochs == warmup_epochs it is the warm-up the
    ERM student itself branches from. jtt's training weights are lambda_up there."""
    import torch

    from fairkd_utils import losses, models, train

    run = _tiny_run(tmp_path)
    ds = run.splits()["train"]
    cfg = losses.default_config("jtt", lam=0.5, T=2.0, jtt_epochs=1, jtt_upweight=9.0, warmup_epochs=2)
    errors = students.jtt_error_set(run, cfg, seed=0)
    # by hand: ERM (lam = 0 cross-entropy) for one epoch of the 3-epoch schedule
    erm = losses.default_config("erm", warmup_epochs=2)
    model = models.build_student(run.profile, 2, seed=0)
    state = train.train_warmup(model, run.splits(), build.train_config(run, "student", 0, progress=False),
                               losses.make_objective(erm), 1)
    model.load_state_dict(state["model"])
    mistakes = train.predict(model, ds).logits.argmax(1) != ds.y
    assert errors.dtype == torch.bool and torch.equal(errors, mistakes)
    assert 0 < int(errors.sum()) < len(errors)
    files = sorted(run.path("checkpoints").glob("warmup-seed0-*.pt"))
    assert len(files) == 1
    assert torch.equal(students.jtt_error_set(run, cfg, seed=0), errors)       # reused, not retrained
    assert sorted(run.path("checkpoints").glob("warmup-seed0-*.pt")) == files
    # the ERM student's shared warm-up is jtt's identification model at warmup_epochs
    students.train_student(run, hparams.method_config(run, "erm"), 0, progress=False)
    shared = set(run.path("checkpoints").glob("warmup-seed0-*.pt")) - set(files)
    assert len(shared) == 1
    students.jtt_error_set(run, cfg.replace(jtt_epochs=2), seed=0)
    assert set(run.path("checkpoints").glob("warmup-seed0-*.pt")) == set(files) | shared
    w = students.final_train_weights(run, None, cfg, seed=0)
    torch.testing.assert_close(w, torch.where(errors, 9.0, 1.0))
    with pytest.raises(ValueError, match="jtt_epochs=3"):
        students.jtt_error_set(run, cfg.replace(jtt_epochs=3), seed=0)


def test_dedier_finals_training_weights_read_the_final_head(tmp_path):
    import torch

    from fairkd_utils import losses, models, train

    run = _tiny_run(tmp_path)
    ds = run.splits()["train"]
    model = models.build_student(run.profile, 2, seed=0)
    p = train.predict(model, ds)
    cfg = losses.default_config("dedier_final", beta=2.0)
    w = students.final_train_weights(run, None, cfg, pred=p)
    torch.testing.assert_close(w, losses.dedier_weight(p.logits.double(), ds.y, 2.0))


def test_the_sweep_at_kds_given_lam_and_t_chooses_jtts_epochs_and_upweight(tmp_path, monkeypatch):
    """With kd's lam and T given, kd is not swept; jtt's identification epochs x lambda_up
    and dedier_final's beta are chosen on validation at those lam and T, and written."""
    import json
    from types import SimpleNamespace

    from fairkd_utils import train

    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic", None, [0, 1], "cpu")
    score = {}
    trained = []

    def fake_student(run_, cfg, seed, teacher=None, ckpt_dir=None, progress=True):
        trained.append(cfg)
        if cfg.method == "jtt":
            target = 0.8 if (cfg.jtt_epochs, cfg.jtt_upweight) == (2, 100.0) else 0.5
        else:
            target = 0.7 if cfg.beta == 1.0 else 0.4
        score[cfg.config_id] = target + (0.05 if seed == 1 else 0.0)
        return SimpleNamespace(model=cfg.config_id, reused=False)

    monkeypatch.setattr(sweep, "train_student", fake_student)
    monkeypatch.setattr(train, "predict", _predict_share(score))
    table, chosen = sweep.sweep(run, [0, 1], teacher={"train": None}, methods=["jtt", "dedier_final"],
                                lam_T={"lam": 0.95, "T": 4})
    assert chosen == {"kd": {"lam": 0.95, "T": 4.0}, "jtt": {"jtt_epochs": 2, "jtt_upweight": 100.0},
                      "dedier_final": {"beta": 1.0}}
    assert not any(c.method == "kd" for c in trained) and all((c.lam, c.T) == (0.95, 4.0) for c in trained)
    grid = sweep.SWEEP_GRID
    assert len(table[table.method == "jtt"]) == 2 * len(grid["jtt_epochs"]) * len(grid["jtt_upweight"])
    assert {"jtt_epochs", "jtt_upweight"} <= set(table.columns)
    written = json.loads((run.run_dir / "sweep" / "hparams.json").read_text())["synthetic-smoke"]
    assert {k: v for k, v in written.items() if k != "_comment"} == chosen
    assert "given" in written["_comment"] and "jtt_upweight" in written["_comment"]
    run.hparams_file = str(run.run_dir / "sweep" / "hparams.json")
    jtt = hparams.method_config(run, "jtt")
    assert (jtt.lam, jtt.T, jtt.jtt_epochs, jtt.jtt_upweight) == (0.95, 4.0, 2, 100.0)


def _predict_share(score):
    """A stand-in for ``train.predict``: the "model" is a config id, right on the share
    ``score[model]`` of every group, so worst-group accuracy is about that share."""
    import torch

    from fairkd_utils import train

    def fake_predict(model, ds, device="cpu"):
        n, k = len(ds), score[model]
        right = torch.zeros(n, dtype=torch.bool)
        for g in range(ds.n_groups):
            idx = torch.nonzero(ds.g == g).flatten()
            right[idx[: int(round(k * len(idx)))]] = True
        pred = torch.where(right, ds.y, 1 - ds.y)
        logits = torch.nn.functional.one_hot(pred, 2).float() * 4
        return train.Predictions(logits, None, None, ds.y, ds.a, ds.g)
    return fake_predict


def test_notebook_05_reads_the_hyper_parameter_file_once_and_records_it(tmp_path, monkeypatch):
    import json

    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke")
    calls, real = [], hparams.read_hparams
    monkeypatch.setattr(hparams, "read_hparams", lambda path: calls.append(path) or real(path))
    configs, source = hparams.method_configs(run, run.profile.methods)
    assert len(calls) == 1 and list(configs) == list(run.profile.methods)
    used = json.loads((run.run_dir / "hparams_used.json").read_text())
    assert used["source"] == source and used["configs"] == {m: c.to_dict() for m, c in configs.items()}


def test_teacher_stages_each_keep_their_own_model(tmp_path):
    """The adapted stage trains a copy of the pretrained teacher, so notebook 02's
    per-stage table compares two models (it once showed the adapted one twice), and a
    rerun that reuses both checkpoints gives each stage back its own weights."""
    import torch

    from fairkd_utils import teacher

    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic", None, [0], "cpu")
    assert run.profile.teacher_adapt_epochs > 0
    first = teacher.train_teacher_stages(run, progress=False)
    again = teacher.train_teacher_stages(run, progress=False)
    assert list(first) == ["pretrained", "adapted"] and all(r.reused for r in again.values())
    for stages in (first, again):
        pre, ad = (stages[k].model.state_dict() for k in ("pretrained", "adapted"))
        assert any(not torch.equal(pre[k], ad[k]) for k in pre), "both stages hold one model"
    for key in first:
        a, b = first[key].model.state_dict(), again[key].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), key
